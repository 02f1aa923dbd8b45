"""What every training method shares: the prepared run (data, split, embeddings), the model
factory, the held-out evaluation and the baselines. The centralized trainer and the Flower server
both build on this, so their numbers are comparable by construction."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from . import data as D
from .bundle import Bundle, BundleError, read_bundle
from .config import ConfigError, RunConfig
from .data import GroupVectors, PreferenceData, Question
from .embeddings import EmbeddingTable, embed_questions, group_vectors
from .metrics import (alignment_w1, fairness, js_metric, mean_excluding_nan, score_baseline, train_mean_baseline,
                      uniform_prediction)
from .model import GPOPredictor, ModelConfig
from .training import EpisodeSizes, evaluate_group

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    cfg: RunConfig
    data: PreferenceData
    split: D.GroupSplit
    table: EmbeddingTable
    embed_info: dict
    _vectors: dict = field(default_factory=dict, init=False, repr=False)

    def question_ids(self, group: str, part: str = "all") -> list[int]:
        """A group's questions: "all", or for a training group its "train" or "heldback" part."""
        ids = sorted(self.data.answers[group])
        if part == "all":
            return ids
        train, back = D.heldback_split(ids, self.cfg.heldback_fraction, self.cfg.seed, group)
        return train if part == "train" else back

    def vectors(self, group: str, part: str = "all") -> GroupVectors:
        """Built once per (group, part): a client process asks for the same vectors every round."""
        if (group, part) not in self._vectors:
            self._vectors[group, part] = group_vectors(self.data, self.table, group, self.question_ids(group, part))
        return self._vectors[group, part]

    @cached_property
    def eval_vectors(self) -> dict[str, GroupVectors]:
        return {g: self.vectors(g) for g in self.split.eval}

    @property
    def sizes(self) -> EpisodeSizes:
        c = self.cfg
        return EpisodeSizes(c.min_context, c.max_context, c.min_target, c.max_target)

    @property
    def metrics(self) -> dict:
        """The scores every evaluation reports: JS alignment always; GPO's W1 score as well where
        questions have ordinal options (OpinionQA) — NaN, so excluded and counted, for the others."""
        metrics = {"alignment": js_metric}
        ordinal = {q.key: q.ordinal for q in self.data.questions if q.ordinal and len(set(q.ordinal)) > 1}
        if ordinal:
            def w1(key: str, predicted: np.ndarray, true: np.ndarray) -> float:
                return alignment_w1(predicted, true, ordinal[key]) if key in ordinal else math.nan
            metrics["alignment_w1"] = w1
        return metrics

    @property
    def model_config(self) -> ModelConfig:
        c = self.cfg
        return ModelConfig(input_dim=self.table.dim, d_model=c.d_model, embed_depth=c.embed_depth,
                           num_layers=c.num_layers, num_heads=c.num_heads, dim_feedforward=c.dim_feedforward)

    def build_model(self) -> GPOPredictor:
        """The predictor with seeded initial weights (same seed, same start for every method)."""
        torch.manual_seed(self.cfg.seed)
        return GPOPredictor(self.model_config)

    def checkpoint_metadata(self) -> dict:
        """What a checkpoint carries to describe itself (model, embedder, prompt, data, groups)."""
        return {"model_config": dataclasses.asdict(self.model_config), "embedder": self.cfg.embedder,
                "embedding_dim": self.table.dim, "prompt_format": self.table.prompt_format,
                "dataset": self.cfg.dataset, "train_groups": self.split.train, "eval_groups": self.split.eval}

    def evaluate(self, model: GPOPredictor, device: str) -> dict:
        """Few-shot evaluation on every held-out group: pooled score over all (group, question)
        pairs, per-group scores and fairness across groups (a history entry, minus round/steps).
        `eval_seconds` lets the results tell training time from evaluation time."""
        started = time.perf_counter()
        entry: dict = {}
        for name, metric in self.metrics.items():
            per_group, pooled, nan_excluded = {}, [], 0
            for group, vectors in self.eval_vectors.items():
                seed = int(D.seeded_rng(self.cfg.seed, "eval", group).integers(2**31))  # own draws per group
                res = evaluate_group(model, vectors, self.cfg.eval_context, self.cfg.eval_draws,
                                     seed=seed, device=device, metric=metric)
                per_group[group] = res["alignment"]
                pooled += list(res["per_question"].values())
                nan_excluded += res["nan_excluded"]
            prefix = "" if name == "alignment" else name + "_"
            entry[name] = mean_excluding_nan(pooled)[0]
            entry[prefix + "per_group"] = per_group
            entry[prefix + "fairness"] = fairness(per_group)
            entry[prefix + "nan_excluded"] = nan_excluded
        entry["eval_seconds"] = round(time.perf_counter() - started, 3)
        return entry

    def baselines(self) -> dict:
        """Uniform, and the training groups' mean answer per question, scored on the held-out groups.
        The second needs the training groups' answers: where this run does not hold them (a
        deployment's server has only the held-out groups' bundles) it is null, with the reason."""
        keys = [q.key for q in self.data.questions]
        n_options = {q.key: len(q.options) for q in self.data.questions}
        truths = {g: {keys[q]: d for q, d in self.data.answers[g].items()} for g in self.split.eval}
        uniform = {k: uniform_prediction(n) for k, n in n_options.items()}
        scored = score_baseline(uniform, truths, self.metrics["alignment"])
        out = {"uniform": {"alignment": scored["pooled"], "per_group": scored["per_group"]}}
        absent = [g for g in self.split.train if g not in self.data.answers]
        if absent:
            out["train_mean"] = {"alignment": None, "per_group": None, "coverage": None,
                                 "unavailable": "it needs the training groups' answers, which stay on their "
                                                "SuperNodes; this server holds only the held-out groups' bundles"}
            return out
        train = [{keys[q]: self.data.answers[g][q] for q in self.question_ids(g, "train")} for g in self.split.train]
        mean = train_mean_baseline(train, n_options)
        scored = score_baseline(mean.predictions, truths, self.metrics["alignment"])
        out["train_mean"] = {"alignment": scored["pooled"], "per_group": scored["per_group"], "coverage": mean.coverage}
        return out


def baseline_summary(baselines: dict) -> str:
    """One line for printouts: "uniform 0.9012, train-mean 0.9301 (coverage 100%)", or the reason
    the train-mean baseline is unavailable."""
    mean = baselines["train_mean"]
    text = (f"train-mean {mean['alignment']:.4f} (coverage {mean['coverage']:.0%})" if mean["alignment"] is not None
            else f"train-mean unavailable ({mean['unavailable']})")
    return f"uniform {baselines['uniform']['alignment']:.4f}, {text}"


def prepare_experiment(cfg: RunConfig, progress: bool = True) -> Experiment:
    """Load and split the data and embed its questions (cached), validating before any training.
    With run-config `eval-bundles` (a deployment's server) only the held-out groups' bundles are read."""
    if cfg.eval_bundles:
        bundles = [read_bundle(p) for p in cfg.bundle_paths]
        return bundle_experiment(cfg, bundles, _deployment_split(cfg, bundles))
    data, split = D.prepare(cfg)
    table, info = embed_questions(data.questions, cfg.embedder, cache_dir=cfg.cache_path,
                                  device=resolve_device(cfg.device), progress=progress)
    log.info("embeddings: %s", info)
    return Experiment(cfg, data, split, table, info)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run-config device='cuda' but no CUDA device is available; use device='auto' or 'cpu'")
    return device


def bundle_experiment(cfg: RunConfig, bundles: list[Bundle], split: D.GroupSplit) -> Experiment:
    """An Experiment over bundles only: a SuperNode's own group, or the server's held-out groups.

    Their questions keep the run's order (each bundle records every question's position in it), so
    `vectors`, the held-back split and `evaluate` give exactly what the whole dataset gives."""
    if not bundles:
        raise BundleError("no bundles given")
    first = bundles[0]
    by_index: dict[int, tuple[Question, np.ndarray, Path]] = {}
    for b in bundles:
        if (b.embedder, b.dataset) != (cfg.embedder, cfg.dataset):
            raise BundleError(f"bundle {b.path} holds {b.dataset} embedded with {b.embedder!r}, but the run-config "
                              f"says dataset={cfg.dataset!r} embedder={cfg.embedder!r}; rebuild the bundle with the "
                              "run's run-config (`pluralllm bundle -c ...`) or run with the bundle's settings")
        if (b.prompt_format, b.dim) != (first.prompt_format, first.dim):
            raise BundleError(f"bundles {first.path} and {b.path} differ in prompt format or embedding size; "
                              "build every bundle of a run with the same run-config")
        rows = np.split(b.vectors.x, b.vectors.offsets[1:-1])
        for question, index, x in zip(b.questions, b.indices, rows):
            seen = by_index.setdefault(index, (question, x, b.path))
            if seen[0] != question:
                raise BundleError(f"bundles {seen[2]} and {b.path} disagree on question {index} ({seen[0].key!r} vs "
                                  f"{question.key!r}): they were built with different run-configs; rebuild them")
    order = sorted(by_index)
    position = {index: p for p, index in enumerate(order)}
    answers: dict[str, dict[int, np.ndarray]] = {}
    for b in bundles:
        if b.group in answers:
            raise BundleError(f"two bundles of group {b.group!r} given ({b.path} and another); give one")
        answers[b.group] = {position[i]: y for i, y in zip(b.indices, np.split(b.vectors.y, b.vectors.offsets[1:-1]))}
    questions = [by_index[i][0] for i in order]
    data = PreferenceData(first.dataset, questions, answers)
    offsets = np.concatenate([[0], np.cumsum([len(q.options) for q in questions])]).astype(np.int64)
    table = EmbeddingTable(first.embedder, first.dim, first.prompt_format, [q.key for q in questions],
                           np.concatenate([by_index[i][1] for i in order]), offsets)
    return Experiment(cfg, data, split, table, {"bundles": [str(b.path) for b in bundles]})


def _deployment_split(cfg: RunConfig, bundles: list[Bundle]) -> D.GroupSplit:
    """The server's split when it holds only held-out bundles: the training groups as the run-config
    names them (or the dataset's default split), the held-out groups those of the bundles."""
    train, named_eval = cfg.group_list("train_groups"), cfg.group_list("eval_groups")
    if "auto" in (train, named_eval):
        raise ConfigError("run-config train-groups/eval-groups 'auto' needs the whole dataset; with eval-bundles "
                          "name the groups, e.g. train-groups='A,B,C'")
    if train == "":
        train = D.default_split(cfg.dataset).train
    held = [b.group for b in bundles]
    if named_eval and sorted(named_eval) != sorted(held):
        raise ConfigError(f"run-config eval-groups {named_eval} differ from the groups of eval-bundles {held}")
    overlap = sorted(set(train) & set(held))
    if overlap:
        raise ConfigError(f"eval-bundles hold training group(s) {overlap}: the server evaluates on held-out groups "
                          "only; give their bundles to their SuperNodes instead")
    return D.GroupSplit(list(train), list(named_eval or held))
