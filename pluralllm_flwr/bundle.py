"""Per-group data bundles: all that a deployed SuperNode holds — one group's questions, its answer
distributions and the questions' option embeddings, and nothing of any other group.

A bundle is one safetensors file: tensors `x` [n_options, dim], `y` [n_options] and `offsets`
[n_questions + 1] (a `GroupVectors`), and JSON metadata naming the group, dataset, embedder,
embedding dimension and prompt format, and listing the questions in the run's question order with
their position in it. Rows stay in that order, so a node derives its training / held-back split by
position exactly as the simulation does from the whole dataset (`data.heldback_split`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .data import GroupVectors, Question
from .embeddings import group_vectors

if TYPE_CHECKING:
    from .experiment import Experiment

FORMAT = "pluralllm-bundle-v2"  # v2: features, unseen questions
METADATA_KEY = "pluralllm-bundle"
SUFFIX = ".bundle.safetensors"
_REBUILD = "write it again with `pluralllm bundle -c \"<the run's run-config>\" --group <name>`"


class BundleError(ValueError):
    """A bundle that is missing, unreadable, damaged or built for another run; says how to fix it."""


@dataclass
class Bundle:
    path: Path
    group: str
    dataset: str
    embedder: str
    prompt_format: str
    questions: list[Question]
    indices: list[int]       # each question's position in the prepared run's question list
    vectors: GroupVectors
    features: str = "raw"    # the option features of the run that wrote it (computed from `vectors`)
    unseen: frozenset[int] = frozenset()  # run indices of its questions no training group trains on
    split_seed: int = 0      # the seed the unseen questions were drawn with
    heldout_questions: float = 0.0
    skew: float = 0.0        # run-config skew its answers were written with (skew.py)

    @property
    def dim(self) -> int:
        return int(self.vectors.x.shape[1])


def safe_name(group: str) -> str:
    """A group name usable in file names (group names hold spaces, '$', '/', ...)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", group).strip("_")


def bundle_filename(group: str) -> str:
    return safe_name(group) + SUFFIX


def write_bundle(exp: "Experiment", group: str, path: str | Path) -> Path:
    """One group's bundle from a prepared run (all its questions: the node splits them itself)."""
    if group not in exp.data.answers:
        raise BundleError(f"group {group!r} is not part of this run; its groups are "
                          f"{exp.split.train + exp.split.eval}")
    ids = sorted(exp.data.answers[group])
    vectors = group_vectors(exp.data, exp.table, group, ids)
    tensors = {"x": np.ascontiguousarray(vectors.x, np.float32), "y": np.ascontiguousarray(vectors.y, np.float32),
               "offsets": np.ascontiguousarray(vectors.offsets, np.int64)}
    meta = {"format": FORMAT, "group": group, "dataset": exp.data.dataset, "embedder": exp.cfg.embedder,
            "embedding_dim": exp.table.dim, "prompt_format": exp.table.prompt_format, "sha256": _digest(tensors),
            "features": exp.cfg.features, "heldout_questions": exp.cfg.heldout_questions, "seed": exp.cfg.seed,
            "skew": exp.cfg.skew,
            "questions": [{"key": q.key, "text": q.text, "options": list(q.options),
                           "ordinal": None if q.ordinal is None else list(q.ordinal), "index": i,
                           "unseen": i in exp.unseen_questions}
                          for i, q in ((i, exp.data.questions[i]) for i in ids)]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)  # a reader never sees half a bundle
    return path


def write_bundles(exp: "Experiment", groups: list[str], out_dir: str | Path) -> dict[str, Path]:
    """One bundle per group into out_dir (file names from `bundle_filename`)."""
    names = {g: bundle_filename(g) for g in groups}
    clash = sorted({n for n in names.values() if list(names.values()).count(n) > 1})
    if clash:
        raise BundleError(f"groups {[g for g, n in names.items() if n in clash]} map to the same file name; "
                          "write them into separate folders")
    return {g: write_bundle(exp, g, Path(out_dir) / n) for g, n in names.items()}


def read_bundle(path: str | Path) -> Bundle:
    """Load and check a bundle; every problem becomes a BundleError naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"bundle {path} does not exist; {_REBUILD} and give its absolute path")
    try:
        with safe_open(str(path), "np") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise BundleError(f"bundle {path} is damaged or not a safetensors file ({type(exc).__name__}: {exc}); "
                          f"{_REBUILD}") from None
    if raw is None:
        raise BundleError(f"{path} is a safetensors file but not a PluralLLM bundle (no {METADATA_KEY!r} metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BundleError(f"bundle {path}: its metadata is not valid JSON ({exc}); {_REBUILD}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise BundleError(f"bundle {path} has format {found!r}, this version reads {FORMAT!r}; {_REBUILD}")
    try:
        x, y, offsets = tensors["x"], tensors["y"], tensors["offsets"]
        questions = [Question(q["key"], q["text"], tuple(q["options"]),
                              None if q["ordinal"] is None else tuple(q["ordinal"])) for q in meta["questions"]]
        indices = [int(q["index"]) for q in meta["questions"]]
        group, digest = str(meta["group"]), meta["sha256"]
        bundle = Bundle(path, group, str(meta["dataset"]), str(meta["embedder"]), str(meta["prompt_format"]),
                        questions, indices, GroupVectors(group, [q.key for q in questions], x, y, offsets),
                        str(meta["features"]), frozenset(int(q["index"]) for q in meta["questions"] if q["unseen"]),
                        int(meta["seed"]), float(meta["heldout_questions"]),
                        float(meta.get("skew", 0.0)))  # bundles written before skew existed hold skew 0
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"bundle {path} lacks or garbles a field ({type(exc).__name__}: {exc}); {_REBUILD}") from None
    if _digest(tensors) != digest:
        raise BundleError(f"bundle {path} is damaged: its contents do not match the checksum written with it; "
                          f"{_REBUILD}")
    _check_shapes(bundle, int(meta["embedding_dim"]))
    return bundle


def _check_shapes(b: Bundle, dim: int) -> None:
    v = b.vectors
    counts = np.diff(v.offsets)
    problems = []
    if v.x.ndim != 2 or v.x.shape[1] != dim or v.y.shape != (v.x.shape[0],):
        problems.append(f"x {v.x.shape} and y {v.y.shape} for {dim}-d embeddings")
    if len(v.offsets) != len(b.questions) + 1 or v.offsets[0] != 0 or v.offsets[-1] != len(v.y):
        problems.append(f"{len(v.offsets)} offsets for {len(b.questions)} questions and {len(v.y)} rows")
    elif any(c != len(q.options) for c, q in zip(counts, b.questions)):
        problems.append("option counts differ from the questions'")
    if b.indices != sorted(set(b.indices)):
        problems.append("questions not in the run's order")
    if problems:
        raise BundleError(f"bundle {b.path} is inconsistent ({'; '.join(problems)}); {_REBUILD}")


def _digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    return h.hexdigest()
