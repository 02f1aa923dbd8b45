"""What every training method shares: the prepared run (data, split, embeddings), the model
factory, the held-out evaluation and the baselines. The centralized trainer and the Flower server
both build on this, so their numbers are comparable by construction."""
from __future__ import annotations

import dataclasses
import logging
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
from .features import option_features
from .evaluation import HeldOutGroup, evaluate_baselines, evaluate_model
from .metrics import OrdinalW1, QuestionMetric, js_metric, train_mean_baseline
from .model import ModelConfig, Predictor
from .predictors import build_predictor
from .results import BASELINE_NAMES
from .skew import apply_skew
from .training import EpisodeSizes, draw_contexts

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    cfg: RunConfig
    data: PreferenceData
    split: D.GroupSplit
    table: EmbeddingTable
    embed_info: dict
    unseen: frozenset[int] | None = None   # given by bundles; else drawn from run-config heldout-questions
    _vectors: dict = field(default_factory=dict, init=False, repr=False)

    def question_ids(self, group: str, part: str = "all") -> list[int]:
        """A group's questions: "all"; "seen" (all but the run's unseen questions) and "unseen"; for a
        training group its "train" or "heldback" part of the seen ones."""
        ids = sorted(self.data.answers[group])
        if part == "all":
            return ids
        if part in ("seen", "unseen"):
            return [i for i in ids if (i in self.unseen_questions) == (part == "unseen")]
        seen = [i for i in ids if i not in self.unseen_questions]
        train, back = D.heldback_split(seen, self.cfg.heldback_fraction, self.cfg.seed, group)
        return train if part == "train" else back

    @cached_property
    def unseen_questions(self) -> frozenset[int]:
        """Questions no training group trains on (run-config heldout-questions), by their run index."""
        if self.unseen is not None:
            return self.unseen
        return frozenset(D.unseen_question_ids(len(self.data.questions), self.cfg.heldout_questions, self.cfg.seed))

    def vectors(self, group: str, part: str = "all") -> GroupVectors:
        """Built once per (group, part): a client process asks for the same vectors every round."""
        if (group, part) not in self._vectors:
            self._vectors[group, part] = group_vectors(self.data, self.features, group, self.question_ids(group, part))
        return self._vectors[group, part]

    @cached_property
    def features(self) -> EmbeddingTable:
        """What the predictor reads per option: run-config `features` of the embeddings in `table`.
        Each question's features depend on its own vectors only, so a SuperNode computes from its
        bundle exactly what the server computes from the whole table."""
        return option_features(self.table, self.cfg.features)

    @cached_property
    def heldout(self) -> list[HeldOutGroup]:
        """Every held-out group's evaluation material: seen and unseen questions, seeded context draws."""
        out = []
        for g in self.split.eval:
            seen = self.vectors(g, "seen")
            if seen.num_questions <= self.cfg.eval_context:
                raise D.DataError(f"held-out group {g!r} has {seen.num_questions} questions outside the unseen ones, "
                                  f"but evaluation needs more than eval-context={self.cfg.eval_context}; lower "
                                  "heldout-questions or eval-context")
            seed = int(D.seeded_rng(self.cfg.seed, "eval", g).integers(2**31))  # own draws per group
            unseen = self.vectors(g, "unseen") if self.unseen_questions else None
            out.append(HeldOutGroup(g, seen, unseen, seed,
                                    draw_contexts(seen.num_questions, self.cfg.eval_context, self.cfg.eval_draws, seed)))
        return out

    @property
    def sizes(self) -> EpisodeSizes:
        c = self.cfg
        return EpisodeSizes(c.min_context, c.max_context, c.min_target, c.max_target)

    @cached_property
    def metrics(self) -> dict:
        """The scores every evaluation reports: JS alignment always; GPO's W1 score as well where
        questions have ordinal options (OpinionQA) — NaN, so excluded and counted, for the others."""
        metrics: dict[str, QuestionMetric] = {"alignment": js_metric}
        ordinal = {q.key: q.ordinal for q in self.data.questions if q.ordinal and len(set(q.ordinal)) > 1}
        if ordinal:
            metrics["alignment_w1"] = OrdinalW1(ordinal)
        return metrics

    @property
    def model_config(self) -> ModelConfig:
        c = self.cfg
        return ModelConfig(input_dim=self.features.dim, architecture=c.model, d_model=c.d_model,
                           embed_depth=c.embed_depth, num_layers=c.num_layers, num_heads=c.num_heads,
                           dim_feedforward=c.dim_feedforward, prototypes=c.prototypes,
                           inference_steps=c.inference_steps)

    def build_model(self) -> Predictor:
        """The predictor with seeded initial weights (same seed, same start for every method)."""
        return build_predictor(self.model_config, seed=self.cfg.seed)

    def checkpoint_metadata(self) -> dict:
        """What a checkpoint carries to describe itself (the model config, which names the
        architecture; embedder, features, prompt, data, groups)."""
        return {"model_config": dataclasses.asdict(self.model_config), "embedder": self.cfg.embedder,
                "embedding_dim": self.table.dim, "features": self.cfg.features, "prompt_format": self.table.prompt_format,
                "dataset": self.cfg.dataset, "train_groups": self.split.train, "eval_groups": self.split.eval}

    def evaluate(self, model: Predictor, device: str) -> dict:
        """Few-shot evaluation on every held-out group (`evaluation.evaluate_model`): a history entry,
        minus round/steps. `eval_seconds` lets the results tell training time from evaluation time."""
        started = time.perf_counter()
        entry = evaluate_model(model, self.heldout, self.metrics, device, self.cfg.context_sizes)
        entry["eval_seconds"] = round(time.perf_counter() - started, 3)
        return entry

    def baselines(self) -> dict:
        """The baselines on the model's own draws (`evaluation.evaluate_baselines`). All but uniform
        need the training groups' answers: where this run does not hold them (a deployment's server
        has only the held-out groups' bundles) they are null, with the reason."""
        n_options = {q.key: len(q.options) for q in self.data.questions}
        if any(g not in self.data.answers for g in self.split.train):
            return evaluate_baselines(self.heldout, None, None, n_options)
        keys = [q.key for q in self.data.questions]
        train = [{keys[q]: self.data.answers[g][q] for q in self.question_ids(g, "train")} for g in self.split.train]
        return evaluate_baselines(self.heldout, train, train_mean_baseline(train, n_options), n_options)


def baseline_summary(baselines: dict) -> str:
    """One line for printouts: "uniform 0.8060, train-mean 0.9486, nearest group 0.9469, context
    mixture 0.9628", or why those needing the training groups' answers are unavailable."""
    shown = [f"{BASELINE_NAMES.get(n, n)} {b['alignment']:.4f}" for n, b in baselines.items() if b["alignment"] is not None]
    missing = [BASELINE_NAMES.get(n, n) for n, b in baselines.items() if b["alignment"] is None]
    if missing:
        reason = next(b["unavailable"] for b in baselines.values() if b["alignment"] is None)
        shown.append(f"{', '.join(missing)} unavailable ({reason})")
    return ", ".join(shown)


def fmt_gain(entry: dict) -> str:
    """An entry's conditioning gain for one-line printouts ("+0.0123", or "n/a" where it does not apply)."""
    gain = entry.get("conditioning_gain")
    return "n/a" if gain is None else f"{gain:+.4f}"


def prepare_experiment(cfg: RunConfig, progress: bool = True) -> Experiment:
    """Load and split the data and embed its questions (cached), validating before any training.
    With run-config `eval-bundles` (a deployment's server) only the held-out groups' bundles are read."""
    if cfg.eval_bundles:
        bundles = [read_bundle(p) for p in cfg.bundle_paths]
        return bundle_experiment(cfg, bundles, _deployment_split(cfg, bundles))
    data, split = D.prepare(cfg)
    data = apply_skew(data, cfg.skew, cfg.seed)
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
        settings = {"features": (b.features, cfg.features),
                    "heldout-questions": (b.heldout_questions, cfg.heldout_questions), "skew": (b.skew, cfg.skew)}
        if b.heldout_questions or b.skew:
            settings["seed"] = (b.split_seed, cfg.seed)
        wrong = {k: v for k, v in settings.items() if v[0] != v[1]}
        if wrong:
            raise BundleError(f"bundle {b.path} was written for " + ", ".join(f"{k}={v[0]!r}" for k, v in wrong.items())
                              + " but the run-config says " + ", ".join(f"{k}={v[1]!r}" for k, v in wrong.items())
                              + "; rebuild the bundle with the run's run-config (`pluralllm bundle -c ...`)")
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
    unseen = frozenset(position[i] for b in bundles for i in b.unseen)
    return Experiment(cfg, data, split, table, {"bundles": [str(b.path) for b in bundles]}, unseen)


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
