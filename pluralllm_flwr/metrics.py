"""Alignment scores, fairness across groups, convergence speed and the baselines' predictions.

Plain numpy/scipy on plain dicts (question key -> distribution), so reports and strategies can use
it without the model or the data layer. scipy is imported where it is used: a deployed ClientApp
is a new process for every message, and a train message has no use for its 1.4 s of imports. A score that cannot be computed is NaN: aggregations skip
it and count it, and it never counts as perfect alignment (the reference code scored it as 1).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

QuestionMetric = Callable[[str, np.ndarray, np.ndarray], float]
"""(question key, predicted distribution, true distribution) -> score; keyed so that a metric
may need per-question data such as ordinal option positions."""


def _distribution_pair(p: Sequence[float], q: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.ndim != 1 or p.shape != q.shape:
        raise ValueError(f"distributions must be 1-d and of equal length, got shapes {p.shape} and {q.shape}")
    if (p < 0).any() or (q < 0).any():
        raise ValueError(f"distributions must be non-negative, got {p} and {q}")
    return p, q


def _is_distribution(p: np.ndarray) -> bool:
    """Finite with a positive sum: anything else (all zeros, NaN) has no defined score."""
    return bool(np.isfinite(p).all() and p.sum() > 0)


def alignment(p: Sequence[float], q: Sequence[float]) -> float:
    """1 − Jensen–Shannon distance (natural log, so the distance is in [0, sqrt(ln 2)]); inputs are
    normalised to sum 1. NaN when either input is not a distribution (all zeros, NaN entries)."""
    p, q = _distribution_pair(p, q)
    if not (_is_distribution(p) and _is_distribution(q)):
        return math.nan
    from scipy.spatial.distance import jensenshannon

    with np.errstate(invalid="ignore"):
        distance = float(jensenshannon(p, q))
    # For valid inputs scipy's only NaN is the square root of a divergence that rounded to
    # slightly below 0 (near-identical p and q; about a third of such pairs), so the distance is 0.
    return 1.0 - (0.0 if math.isnan(distance) else distance)


def alignment_w1(p: Sequence[float], q: Sequence[float], ordinal: Sequence[float]) -> float:
    """GPO's OpinionQA score 1 − W1/max-W1, with the options at their ordinal positions and
    max-W1 = max(ordinal) − min(ordinal). NaN when either input is not a distribution."""
    p, q = _distribution_pair(p, q)
    positions = np.asarray(ordinal, np.float64)
    if positions.shape != p.shape:
        raise ValueError(f"{len(positions)} ordinal positions for {len(p)} options")
    span = float(positions.max() - positions.min())
    if not span > 0:
        raise ValueError(f"ordinal positions {positions.tolist()} span nothing; W1 needs at least two positions")
    if not (_is_distribution(p) and _is_distribution(q)):
        return math.nan
    from scipy.stats import wasserstein_distance

    return 1.0 - float(wasserstein_distance(positions, positions, p, q)) / span


def js_metric(key: str, predicted: np.ndarray, true: np.ndarray) -> float:
    """`alignment` as a QuestionMetric (the key is not needed)."""
    return alignment(predicted, true)


def mean_excluding_nan(values: Iterable[float]) -> tuple[float, int]:
    """(mean of the non-NaN values or NaN if there are none, number of NaN values skipped)."""
    arr = np.asarray(list(values), np.float64)
    nan = np.isnan(arr)
    return (float(arr[~nan].mean()) if (~nan).any() else math.nan), int(nan.sum())


def fairness(per_group: Mapping[str, float]) -> dict:
    """Jain's index (Σx)²/(n·Σx²), coefficient of variation std/mean (population std) and the worst
    group, over the groups whose score is not NaN (those are counted in `nan_excluded`)."""
    scores = {g: float(s) for g, s in per_group.items() if not math.isnan(s)}
    if not scores:
        raise ValueError(f"fairness needs at least one group with a score, got {dict(per_group)}")
    x = np.fromiter(scores.values(), np.float64)
    square_sum, mean = float((x ** 2).sum()), float(x.mean())
    worst_group = min(scores, key=scores.__getitem__)
    return {"jain": float(x.sum() ** 2 / (len(x) * square_sum)) if square_sum > 0 else math.nan,
            "cov": float(x.std() / mean) if mean != 0 else math.nan,
            "worst": scores[worst_group], "worst_group": worst_group,
            "n_groups": len(scores), "nan_excluded": len(per_group) - len(scores)}


def rounds_to_target(history: list[dict], target: float, key: str = "alignment",
                     x: str = "round") -> int | None:
    """The first `x` (round, epoch) at which `key` reached `target`; None if it never did. Rows
    without the key (rounds with no evaluation) or with NaN are skipped."""
    hits = [row[x] for row in history
            if row.get(key) is not None and not math.isnan(row[key]) and row[key] >= target]
    return int(min(hits)) if hits else None


def uniform_prediction(n_options: int) -> np.ndarray:
    """The uniform distribution over n options (the know-nothing baseline)."""
    if n_options < 1:
        raise ValueError(f"n_options={n_options} must be >= 1")
    return np.full(n_options, 1.0 / n_options)


@dataclass(frozen=True)
class MeanBaseline:
    predictions: dict[str, np.ndarray]  # question key -> predicted distribution
    coverage: float                     # fraction of the questions some training group answered


def train_mean_baseline(train_answers: Iterable[Mapping[str, np.ndarray]],
                        n_options: Mapping[str, int]) -> MeanBaseline:
    """Predict each question (key -> option count) by the mean of the training groups' normalised
    distributions for that key, or uniform where no training group has a usable answer."""
    sums = {k: np.zeros(n) for k, n in n_options.items()}
    counts = dict.fromkeys(n_options, 0)
    for answers in train_answers:
        for key, dist in answers.items():
            if key not in sums:
                continue
            dist = np.asarray(dist, np.float64)
            if dist.shape != sums[key].shape:
                raise ValueError(f"question {key!r}: a training group has {dist.size} options, "
                                 f"the evaluated question has {sums[key].size}")
            if _is_distribution(dist):
                sums[key] += dist / dist.sum()
                counts[key] += 1
    predictions = {k: sums[k] / counts[k] if counts[k] else uniform_prediction(n) for k, n in n_options.items()}
    covered = sum(1 for c in counts.values() if c)
    return MeanBaseline(predictions, covered / len(n_options) if n_options else math.nan)


def alignments(predicted: Sequence[np.ndarray], true: Sequence[np.ndarray]) -> np.ndarray:
    """`alignment` of many (predicted, true) pairs at once, equal to it pair by pair (a test): the
    distributions are zero-padded to a common length, which changes no JS distance."""
    if len(predicted) != len(true):
        raise ValueError(f"{len(predicted)} predictions for {len(true)} true distributions")
    if not len(true):
        return np.zeros(0)
    lengths = np.fromiter((len(t) for t in true), np.int64, len(true))
    if not np.array_equal(lengths, np.fromiter((len(p) for p in predicted), np.int64, len(true))):
        raise ValueError("each predicted distribution must have as many values as its true distribution")
    flat_p = np.concatenate([np.asarray(p, np.float64).ravel() for p in predicted])
    flat_q = np.concatenate([np.asarray(q, np.float64).ravel() for q in true])
    if (flat_p < 0).any() or (flat_q < 0).any():
        raise ValueError("distributions must be non-negative")
    rows = np.repeat(np.arange(len(true)), lengths)
    cols = np.arange(len(flat_q)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    p, q = np.zeros((len(true), lengths.max())), np.zeros((len(true), lengths.max()))
    p[rows, cols], q[rows, cols] = flat_p, flat_q
    valid = np.isfinite(p).all(1) & np.isfinite(q).all(1) & (p.sum(1) > 0) & (q.sum(1) > 0)
    out = np.full(len(true), math.nan)
    if valid.any():
        from scipy.spatial.distance import jensenshannon

        with np.errstate(invalid="ignore"):
            distance = jensenshannon(p[valid], q[valid], axis=1)
        out[valid] = 1.0 - np.nan_to_num(distance, nan=0.0)  # NaN = a divergence rounded below 0, as in `alignment`
    return out


def alignments_w1(predicted: Sequence[np.ndarray], true: Sequence[np.ndarray],
                  ordinals: Sequence[Sequence[float]]) -> np.ndarray:
    """`alignment_w1` of many pairs at once (equal pair by pair, a test): with the options sorted by
    position, W1 = Σ |F_p − F_q| · gap between neighbouring positions."""
    out = np.full(len(true), math.nan)
    for n in {len(t) for t in true}:  # one vectorised pass per option count
        idx = [i for i, t in enumerate(true) if len(t) == n]
        pos = np.asarray([ordinals[i] for i in idx], np.float64)
        p = np.asarray([predicted[i] for i in idx], np.float64)
        q = np.asarray([true[i] for i in idx], np.float64)
        if pos.shape != p.shape or p.shape != q.shape:
            raise ValueError("each pair needs one ordinal position per option")
        if (p < 0).any() or (q < 0).any():
            raise ValueError("distributions must be non-negative")
        span = pos.max(1) - pos.min(1)
        if not (span > 0).all():
            raise ValueError("ordinal positions must span more than one value; W1 needs at least two positions")
        valid = np.isfinite(p).all(1) & np.isfinite(q).all(1) & (p.sum(1) > 0) & (q.sum(1) > 0)
        order = np.argsort(pos, 1, kind="stable")
        pos, p, q = (np.take_along_axis(a, order, 1) for a in (pos, p, q))
        with np.errstate(invalid="ignore", divide="ignore"):
            cdf = np.cumsum(p / p.sum(1, keepdims=True), 1) - np.cumsum(q / q.sum(1, keepdims=True), 1)
            w1 = (np.abs(cdf[:, :-1]) * np.diff(pos, axis=1)).sum(1)
        out[np.asarray(idx)[valid]] = 1.0 - (w1 / span)[valid]
    return out


class OrdinalW1:
    """GPO's OpinionQA score as a QuestionMetric: `alignment_w1` on the questions that have ordinal
    positions (key -> positions), NaN (so excluded and counted) on the others; `many` scores a batch."""

    def __init__(self, ordinal: Mapping[str, Sequence[float]]) -> None:
        self.ordinal = dict(ordinal)

    def __call__(self, key: str, predicted: np.ndarray, true: np.ndarray) -> float:
        return alignment_w1(predicted, true, self.ordinal[key]) if key in self.ordinal else math.nan

    def many(self, keys: Sequence[str], predicted: Sequence[np.ndarray], true: Sequence[np.ndarray]) -> np.ndarray:
        out = np.full(len(keys), math.nan)
        idx = [i for i, k in enumerate(keys) if k in self.ordinal]
        if idx:
            out[idx] = alignments_w1([predicted[i] for i in idx], [true[i] for i in idx],
                                     [self.ordinal[keys[i]] for i in idx])
        return out


def impute_with_mean(answers: Mapping[str, np.ndarray], mean: MeanBaseline) -> dict[str, np.ndarray]:
    """A training group's answers on every question: its own (normalised) where it has a usable
    one, the training groups' mean elsewhere (questions it did not answer, or held back)."""
    out = dict(mean.predictions)
    for key, dist in answers.items():
        dist = np.asarray(dist, np.float64)
        if key in out and _is_distribution(dist):
            out[key] = dist / dist.sum()
    return out


def nearest_group_prediction(train: Sequence[Mapping[str, np.ndarray]], context: Mapping[str, np.ndarray],
                             targets: Sequence[str]) -> dict[str, np.ndarray]:
    """The answers of the training group whose answers on the context questions are closest (mean
    Jensen–Shannon distance; ties go to the first) to the group's. `train` is complete: every
    training group's answer for every question (`impute_with_mean`)."""
    keys = list(context)
    distances = [float(np.mean(1.0 - alignments([t[k] for k in keys], [context[k] for k in keys]))) for t in train]
    nearest = train[int(np.argmin(distances))]
    return {k: nearest[k] for k in targets}


def context_mixture_prediction(train: Sequence[Mapping[str, np.ndarray]], context: Mapping[str, np.ndarray],
                               targets: Sequence[str]) -> dict[str, np.ndarray]:
    """A non-negative mixture of the training groups fitted to the group's context answers: least
    squares on the stacked option probabilities (scipy's NNLS), weights renormalised to sum 1
    (uniform if all are 0), then the same mixture of the training groups' answers on each target."""
    from scipy.optimize import nnls

    keys = list(context)
    A = np.stack([np.concatenate([t[k] for k in keys]) for t in train], 1)
    b = np.concatenate([np.asarray(context[k], np.float64) / np.sum(context[k]) for k in keys])
    w = nnls(A, b)[0]
    w = w / w.sum() if w.sum() > 0 else np.full(len(train), 1.0 / len(train))
    return {k: sum(wi * t[k] for wi, t in zip(w, train)) for k in targets}
