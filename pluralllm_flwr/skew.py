"""The non-IID stress test's transform (the paper's experiment 3; run-config `skew`): every group's
answers are pulled toward a preference of the group's own, at a strength from 0 (the survey as it
is) to 1 (nothing but that preference).

A group's preference is a score per option position, z ~ N(0, 1) for positions 0..25, drawn from a
stream seeded by the run's seed and the group's name. On a question with K options it prefers
softmax(TEMPERATURE * z[:K]), and its answer becomes (1 - skew) * answer + skew * preference.

Why this family:
- Every group gets one, trained or held out, so held-out groups are as skewed as training groups:
  the test measures how well a method learns groups that differ, not a shift between training and
  test.
- The preference is on option positions, which the predictor's default features carry, and it is
  the same on every question: a group's few context answers reveal it, so a predictor that
  conditions on the context can follow it, and one that predicts the population's mean cannot.
- It needs nothing but the group's own answers and the seed, so every SuperNode applies it to its
  own bundle's group exactly as the server does.
"""
from __future__ import annotations

import numpy as np

from .data import MAX_OPTIONS, PreferenceData, seeded_rng

TEMPERATURE = 2.0  # how sharply a preference picks its positions (2: often one or two options dominate)


def preference(seed: int, group: str, n_options: int) -> np.ndarray:
    """The group's preferred distribution over a question's first `n_options` positions."""
    scores = TEMPERATURE * seeded_rng(seed, "skew", group).standard_normal(MAX_OPTIONS)[:n_options]
    weights = np.exp(scores - scores.max())
    return weights / weights.sum()


def apply_skew(data: PreferenceData, strength: float, seed: int) -> PreferenceData:
    """The same data with every group's distributions moved toward its preference by `strength`
    (0 returns `data` itself)."""
    if strength == 0:
        return data
    answers = {group: {q: ((1 - strength) * dist + strength * preference(seed, group, len(dist))).astype(dist.dtype)
                       for q, dist in by_question.items()}
               for group, by_question in data.answers.items()}
    return PreferenceData(data.dataset, data.questions, answers, data.dropped, data.unusable)
