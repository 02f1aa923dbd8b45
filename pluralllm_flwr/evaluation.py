"""Held-out evaluation: how well a predictor fits each held-out group from a few of its answers, and
whether it is the group's answers that it uses.

Every score is over (question, draw) pairs: per draw, `eval-context` of the group's questions are its
context and every other (seen) question is a target; per question the draws are averaged, then the
(group, question) pairs are pooled. Beside the alignment an evaluation reports:

- the conditioning gain: the same targets predicted from *another* held-out group's answers to the
  same context questions, both scored on the group's own truth. A model that ignores the context
  scores a gain of exactly 0; one that uses it scores > 0;
- alignment against context size (run-config eval-context-sizes: 1, 5, 10, 20, 50, 100; capped by
  the group's size);
- with run-config heldout-questions, the questions no training group trained on, scored apart,
  beside the model's prediction from an uninformative context (uniform answers), with their own
  conditioning gain (the swap above, scored on the unseen questions): what a reward model needs,
  since it scores questions nobody trained on.

The baselines are scored on the very same draws: uniform, the training groups' mean, the nearest
training group and the context-fitted mixture of the training groups (those need the training
groups' answers; a deployment's server has none, so there they are unavailable, with the reason).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .data import GroupVectors
from .metrics import (MeanBaseline, QuestionMetric, alignments, context_mixture_prediction, fairness, impute_with_mean,
                      js_metric, mean_excluding_nan, nearest_group_prediction, uniform_prediction)
from .model import Predictor
from .training import draw_contexts, group_distributions, predict

CONTEXT_BASELINES = ("nearest_group", "context_mixture")
NO_TRAINING_ANSWERS = ("it needs the training groups' answers, which stay on their SuperNodes; this server holds "
                       "only the held-out groups' bundles")


@dataclass
class HeldOutGroup:
    """One held-out group's material: its seen questions (context and targets), its unseen ones
    (none unless heldout-questions > 0) and its seeded context draws, as indices into `seen`."""

    name: str
    seen: GroupVectors
    unseen: GroupVectors | None
    seed: int
    contexts: list[np.ndarray]
    index: dict[str, int] = field(init=False)          # question key -> position in `seen`
    truth: dict[str, np.ndarray] = field(init=False)   # question key -> the group's answer (seen questions)
    unseen_truth: list[np.ndarray] = field(init=False)  # the group's answers to its unseen questions, in order

    def __post_init__(self) -> None:
        self.index = {k: i for i, k in enumerate(self.seen.keys)}
        self.truth = group_distributions(self.seen)
        self.unseen_truth = list(group_distributions(self.unseen).values()) if self.unseen is not None else []

    def targets(self, context: np.ndarray) -> np.ndarray:
        return np.setdiff1d(np.arange(self.seen.num_questions), context)


def score(metric: QuestionMetric, keys: Sequence[str], predicted: Sequence[np.ndarray],
          true: Sequence[np.ndarray]) -> np.ndarray:
    """Scores of many questions, in one vectorised call where the metric has one (JS, W1)."""
    if metric is js_metric:
        return alignments(predicted, true)
    if hasattr(metric, "many"):
        return metric.many(keys, predicted, true)
    return np.array([metric(k, p, t) for k, p, t in zip(keys, predicted, true)], np.float64)


def _pool(per_group_question: Mapping[str, Mapping[str, list[float]]]) -> tuple[float, dict[str, float], int]:
    """(pooled mean over (group, question) of the per-question mean over draws, per-group means, NaNs skipped)."""
    pooled, per_group, nan = [], {}, 0
    for group, per_question in per_group_question.items():
        means = []
        for values in per_question.values():
            mean, skipped = mean_excluding_nan(values)
            means.append(mean)
            nan += skipped
        per_group[group] = mean_excluding_nan(means)[0]
        pooled += means
    return mean_excluding_nan(pooled)[0], per_group, nan


def _partner(groups: Sequence[HeldOutGroup], i: int, context_keys: list[str]) -> HeldOutGroup | None:
    """The next held-out group (cyclically) that answered every one of these context questions."""
    for step in range(1, len(groups)):
        other = groups[(i + step) % len(groups)]
        if all(k in other.index for k in context_keys):
            return other
    return None


def _with_answers(vectors: GroupVectors, source: GroupVectors, source_index: Mapping[str, int]) -> GroupVectors:
    """`vectors` (some questions) carrying `source`'s answers to the same questions instead."""
    other = source.subset([source_index[k] for k in vectors.keys])
    return GroupVectors(source.group, vectors.keys, vectors.x, other.y, vectors.offsets)


def _uninformative(vectors: GroupVectors) -> GroupVectors:
    """The same questions with uniform answers: a context that says nothing about the group."""
    counts = np.diff(vectors.offsets)
    y = np.repeat(1.0 / counts, counts).astype(np.float32)
    return GroupVectors(vectors.group, vectors.keys, vectors.x, y, vectors.offsets)


def evaluate_model(model: Predictor, groups: Sequence[HeldOutGroup], metrics: Mapping[str, QuestionMetric],
                   device: str, context_sizes: Sequence[int]) -> dict:
    """A history entry's scores (all but round and steps): every metric with per-group scores and
    fairness, the conditioning gain, the context-size curve and, where there are unseen questions,
    their scores."""
    scores = {name: defaultdict(lambda: defaultdict(list)) for name in metrics}
    swapped, own_for_swap = defaultdict(lambda: defaultdict(list)), defaultdict(lambda: defaultdict(list))
    unseen = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # context kind -> group -> question -> scores
    for i, g in enumerate(groups):
        for context in g.contexts:
            targets = g.seen.subset(g.targets(context))
            ctx = g.seen.subset(context)
            predicted = predict(model, ctx, targets, device)
            true = [g.truth[k] for k in targets.keys]
            for name, metric in metrics.items():
                for k, s in zip(targets.keys, score(metric, targets.keys, predicted, true)):
                    scores[name][g.name][k].append(s)
            partner = _partner(groups, i, ctx.keys)
            other_ctx = _with_answers(ctx, partner.seen, partner.index) if partner is not None else None
            if other_ctx is not None:
                other = predict(model, other_ctx, targets, device)
                for k, s_own, s_other in zip(targets.keys, alignments(predicted, true), alignments(other, true)):
                    own_for_swap[g.name][k].append(s_own)
                    swapped[g.name][k].append(s_other)
            if g.unseen_truth:
                kinds = {"own": ctx, "no_context": _uninformative(ctx), "swapped": other_ctx}
                for kind, c in kinds.items():
                    if c is None:
                        continue
                    for k, s in zip(g.unseen.keys, alignments(predict(model, c, g.unseen, device), g.unseen_truth)):
                        unseen[kind][g.name][k].append(s)
                        if kind == "own" and other_ctx is not None:
                            unseen["own_paired"][g.name][k].append(s)
    entry: dict = {}
    for name in metrics:
        pooled, per_group, nan = _pool(scores[name])
        prefix = "" if name == "alignment" else name + "_"
        entry[name] = pooled
        entry[prefix + "per_group"] = per_group
        entry[prefix + "fairness"] = fairness(per_group)
        entry[prefix + "nan_excluded"] = nan
    entry["conditioning"] = _conditioning(own_for_swap, swapped, groups)
    entry["conditioning_gain"] = entry["conditioning"]["gain"]
    entry["context_curve"] = context_curve(model, groups, device, context_sizes, entry["alignment"])
    if unseen:
        paired = "swapped" in unseen
        entry["unseen"] = {"alignment": _pool(unseen["own"])[0], "no_context": _pool(unseen["no_context"])[0],
                           "conditioning_gain": _pool(unseen["own_paired"])[0] - _pool(unseen["swapped"])[0]
                           if paired else None,
                           "n_questions": sum(g.unseen.num_questions for g in groups if g.unseen is not None)}
    return entry


def _conditioning(own: Mapping, swapped: Mapping, groups: Sequence[HeldOutGroup]) -> dict:
    if not swapped:
        return {"gain": None, "applies": False,
                "reason": "no other held-out group answered a group's context questions"
                          if len(groups) > 1 else "it needs at least two held-out groups"}
    own_score, own_groups, _ = _pool(own)
    swap_score, swap_groups, _ = _pool(swapped)
    return {"gain": own_score - swap_score, "own": own_score, "swapped": swap_score, "applies": True,
            "per_group": {g: own_groups[g] - swap_groups[g] for g in own_groups},
            "groups_without_partner": sorted({g.name for g in groups} - set(own_groups))}


def context_curve(model: Predictor, groups: Sequence[HeldOutGroup], device: str,
                  sizes: Sequence[int], evaluated: float | None = None) -> dict[str, float]:
    """Pooled JS alignment with each context size, on the groups' own seeded draws of that size
    (sizes above a group's questions minus one are capped at that). `evaluated`: the alignment
    already computed with the groups' own `contexts`, which the draws of their size repeat."""
    out: dict[str, float] = {}
    done: dict[tuple[int, ...], float] = {}  # sizes capped alike (50 and 100 for a 40-question group) once
    if evaluated is not None:
        done[tuple(len(g.contexts[0]) for g in groups)] = evaluated
    for size in sizes:
        effective = tuple(min(size, g.seen.num_questions - 1) for g in groups)
        if effective in done:
            out[str(size)] = done[effective]
            continue
        per_group_question = defaultdict(lambda: defaultdict(list))
        for g in groups:
            n = g.seen.num_questions
            for context in draw_contexts(n, min(size, n - 1), len(g.contexts), g.seed):
                targets = g.seen.subset(g.targets(context))
                predicted = predict(model, g.seen.subset(context), targets, device)
                for k, s in zip(targets.keys, alignments(predicted, [g.truth[k] for k in targets.keys])):
                    per_group_question[g.name][k].append(s)
        out[str(size)] = done[effective] = _pool(per_group_question)[0]
    return out


def evaluate_baselines(groups: Sequence[HeldOutGroup], train_answers: Sequence[Mapping[str, np.ndarray]] | None,
                       mean: MeanBaseline | None, n_options: Mapping[str, int],
                       metric: QuestionMetric = js_metric) -> dict:
    """Uniform, train-mean, nearest training group and context mixture on the model's own draws.
    Without the training groups' answers (`train_answers` None) all but uniform are unavailable."""
    truths = {g.name: g.truth for g in groups}
    predictors: dict[str, Callable[[HeldOutGroup, list[str], list[str]], dict[str, np.ndarray]]] = {
        "uniform": lambda g, ctx, tgt: {k: uniform_prediction(n_options[k]) for k in tgt}}
    if train_answers is not None:
        complete = [impute_with_mean(a, mean) for a in train_answers]
        predictors["train_mean"] = lambda g, ctx, tgt: {k: mean.predictions[k] for k in tgt}
        predictors["nearest_group"] = lambda g, ctx, tgt: nearest_group_prediction(
            complete, {k: truths[g.name][k] for k in ctx}, tgt)
        predictors["context_mixture"] = lambda g, ctx, tgt: context_mixture_prediction(
            complete, {k: truths[g.name][k] for k in ctx}, tgt)
    out = {}
    for name, fn in predictors.items():
        per_group_question = defaultdict(lambda: defaultdict(list))
        for g in groups:
            for context in g.contexts:
                ctx = [g.seen.keys[i] for i in context]
                tgt = [g.seen.keys[i] for i in g.targets(context)]
                predicted = fn(g, ctx, tgt)
                for k, s in zip(tgt, score(metric, tgt, [predicted[k] for k in tgt], [truths[g.name][k] for k in tgt])):
                    per_group_question[g.name][k].append(s)
        pooled, per_group, _ = _pool(per_group_question)
        out[name] = {"alignment": pooled, "per_group": per_group}
    if train_answers is None:
        for name in ("train_mean",) + CONTEXT_BASELINES:
            out[name] = {"alignment": None, "per_group": None, "unavailable": NO_TRAINING_ANSWERS}
    else:
        out["train_mean"]["coverage"] = mean.coverage
    unseen = [d for g in groups for d in g.unseen_truth]
    if unseen:
        out["uniform"]["unseen"] = float(np.nanmean(alignments([uniform_prediction(len(d)) for d in unseen], unseen)))
    return out
