"""Does a trained predictor condition on the group? Prints a Markdown matrix.

For a run's checkpoint, each held-out group's few-shot context (eval-context questions, seeded)
predicts the other questions; each prediction is scored against every held-out group's real answers.
A group-conditioned predictor scores best on the diagonal (its own group); if every row is the same,
the context is ignored and the model predicts a population average.

    .venv/bin/python benchmarks/group_sensitivity.py runs/<timestamp>/fedavg [--checkpoint best]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pluralllm_flwr.config import RunConfig  # noqa: E402
from pluralllm_flwr.data import seeded_rng  # noqa: E402
from pluralllm_flwr.experiment import prepare_experiment  # noqa: E402
from pluralllm_flwr.metrics import alignment, mean_excluding_nan  # noqa: E402
from pluralllm_flwr.results import load_checkpoint, load_results  # noqa: E402
from pluralllm_flwr.training import group_distributions, predict  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run's output directory (results.json and checkpoints)")
    parser.add_argument("--checkpoint", choices=["best", "last"], default="best")
    args = parser.parse_args()
    results = load_results(args.run)
    cfg = RunConfig.from_mapping(results["config"])
    exp = prepare_experiment(cfg, progress=False)
    model = exp.build_model()
    state, meta = load_checkpoint(Path(args.run) / f"{args.checkpoint}.safetensors")
    model.load_state_dict(state)
    groups = exp.split.eval
    common = sorted(set.intersection(*(set(exp.vectors(g).keys) for g in groups)))
    truth = {g: group_distributions(exp.vectors(g)) for g in groups}
    rows = {}
    for g in groups:
        vectors = exp.vectors(g)
        context = seeded_rng(cfg.seed, "sensitivity", g).choice(vectors.num_questions, cfg.eval_context, replace=False)
        context_keys = {vectors.keys[i] for i in context}
        targets = [i for i, k in enumerate(vectors.keys) if k in common and k not in context_keys]
        predicted = dict(zip((vectors.keys[i] for i in targets),
                             predict(model, vectors.subset(context), vectors.subset(targets), "cpu")))
        rows[g] = {h: mean_excluding_nan(alignment(p, truth[h][k]) for k, p in predicted.items())[0] for h in groups}
    print(f"Checkpoint {args.checkpoint} of {args.run} (round {meta.get('round')}); rows: whose context, "
          f"columns: whose answers; {cfg.eval_context} context questions.\n")
    print("| context \\ truth | " + " | ".join(groups) + " |")
    print("|---" * (len(groups) + 1) + "|")
    for g in groups:
        print(f"| {g} | " + " | ".join(f"{'**' if g == h else ''}{rows[g][h]:.4f}{'**' if g == h else ''}"
                                       for h in groups) + " |")
    spread = np.mean([max(rows[g][h] for g in groups) - min(rows[g][h] for g in groups) for h in groups])
    own = np.mean([rows[g][g] for g in groups])
    other = np.mean([rows[g][h] for g in groups for h in groups if g != h])
    print(f"\nMean score on the own group {own:.4f}, on other groups {other:.4f}; mean spread down a column "
          f"(how much the context changes the fit to one group's answers): {spread:.4f}")


if __name__ == "__main__":
    main()
