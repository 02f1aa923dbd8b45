"""Alignment scores, fairness across groups, convergence speed and the two reference baselines.

Plain numpy/scipy on plain dicts (question key -> distribution), so reports and strategies can use
it without the model or the data layer. A score that cannot be computed is NaN: aggregations skip
it and count it, and it never counts as perfect alignment (the reference code scored it as 1).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

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
    return 1.0 - float(wasserstein_distance(positions, positions, p, q)) / span


def js_metric(key: str, predicted: np.ndarray, true: np.ndarray) -> float:
    """`alignment` as a QuestionMetric (the key is not needed)."""
    return alignment(predicted, true)


def make_metric(name: str, ordinal: Mapping[str, Sequence[float]] | None = None) -> QuestionMetric:
    """The QuestionMetric called `name`: "js" (GlobalOpinionQA) or "w1" (OpinionQA, needs each
    question's ordinal option positions)."""
    if name == "js":
        return js_metric
    if name == "w1":
        if ordinal is None:
            raise ValueError('metric "w1" needs ordinal positions per question key')

        def w1_metric(key: str, predicted: np.ndarray, true: np.ndarray) -> float:
            if ordinal.get(key) is None:
                raise ValueError(f"question {key!r} has no ordinal positions; W1 needs ordered options")
            return alignment_w1(predicted, true, ordinal[key])
        return w1_metric
    raise ValueError(f'unknown metric {name!r}; use "js" or "w1"')


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


def score_baseline(predictions: Mapping[str, np.ndarray], truths: Mapping[str, Mapping[str, np.ndarray]],
                   metric: QuestionMetric = js_metric) -> dict:
    """Score one prediction per question key against each group's truth (group -> key -> dist):
    the per-group mean, the pooled mean over all (group, question) pairs, and the NaNs skipped."""
    per_group, pooled = {}, []
    for group, answers in truths.items():
        missing = [k for k in answers if k not in predictions]
        if missing:
            raise ValueError(f"no prediction for {len(missing)} questions of group {group!r}, e.g. {missing[:3]}")
        scores = [metric(k, predictions[k], dist) for k, dist in answers.items()]
        per_group[group] = mean_excluding_nan(scores)[0]
        pooled += scores
    mean, nan_excluded = mean_excluding_nan(pooled)
    return {"per_group": per_group, "pooled": mean, "nan_excluded": nan_excluded, "n_pairs": len(pooled)}
