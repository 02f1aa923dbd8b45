"""Option features: what the predictor reads for each (question, option), computed from its vectors.

GPO's prompt repeats the whole question for every option, so a question's option vectors are nearly
identical (MiniLM: cosine 0.99 within a question) and only a sliver of their variance tells the
options apart (`separation`). The features below pull the two apart:

- "raw": the embedding as it is (GPO's input, for the paper's reproduction);
- "question-option": [question vector ; option residual], where the question vector is the mean of
  its options' vectors and the residual is an option's vector minus that mean, each block scaled to
  unit root-mean-square within the question;
- "question-option-position": the same plus the option's place in its list (0 for the first, 1 for
  the last) and 1 / the number of options (survey options are ordered: "very" ... "not at all").

Every feature of a question is a function of that question's own vectors alone — no statistic over
other questions or over anyone's answers — so a SuperNode holding one group's bundle computes
exactly what the server and every other node compute (a test checks).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .embeddings import EmbeddingTable

FEATURES = ("raw", "question-option", "question-option-position")
_EPS = 1e-8


def feature_dim(embedding_dim: int, features: str) -> int:
    """The width of the features built from `embedding_dim`-d vectors."""
    check_features(features)
    return {"raw": embedding_dim, "question-option": 2 * embedding_dim,
            "question-option-position": 2 * embedding_dim + 2}[features]


def check_features(features: str) -> None:
    if features not in FEATURES:
        raise ValueError(f"unknown option features {features!r}; known: {list(FEATURES)}")


def option_features(table: EmbeddingTable, features: str) -> EmbeddingTable:
    """The table with its vectors replaced by `features` (a table already holding features is an error)."""
    check_features(features)
    if table.features != "raw":
        raise ValueError(f"this table already holds {table.features!r} features; build features from raw vectors")
    if features == "raw":
        return table
    x = table.vectors.astype(np.float64)
    counts = np.diff(table.offsets)
    if (counts < 1).any():
        raise ValueError("every question needs at least one option to build option features")
    question = np.repeat(np.arange(len(counts)), counts)
    mean = np.add.reduceat(x, table.offsets[:-1], axis=0) / counts[:, None]
    residual = x - mean[question]
    mean_scale = np.sqrt((mean ** 2).mean(1, keepdims=True)) + _EPS
    residual_scale = np.sqrt(np.add.reduceat((residual ** 2).mean(1), table.offsets[:-1]) / counts)[:, None] + _EPS
    blocks = [(mean / mean_scale)[question], residual / residual_scale[question]]
    if features == "question-option-position":
        place = np.arange(len(x)) - table.offsets[:-1][question]
        blocks.append(np.stack([place / np.maximum(counts[question] - 1, 1), 1.0 / counts[question]], 1))
    vectors = np.concatenate(blocks, 1).astype(np.float32)
    return dataclasses.replace(table, dim=vectors.shape[1], vectors=vectors, features=features)


def separation(table: EmbeddingTable, max_pairs: int = 20000, seed: int = 0) -> dict:
    """How well the vectors tell a question's options apart: the mean cosine between two options of
    the same question, the mean cosine between two questions' mean vectors (a seeded sample of
    pairs), and the share of the vectors' variance that lies within questions (options vs their
    question's mean)."""
    x = table.vectors.astype(np.float64)
    counts = np.diff(table.offsets)
    question = np.repeat(np.arange(len(counts)), counts)
    unit = x / (np.linalg.norm(x, axis=1, keepdims=True) + _EPS)
    sums = np.add.reduceat(unit, table.offsets[:-1], axis=0)
    multi = counts > 1   # Σ_{i≠j} cos(i, j) = ‖Σ u‖² − n for unit vectors
    within = ((sums[multi] ** 2).sum(1) - counts[multi]) / (counts[multi] * (counts[multi] - 1))
    mean = np.add.reduceat(x, table.offsets[:-1], axis=0) / counts[:, None]
    rng = np.random.default_rng(seed)
    a, b = rng.integers(len(mean), size=(2, max_pairs))
    a, b = a[a != b], b[a != b]
    mean_unit = mean / (np.linalg.norm(mean, axis=1, keepdims=True) + _EPS)
    total = ((x - x.mean(0)) ** 2).sum()
    return {"within_question_cosine": float(within.mean()) if multi.any() else float("nan"),
            "between_question_cosine": float((mean_unit[a] * mean_unit[b]).sum(1).mean()) if len(a) else float("nan"),
            "within_question_variance_share": float(((x - mean[question]) ** 2).sum() / total) if total > 0 else float("nan"),
            "questions": int(len(counts)), "options": int(len(x)), "dim": int(x.shape[1])}
