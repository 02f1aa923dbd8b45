"""The predictor architectures by name (run-config `model`): adding one is a module with a
`Predictor` subclass and one line here."""
from __future__ import annotations

import torch

from .gpo import GPOPredictor
from .mixture import MixturePredictor
from .model import ModelConfig, Predictor
from .residual import ResidualPredictor

ARCHITECTURES: dict[str, type[Predictor]] = {
    "gpo": GPOPredictor,            # GPO's transformer neural process (the paper's model)
    "mixture": MixturePredictor,    # prototype mixture, weights fitted to the context by EM
    "residual": ResidualPredictor,  # shared prior plus attention over the context's deviations
}


def build_predictor(config: ModelConfig, seed: int | None = None) -> Predictor:
    """The architecture `config.architecture`; with a seed, its initial weights are seeded."""
    if config.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown predictor architecture {config.architecture!r}; known: {sorted(ARCHITECTURES)}")
    if seed is not None:
        torch.manual_seed(seed)
    return ARCHITECTURES[config.architecture](config)
