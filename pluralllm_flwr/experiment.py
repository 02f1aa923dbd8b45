"""What every training method shares: the prepared run (data, split, embeddings), the model
factory, the held-out evaluation and the baselines. The centralized trainer and the Flower server
both build on this, so their numbers are comparable by construction."""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from . import data as D
from .config import ConfigError, RunConfig
from .data import GroupVectors, PreferenceData
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

    def question_ids(self, group: str, part: str = "all") -> list[int]:
        """A group's questions: "all", or for a training group its "train" or "heldback" part."""
        ids = sorted(self.data.answers[group])
        if part == "all":
            return ids
        train, back = D.heldback_split(ids, self.cfg.heldback_fraction, self.cfg.seed, group)
        return train if part == "train" else back

    def vectors(self, group: str, part: str = "all") -> GroupVectors:
        return group_vectors(self.data, self.table, group, self.question_ids(group, part))

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
        pairs, per-group scores and fairness across groups (a history entry, minus round/steps)."""
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
        return entry

    def baselines(self) -> dict:
        """Uniform, and the training groups' mean answer per question, scored on the held-out groups."""
        keys = [q.key for q in self.data.questions]
        n_options = {q.key: len(q.options) for q in self.data.questions}
        truths = {g: {keys[q]: d for q, d in self.data.answers[g].items()} for g in self.split.eval}
        train = [{keys[q]: self.data.answers[g][q] for q in self.question_ids(g, "train")} for g in self.split.train]
        mean = train_mean_baseline(train, n_options)
        uniform = {k: uniform_prediction(n) for k, n in n_options.items()}
        out = {}
        for name, predictions in (("uniform", uniform), ("train_mean", mean.predictions)):
            scored = score_baseline(predictions, truths, self.metrics["alignment"])
            out[name] = {"alignment": scored["pooled"], "per_group": scored["per_group"]}
        out["train_mean"]["coverage"] = mean.coverage
        return out


def prepare_experiment(cfg: RunConfig, progress: bool = True) -> Experiment:
    """Load and split the data and embed its questions (cached), validating before any training."""
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
