"""Episodes, local training steps and one-pass prediction for every predictor.

One episode = some of a group's questions as context (with the group's answers) and others as
targets. A training step is one gradient step on a batch holding one episode from every given group:
a Flower client passes its own group, the centralized trainer passes all training groups.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.optim.adam import adam
from torch.optim.sgd import sgd

from .data import GroupVectors
from .model import Predictor


@dataclass(frozen=True)
class EpisodeSizes:
    """Bounds on the number of context and target questions per episode (GPO: 10-100 each)."""

    min_context: int = 10
    max_context: int = 100
    min_target: int = 10
    max_target: int = 100

    def __post_init__(self) -> None:
        if not (1 <= self.min_context <= self.max_context and 1 <= self.min_target <= self.max_target):
            raise ValueError(f"invalid EpisodeSizes {self}: need 1 <= min <= max for context and target")


def _episode_questions(group: GroupVectors, sizes: EpisodeSizes) -> int:
    """The group's number of questions, checked to hold an episode (a context and one target)."""
    n = group.num_questions
    if n < sizes.min_context + 1:
        raise ValueError(f"group {group.group!r} has {n} questions, but an episode needs at least "
                         f"min_context + 1 = {sizes.min_context + 1}; lower min-context or drop the group")
    return n


def sample_episode(group: GroupVectors, sizes: EpisodeSizes,
                   rng: np.random.Generator) -> tuple[GroupVectors, GroupVectors]:
    """(context, targets) from one permutation of the group's questions: a random count in
    [min, max] of each, capped by what the group has (at least one question is left as a target)."""
    n = _episode_questions(group, sizes)
    order = rng.permutation(n)
    n_context = int(rng.integers(sizes.min_context, min(sizes.max_context, n - 1) + 1))
    left = n - n_context
    n_target = int(rng.integers(min(sizes.min_target, left), min(sizes.max_target, left) + 1))
    return group.subset(order[:n_context]), group.subset(order[n_context:n_context + n_target])


def sample_same_questions(groups: Sequence[GroupVectors], sizes: EpisodeSizes,
                          shared: np.random.Generator) -> list[tuple[GroupVectors, GroupVectors]]:
    """GPO's OpinionQA sampler: one random question order and one pair of counts for every group,
    each group taking its own questions in that order. The order is a seeded hash of the question
    keys, so separate nodes drawing from the same `shared` stream pick the same questions."""
    salt = str(int(shared.integers(2**62)))
    u_context, u_target = shared.random(2)
    episodes = []
    for group in groups:
        n = _episode_questions(group, sizes)
        order = np.argsort([zlib.crc32(f"{salt}:{k}".encode()) for k in group.keys], kind="stable")
        hi = min(sizes.max_context, n - 1)
        n_context = sizes.min_context + int(u_context * (hi - sizes.min_context + 1))
        left = n - n_context
        lo_t, hi_t = min(sizes.min_target, left), min(sizes.max_target, left)
        n_target = lo_t + int(u_target * (hi_t - lo_t + 1))
        episodes.append((group.subset(order[:n_context]), group.subset(order[n_context:n_context + n_target])))
    return episodes


def lr_factor(step: int, total: int, schedule: str = "constant", warmup: int = 0) -> float:
    """The learning rate of step (or round) `step` of `total` (0-based), as a factor of the base rate:
    a linear warm-up over `warmup` steps, then constant or a cosine decay to 0 at the last step that
    stays there (the reference code's cosine ran past its period and climbed back)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use 'constant' or 'cosine'")
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Batch:
    """Padded episodes: item b holds its context tokens, then its target tokens, then padding.

    Putting the context first lets the model take keys from the first columns only."""

    x: Tensor           # float32 [B, T, D] option embeddings (0 on padding)
    y_in: Tensor        # float32 [B, T] the group's probability on context tokens, 0 elsewhere
    y_true: Tensor      # float32 [B, T] the group's probability on context and target tokens
    is_context: Tensor  # bool [B, T]
    is_target: Tensor   # bool [B, T]
    segment: Tensor     # int64 [B, T] question id, unique across the batch; -1 on padding

    def to(self, device: str | torch.device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.x, self.y_in, self.y_true, self.is_context,
                                               self.is_target, self.segment)))


def collate(episodes: Sequence[tuple[GroupVectors, GroupVectors]]) -> Batch:
    """Stack (context, targets) pairs into one padded `Batch`."""
    if not episodes:
        raise ValueError("collate needs at least one (context, targets) episode")
    dims = {part.x.shape[1] for episode in episodes for part in episode}
    if len(dims) != 1:
        raise ValueError(f"episodes mix embedding widths {sorted(dims)}; embed all groups with one model")
    B, D = len(episodes), dims.pop()
    T = max(len(c.y) + len(t.y) for c, t in episodes)
    x = np.zeros((B, T, D), np.float32)
    y_in, y_true = np.zeros((B, T), np.float32), np.zeros((B, T), np.float32)
    is_context, is_target = np.zeros((B, T), bool), np.zeros((B, T), bool)
    segment = np.full((B, T), -1, np.int64)
    next_id = 0
    for b, (context, targets) in enumerate(episodes):
        nc, nt = len(context.y), len(targets.y)
        x[b, :nc], x[b, nc:nc + nt] = context.x, targets.x
        y_in[b, :nc] = y_true[b, :nc] = context.y
        y_true[b, nc:nc + nt] = targets.y
        is_context[b, :nc], is_target[b, nc:nc + nt] = True, True
        lengths = np.concatenate([np.diff(context.offsets), np.diff(targets.offsets)])
        segment[b, :nc + nt] = next_id + np.repeat(np.arange(len(lengths)), lengths)
        next_id += len(lengths)
    return Batch(*(torch.from_numpy(a) for a in (x, y_in, y_true, is_context, is_target, segment)))


def batch_loss(model: Predictor, batch: Batch) -> Tensor:
    """The predictor's own training loss on the batch's target tokens."""
    pred = model(batch.x, batch.y_in, batch.is_context, batch.is_target, batch.segment)
    return model.loss(pred, batch.y_true, batch.is_target)


class ClientOptimizer:
    """A client's optimiser for one round: torch.optim.Adam or SGD at their defaults, computed by
    torch's own update functions (`torch.optim.adam.adam`, `torch.optim.sgd.sgd`) and bit-identical to
    them (tests/test_training). It skips the `Optimizer` class only because that class imports
    torch._dynamo when first built, 1.7 s of CPU per message on a deployed SuperNode, where every
    message is a new process. Its state lives for one round, so it has no state_dict."""

    KINDS = ("adam", "sgd")  # run-config client-optimizer

    def __init__(self, params: Sequence[Tensor], kind: str, lr: float) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"client optimizer must be one of {self.KINDS}, got {kind!r}")
        self.params, self.kind, self.lr = list(params), kind, lr
        self.moments: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # adam: parameter -> (m, v, step count)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [(i, p) for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        params, grads = [p for _, p in live], [p.grad for _, p in live]
        if self.kind == "sgd":
            sgd(params, grads, [None] * len(params), weight_decay=0.0, momentum=0.0, lr=self.lr, dampening=0.0,
                nesterov=False, maximize=False)
            return
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for i, p in live:  # torch.optim.Adam's lazy state: zero moments, a float step counter on the CPU
            if i not in self.moments:
                zeros = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.moments[i] = (zeros, zeros.clone(), torch.tensor(0.0, dtype=scalar))
        m, v, t = (list(part) for part in zip(*(self.moments[i] for i, _ in live)))
        adam(params, grads, m, v, [], t, amsgrad=False, has_complex=any(map(torch.is_complex, params)),
             beta1=0.9, beta2=0.999, lr=self.lr, weight_decay=0.0, eps=1e-8, maximize=False)


def train_steps(model: Predictor, optimizer: torch.optim.Optimizer | ClientOptimizer, groups: list[GroupVectors],
                steps: int, sizes: EpisodeSizes, rng: np.random.Generator, device: str | torch.device,
                proximal_mu: float = 0.0, anchor: list[Tensor] | None = None,
                same_questions: np.random.Generator | None = None, episodes_per_step: int = 1,
                drift_correction: list[Tensor] | None = None, gradient_sum: list[Tensor] | None = None) -> list[float]:
    """`steps` gradient steps, each on one batch with `episodes_per_step` fresh episodes of every group: drawn
    independently per group from `rng`, or, given a `same_questions` stream, the same questions
    for every group (`sample_same_questions`; nodes sharing the stream share the questions).

    With proximal_mu > 0 the objective adds (mu/2)·Σ‖w − anchor‖² (FedProx; anchor = the global
    weights, in `model.parameters()` order). Returns the loss of each step, without the proximal term,
    so runs with and without FedProx stay comparable.

    SCAFFOLD: `drift_correction` (c − c_i, per parameter) is added to every step's gradient, and each
    step's raw gradient is added into `gradient_sum` (the client's next control variate is its mean).
    """
    if not groups:
        raise ValueError("train_steps needs at least one group")
    if steps < 0 or proximal_mu < 0 or episodes_per_step < 1:
        raise ValueError(f"steps={steps} and proximal_mu={proximal_mu} must be >= 0, episodes_per_step="
                         f"{episodes_per_step} >= 1")
    params = list(model.parameters())
    if proximal_mu > 0:
        if anchor is None or len(anchor) != len(params) or any(a.shape != p.shape for a, p in zip(anchor, params)):
            raise ValueError("proximal_mu > 0 needs anchor = one tensor per model parameter, same shapes "
                             "(copy the global weights before training: [p.detach().clone() for p in model.parameters()])")
        anchor = [a.detach().to(device) for a in anchor]
    model.train()
    losses = []
    for _ in range(steps):
        if same_questions is not None:
            episodes = [e for _ in range(episodes_per_step) for e in sample_same_questions(groups, sizes, same_questions)]
        else:
            episodes = [sample_episode(g, sizes, rng) for g in groups for _ in range(episodes_per_step)]
        batch = collate(episodes).to(device)
        nll = batch_loss(model, batch)
        loss = nll
        if proximal_mu > 0:
            loss = nll + 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if gradient_sum is not None or drift_correction is not None:
            _scaffold_step(params, drift_correction, gradient_sum)
        optimizer.step()
        losses.append(nll.item())
    return losses


def _scaffold_step(params: list[Tensor], correction: list[Tensor] | None, gradient_sum: list[Tensor] | None) -> None:
    for i, p in enumerate(params):
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if gradient_sum is not None:
            gradient_sum[i] += grad
        if correction is not None:
            p.grad = grad + correction[i]


def predict(model: Predictor, context: GroupVectors, targets: GroupVectors,
            device: str | torch.device) -> list[np.ndarray]:
    """Predicted distribution of every target question, all in one forward pass (targets attend
    only to the context, so this equals predicting each target alone)."""
    if targets.num_questions == 0:
        return []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batch = collate([(context, targets)]).to(device)
            mean = model(batch.x, batch.y_in, batch.is_context, batch.is_target, batch.segment).mean
    finally:
        model.train(was_training)
    start = len(context.y)
    flat = mean[0, start:start + len(targets.y)].cpu().numpy()
    return np.split(flat, targets.offsets[1:-1])


def group_distributions(group: GroupVectors) -> dict[str, np.ndarray]:
    """question key -> the group's distribution (the plain-dict form `metrics` baselines use)."""
    return dict(zip(group.keys, np.split(group.y, group.offsets[1:-1])))


def draw_contexts(n_questions: int, context_size: int, draws: int, seed: int) -> list[np.ndarray]:
    """`draws` seeded sets of `context_size` distinct question indices out of `n_questions`: one
    seed, one set of draws, shared by the model's evaluation and the baselines."""
    rng = np.random.default_rng(seed)
    return [rng.choice(n_questions, size=context_size, replace=False) for _ in range(draws)]
