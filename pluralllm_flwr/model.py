"""What every predictor shares: its configuration, its output and its interface.

A predictor reads a padded batch of episodes (`training.Batch`): per item, context tokens carrying
the group's probability of their option, then target tokens carrying 0, then padding. It returns,
for every target token, the predicted probability of that option (softmaxed within its question),
and scores itself with its own training loss. The architectures live in their own modules
(`gpo.py`, `mixture.py`, `residual.py`); `predictors.py` names them for the run-config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelConfig:
    """`architecture` names the predictor (predictors.ARCHITECTURES); `input_dim` is the width of the
    option features (384 for MiniLM's raw vectors, 4096 for Alpaca-7B's). The rest are GPO's
    hyper-parameters, read by the architectures that have such parts, plus the mixture's."""

    input_dim: int
    architecture: str = "gpo"
    d_model: int = 128
    embed_depth: int = 4          # number of Linear layers in the embedder MLP
    num_layers: int = 6
    num_heads: int = 4
    dim_feedforward: int = 128
    dropout: float = 0.0
    prototypes: int = 16          # mixture: number of prototype answer heads
    inference_steps: int = 10     # mixture: EM steps fitting a group's weights to its context

    def __post_init__(self) -> None:
        problems = []
        if self.input_dim < 1:
            problems.append(f"input_dim={self.input_dim} must be the feature width (>= 1)")
        if self.d_model < 1 or self.d_model % max(self.num_heads, 1) or self.num_heads < 1:
            problems.append(f"d_model={self.d_model} must be a positive multiple of num_heads={self.num_heads}")
        if self.embed_depth < 2:
            problems.append(f"embed_depth={self.embed_depth} must be >= 2 (input and output Linear layers)")
        if self.num_layers < 1 or self.dim_feedforward < 1:
            problems.append(f"num_layers={self.num_layers} and dim_feedforward={self.dim_feedforward} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must lie in [0, 1)")
        if self.prototypes < 1 or self.inference_steps < 0:
            problems.append(f"prototypes={self.prototypes} must be >= 1 and inference_steps={self.inference_steps} >= 0")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))


class Prediction(NamedTuple):
    """Per-token outputs in the batch's [B, T] layout, 0 wherever a token is not a target. `log_std`
    is for predictors with a Gaussian likelihood (GPO) and None for the others."""

    mean: Tensor                  # predicted probability of the option, softmaxed within its question
    log_std: Tensor | None = None


class Predictor(nn.Module):
    """The interface of every architecture: `forward` predicts, `loss` is what training minimises.

    forward(x [B,T,D] float, y_in [B,T] (0 on targets), is_context / is_target [B,T] bool,
    segment [B,T] int: equal ids = same question, unique across the batch, -1 on padding)."""

    config: ModelConfig

    def forward(self, x: Tensor, y_in: Tensor, is_context: Tensor, is_target: Tensor,
                segment: Tensor) -> Prediction:  # pragma: no cover - interface
        raise NotImplementedError

    def loss(self, pred: Prediction, y_true: Tensor, is_target: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.config.input_dim:
            raise ValueError(f"inputs are {x.shape[-1]}-d but the model expects input_dim={self.config.input_dim}; "
                             "build ModelConfig with the features' width")


def option_mlp(config: ModelConfig, out: int) -> nn.Sequential:
    """An MLP from option features to `out` values per option: embed-depth Linear layers, ReLU between."""
    d = config.d_model
    layers: list[nn.Module] = [nn.Linear(config.input_dim, d), nn.ReLU()]
    for _ in range(config.embed_depth - 2):
        layers += [nn.Linear(d, d), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(d, out))


def segment_ids(segment: Tensor) -> tuple[Tensor, int]:
    """Dense ids 0..n-1 for a flat vector of question ids, and n."""
    _, seg = torch.unique(segment, return_inverse=True)
    return seg, (int(seg.max()) + 1 if seg.numel() else 0)


def segment_softmax(logits: Tensor, segment: Tensor) -> Tensor:
    """Softmax within each segment (equal ids = same question), without loops. `logits` is flat [N]
    or [N, K] (K independent softmaxes per token, e.g. one per prototype)."""
    seg, n = segment_ids(segment)
    shape = (n,) + tuple(logits.shape[1:])
    index = seg.view(-1, *([1] * (logits.ndim - 1))).expand_as(logits)
    top = logits.new_full(shape, float("-inf")).scatter_reduce(0, index, logits.detach(), "amax")
    e = (logits - top[seg]).exp()
    return e / e.new_zeros(shape).index_add(0, seg, e)[seg]


def cross_entropy(pred: Prediction, y_true: Tensor, is_target: Tensor) -> Tensor:
    """−Σ y·log p over the real target tokens, per target question (each question's y sums to 1, so
    Σ y counts the questions): the KL divergence to the true distributions up to a constant."""
    if not bool(is_target.any()):
        raise ValueError("the batch has no target token, so there is nothing to score")
    y = y_true[is_target]
    return -(y * pred.mean[is_target].clamp_min(1e-12).log()).sum() / y.sum().clamp_min(1e-12)


def context_keys(is_context: Tensor) -> Tensor:
    """The key mask [B, K]: K spans every column holding a context token (all of them when the
    context comes first), True where the key is a real context token. Raises when an item has none,
    since its attention rows would be empty (NaN)."""
    if is_context.ndim != 2 or is_context.dtype != torch.bool:
        raise ValueError(f"is_context must be a bool [B, T] tensor, got {is_context.dtype} {tuple(is_context.shape)}")
    counts = is_context.sum(1)
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"batch items {empty} have no context token; every episode needs >= 1 context question")
    width = int(is_context.any(0).nonzero().max()) + 1
    return is_context[:, :width]
