"""PluralLLM on Flower: federated training of GPO's group preference predictor."""
