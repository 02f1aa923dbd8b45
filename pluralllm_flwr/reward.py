"""The trained predictor as a group-conditioned reward model (PluralLLM's use of GPO as a reward).

A group is described by a few questions it answered (a `GroupContext`); the checkpoint predicts
its answer distribution on new multiple-choice questions, embedded with the checkpoint's own
embedder. Rewards: a completion that picks option i earns a group's predicted probability of i, or,
given a reference policy's answer distribution, the log-ratio beta·log(p_g(i) / reference(i)), whose
optimum under a KL penalty beta to that reference is the group's distribution itself (align.py); a
whole answer distribution earns 1 − JS distance to the prediction (`metrics.alignment`).
Several groups are combined by `mean`, `min` or `adaptive` (see `GroupAggregator`), and
`make_trl_reward` wraps it all as a reward function for TRL's trainers.

File formats of `pluralllm score` (UTF-8 JSON):
  context file: one group, {"group": "France", "answers": [{"question": "...", "options": ["Yes",
      "No"], "distribution": [0.3, 0.7]}, ...]}, or a list of such objects for several groups.
      A distribution has one non-negative value per option and sums to 1 (within 1%; renormalised).
  questions file: [{"question": "...", "options": ["A lot", "Some", "Not at all"]}, ...]; an entry
      may carry a "key" (default: a hash of its text and options) that names it in the output.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import SUM_TOLERANCE, DataError, GroupVectors, Question, check_options
from .embeddings import LETTERS, PROMPT_FORMAT, embed_questions
from .experiment import resolve_device
from .metrics import alignment
from .features import FEATURES, feature_dim, option_features
from .model import ModelConfig, Predictor
from .predictors import ARCHITECTURES, build_predictor
from .results import load_checkpoint
from .training import predict

AGGREGATES = ("mean", "min", "adaptive")
_TINY = 1e-12  # floor of a probability inside a log-ratio reward
REQUIRED_METADATA = ("model_config", "embedder", "embedding_dim", "prompt_format")


class RewardModelError(ValueError):
    """A checkpoint, group context, question or file the reward model cannot use; says which and why."""


# ----------------------------------------------------------------------------- groups and questions


def check_question(question: Question, where: str) -> None:
    """Raise unless the question can be embedded and answered by letter: text, 2..26 distinct options."""
    if not isinstance(question, Question):
        raise RewardModelError(f"{where}: expected a data.Question, got {type(question).__name__}")
    if not question.text.strip():
        raise RewardModelError(f"{where}: the question text is empty")
    try:
        check_options(question.options, where)  # the loaders' check
    except DataError as exc:
        raise RewardModelError(str(exc)) from None


def check_distribution(values: Iterable[float], question: Question, where: str) -> np.ndarray:
    """The group's answer distribution as float64, renormalised; one value per option, non-negative,
    summing to 1 within `data.SUM_TOLERANCE` (the loaders' tolerance)."""
    try:
        dist = np.asarray(list(values), dtype=np.float64)
    except (TypeError, ValueError):
        raise RewardModelError(f"{where}: the distribution must be a list of numbers, got {values!r}") from None
    if dist.ndim != 1 or len(dist) != len(question.options):
        raise RewardModelError(f"{where}: the distribution has {dist.size} values but the question has "
                               f"{len(question.options)} options {list(question.options)}")
    if not np.isfinite(dist).all() or (dist < 0).any():
        raise RewardModelError(f"{where}: the distribution must be finite and non-negative, got {dist.tolist()}")
    if abs(dist.sum() - 1) > SUM_TOLERANCE:
        raise RewardModelError(f"{where}: the distribution sums to {dist.sum():.4f}; it must sum to 1 "
                               f"(within {SUM_TOLERANCE:.0%})")
    return dist / dist.sum()


@dataclass
class GroupContext:
    """A group's few-shot evidence: questions it answered, each with its answer distribution.
    Validated and normalised on construction, so a bad context fails before any model runs."""

    name: str
    answers: Sequence[tuple[Question, Sequence[float]]]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise RewardModelError(f"a group context needs a non-empty name, got {self.name!r}")
        if not self.answers:
            raise RewardModelError(f"group {self.name!r}: the context needs at least one answered question")
        checked = []
        for i, pair in enumerate(self.answers):
            where = f"group {self.name!r}, answer {i}"
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise RewardModelError(f"{where}: expected a (Question, distribution) pair")
            question, dist = pair
            check_question(question, where)
            checked.append((question, check_distribution(dist, question, f"{where} ({question.text[:60]!r})")))
        self.answers = tuple(checked)


def question_key(text: str, options: Sequence[str]) -> str:
    """A stable key from a question's content, for questions that come without one."""
    return "q-" + hashlib.sha256(json.dumps([text, list(options)], ensure_ascii=False).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the model


class GroupRewardModel:
    """A trained predictor plus the embedder its checkpoint was trained with."""

    def __init__(self, model: Predictor, metadata: dict, *, cache_dir: str | Path | None = None,
                 device: str = "auto", progress: bool = False) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.metadata = metadata
        self.embedder: str = metadata["embedder"]
        self.embedding_dim: int = int(metadata["embedding_dim"])
        self.features: str = metadata.get("features", "raw")  # checkpoints before option features read raw vectors
        self.cache_dir = cache_dir
        self.progress = progress

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, embedder: str | None = None, embedding_dim: int | None = None,
                        cache_dir: str | Path | None = None, device: str = "auto",
                        progress: bool = False) -> "GroupRewardModel":
        """Load a training run's `best.safetensors`/`last.safetensors`. `embedder`/`embedding_dim`,
        when given, are what the caller expects; a checkpoint trained otherwise is an error."""
        state, meta = load_checkpoint(path)
        return cls.from_state(state, meta, where=f"checkpoint {path}", embedder=embedder, embedding_dim=embedding_dim,
                              cache_dir=cache_dir, device=device, progress=progress)

    @classmethod
    def from_state(cls, state: Mapping, meta: dict, *, where: str, embedder: str | None = None,
                   embedding_dim: int | None = None, cache_dir: str | Path | None = None, device: str = "auto",
                   progress: bool = False) -> "GroupRewardModel":
        """A checkpoint's weights and metadata, checked (`where` names them in errors): from a file, or
        as a federated reward request carries them (reward_queries.py)."""
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise RewardModelError(f"{where} lacks metadata {missing}; use a best/last.safetensors "
                                   "written by this project's training (pluralllm centralized / simulate)")
        if meta["prompt_format"] != PROMPT_FORMAT:
            raise RewardModelError(f"{where} was trained on prompt format {meta['prompt_format']!r}, "
                                   f"but this code embeds with {PROMPT_FORMAT!r}; retrain it with this version")
        if embedder is not None and embedder != meta["embedder"]:
            raise RewardModelError(f"{where} was trained with embedder {meta['embedder']!r}, "
                                   f"not the {embedder!r} asked for; pass embedder={meta['embedder']!r} "
                                   "or another checkpoint")
        if embedding_dim is not None and int(embedding_dim) != int(meta["embedding_dim"]):
            raise RewardModelError(f"{where} expects {meta['embedding_dim']}-d embeddings, "
                                   f"not the {embedding_dim}-d asked for")
        try:
            config = ModelConfig(**meta["model_config"])
        except (TypeError, ValueError) as exc:
            raise RewardModelError(f"{where}: bad model_config {meta['model_config']}: {exc}") from None
        features = meta.get("features", "raw")
        if features not in FEATURES or config.architecture not in ARCHITECTURES:
            raise RewardModelError(f"{where} holds architecture {config.architecture!r} on features "
                                   f"{features!r}; this version knows {sorted(ARCHITECTURES)} and {list(FEATURES)}")
        if config.input_dim != feature_dim(int(meta["embedding_dim"]), features):
            raise RewardModelError(f"{where}: model input_dim {config.input_dim} differs from the width of "
                                   f"{features!r} features of its {meta['embedding_dim']}-d embeddings (its own metadata)")
        model = build_predictor(config)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())
            raise RewardModelError(f"{where}: weights do not fit its model_config: "
                                   f"{detail[:300]}") from None
        return cls(model, meta, cache_dir=cache_dir, device=device, progress=progress)

    def predict(self, context: GroupContext, questions: Sequence[Question]) -> list[np.ndarray]:
        """The group's predicted answer distribution for each question (float64, sums to 1)."""
        return self.predict_groups([context], questions)[context.name]

    def predict_groups(self, contexts: Sequence[GroupContext],
                       questions: Sequence[Question]) -> dict[str, list[np.ndarray]]:
        """`predict` for several groups, with one embedding pass over every question involved."""
        names = [c.name for c in contexts]
        if not contexts:
            return {}
        if len(set(names)) != len(names):
            raise RewardModelError(f"group names must be unique, got {names}")
        for i, q in enumerate(questions):
            check_question(q, f"question {i} ({q.text[:60]!r})" if isinstance(q, Question) else f"question {i}")
        row_of: dict[tuple, int] = {}  # content -> row in the table; the vectors depend on nothing else
        unique: list[Question] = []
        for q in [q for c in contexts for q, _ in c.answers] + list(questions):
            if row_of.setdefault((q.text, q.options), len(unique)) == len(unique):
                unique.append(q)
        table, _ = embed_questions(unique, self.embedder, cache_dir=self.cache_dir, device=self.device,
                                   progress=self.progress)
        if table.dim != self.embedding_dim:
            raise RewardModelError(f"embedder {self.embedder!r} now gives {table.dim}-d vectors, but the checkpoint "
                                   f"was trained on {self.embedding_dim}-d ones; it no longer names the same model")
        table = option_features(table, self.features)
        every = GroupVectors("", table.keys, table.vectors, np.zeros(len(table.vectors), np.float32), table.offsets)
        targets = every.subset([row_of[(q.text, q.options)] for q in questions])
        out = {}
        for c in contexts:
            context = every.subset([row_of[(q.text, q.options)] for q, _ in c.answers])
            context.y = np.concatenate([d for _, d in c.answers]).astype(np.float32)
            predicted = predict(self.model, context, targets, self.device)
            out[c.name] = [p.astype(np.float64) / p.sum(dtype=np.float64) for p in predicted]
        return out


# ----------------------------------------------------------------------------- rewards


class GroupAggregator:
    """Combines per-group rewards [samples, groups] into one reward per sample.

    mean: the average over groups. min: the worst group's reward (egalitarian, ignores the rest).
    adaptive: Σ_g w_g·r_g with w = softmax(−running/temperature), where running_g is an
    exponential moving average (weight `momentum` on the past) of the rewards group g received
    in earlier batches, started at the first batch's mean. It interpolates between the two
    (temperature → ∞: mean; → 0: all weight on the group served worst so far) and moves weight
    to the groups the policy currently serves worst, in the spirit of the PluralLLM authors'
    adaptive aggregation for federated RLHF (arXiv 2512.08786); their exact rule is not reproduced.
    Weights are those before a batch's own update, so a batch's reward never depends on itself.

    With `batch_updates=False` the batches move nothing: the trainer sets the running averages to
    their exact expectations under its current policy instead (`observe`, fed by
    `GroupReward.expected_rewards`), which a few sampled completions per batch estimate only noisily.
    """

    def __init__(self, groups: Sequence[str], mode: str = "mean", temperature: float = 0.05,
                 momentum: float = 0.9, batch_updates: bool = True) -> None:
        if mode not in AGGREGATES:
            raise RewardModelError(f"unknown aggregate {mode!r}; use one of {', '.join(AGGREGATES)}")
        if not groups or len(set(groups)) != len(groups):
            raise RewardModelError(f"aggregation needs distinct group names, got {list(groups)}")
        if not temperature > 0 or not 0 <= momentum < 1:
            raise RewardModelError(f"temperature={temperature} must be > 0 and momentum={momentum} in [0, 1)")
        self.groups, self.mode = list(groups), mode
        self.temperature, self.momentum, self.batch_updates = temperature, momentum, batch_updates
        self.running: np.ndarray | None = None  # per-group moving average; None before the first update

    @property
    def weights(self) -> dict[str, float] | None:
        """The current per-group weights (None for min, whose weight is per sample)."""
        if self.mode == "min":
            return None
        if self.mode == "mean" or self.running is None:
            w = np.full(len(self.groups), 1 / len(self.groups))
        else:
            z = -self.running / self.temperature
            w = np.exp(z - z.max())
            w /= w.sum()
        return dict(zip(self.groups, w.tolist()))

    def combine(self, rewards: np.ndarray) -> np.ndarray:
        """One reward per row of `rewards` [samples, groups]; changes no state."""
        rewards = self._checked(rewards)
        if self.mode == "min":
            return rewards.min(axis=1)
        return rewards @ np.fromiter(self.weights.values(), np.float64)

    def update(self, rewards: np.ndarray) -> None:
        """Fold a batch's per-group rewards into the running averages (adaptive only; empty batch: no-op)."""
        rewards = self._checked(rewards)
        if self.mode != "adaptive" or not self.batch_updates or not len(rewards):
            return
        batch = rewards.mean(axis=0)
        self.running = batch if self.running is None else self.momentum * self.running + (1 - self.momentum) * batch

    def observe(self, expected: np.ndarray) -> None:
        """Set the running rewards to the per-group rewards the policy is expected to earn now (adaptive
        only): the weights then follow the policy itself, not the completions sampled so far."""
        expected = self._checked(np.asarray(expected, np.float64)[None, :])[0]
        if self.mode == "adaptive":
            self.running = expected

    def _checked(self, rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, np.float64)
        if rewards.ndim != 2 or rewards.shape[1] != len(self.groups):
            raise RewardModelError(f"rewards must be [samples, {len(self.groups)} groups], got {rewards.shape}")
        return rewards


_LETTER_START = re.compile(r"^[\s*_\"'`]*(?:\(([A-Z])\)|([A-Z])(?:[.):*]|\s*$))")
_LETTER_NAMED = re.compile(r"\b(?i:answer|option|choice)\b(?:\s+is)?\s*[:\-]?\s*\(?([A-Z])\b(?![\w'])")


def parse_choice(completion: str, options: Sequence[str]) -> int | None:
    """The option a completion picks, or None when it cannot be told.

    In order: an upper-case letter leading the completion ("B", "B.", "B)", "(B)") or after
    answer/option/choice ("Answer: B", "the answer is (B)"), if it names an option and does not
    begin an option's text ("Answer: A lot" is the option "A lot", not letter A); else the option
    texts found in it as whole words, case-insensitively, where a match inside a longer match is
    dropped ("strongly agree" is not also "agree"): exactly one option must remain.
    """
    folded = [o.strip().casefold() for o in options]
    for match in (_LETTER_START.match(completion), _LETTER_NAMED.search(completion)):
        if match is None:
            continue
        letter, at = match.group(match.lastindex), match.start(match.lastindex)
        rest = completion[at:].casefold()
        begins_option = any(len(o) > 1 and re.match(rf"{re.escape(o)}(?!\w)", rest) for o in folded)
        if LETTERS.index(letter) < len(options) and not begins_option:
            return LETTERS.index(letter)
    spans = [(m.start(), m.end(), i) for i, option in enumerate(folded) if option
             for m in re.finditer(rf"(?<!\w){re.escape(option)}(?!\w)", completion.casefold())]
    kept = {i for s, e, i in spans if not any(s2 <= s and e <= e2 and e2 - s2 > e - s for s2, e2, _ in spans)}
    return kept.pop() if len(kept) == 1 else None


def format_question(question: Question) -> str:
    """A plain lettered prompt for a policy, in the form `parse_choice` reads back."""
    listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(question.options))
    return f"Question: {question.text}\nOptions:\n{listed}\nAnswer:"


class GroupReward:
    """Rewards for several groups at once, aggregated; the callable is a TRL reward function.

    `predictions` maps group -> question key -> predicted distribution (see `make_trl_reward`).
    Without a `reference` a choice c earns p_g(c); with one (question key -> the reference policy's
    answer distribution) it earns beta·log(p_g(c) / reference(c)): maximising that minus
    beta·KL(policy || reference) gives the policy p_g, where p_g(c) alone would pull it onto the
    group's most likely option. An unparsable completion earns `unparsable_reward` from every group,
    is counted in `unparsable`, and does not move the adaptive weights (nothing was learnt about any group).
    With `neutral_in_groups_of` = TRL's num_generations it earns instead what its prompt's parsed
    completions earn on average (`neutral_unparsable`), so GRPO learns nothing from it.
    """

    __name__ = "group_reward"  # TRL logs a reward under its function's name

    def __init__(self, questions: Mapping[str, Question], predictions: Mapping[str, Mapping[str, np.ndarray]],
                 aggregator: GroupAggregator, unparsable_reward: float = 0.0,
                 question_column: str = "question", reference: Mapping[str, np.ndarray] | None = None,
                 beta: float = 1.0, neutral_in_groups_of: int = 0) -> None:
        if reference is not None:
            if not beta > 0:
                raise RewardModelError(f"the log-ratio reward needs beta > 0 (the KL penalty's weight), got {beta}")
            absent = sorted(set(questions) - set(reference))
            if absent:
                raise RewardModelError(f"the reference has no distribution for questions {absent[:5]}")
        self.questions, self.predictions, self.aggregator = dict(questions), predictions, aggregator
        self.unparsable_reward, self.question_column = float(unparsable_reward), question_column
        self.reference, self.beta = reference, float(beta)
        self.neutral_in_groups_of = neutral_in_groups_of
        self.unparsable = 0   # completions seen whose choice could not be parsed
        self.scored = 0       # completions seen in all

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        """TRL's interface: the question of each sample comes from the dataset column `question_column`
        (TRL passes every extra column as a keyword argument, one value per completion)."""
        if self.question_column not in kwargs:
            raise RewardModelError(f"the reward needs each sample's question key: add a {self.question_column!r} "
                                   "column to the dataset (and keep GRPOConfig(remove_unused_columns=False))")
        keys = [str(k) for k in kwargs[self.question_column]]
        if len(keys) != len(completions):
            raise RewardModelError(f"{len(completions)} completions but {len(keys)} question keys")
        choices = [parse_choice(_completion_text(c), self._question(k).options) for k, c in zip(keys, completions)]
        rewards, per_group = self.choice_rewards(keys, choices)
        if self.neutral_in_groups_of:
            rewards = neutral_unparsable(rewards, [c is not None for c in choices], self.neutral_in_groups_of)
        if "log_metric" in kwargs:  # TRL >= 1.x: extra scalars beside its own metrics
            for g, value in zip(self.aggregator.groups, per_group.mean(axis=0)):
                kwargs["log_metric"](f"group_reward/{g}", float(value))
            kwargs["log_metric"]("unparsable_fraction", choices.count(None) / max(len(choices), 1))
        return rewards.tolist()

    def choice_rewards(self, keys: Sequence[str], choices: Sequence[int | None]) -> tuple[np.ndarray, np.ndarray]:
        """(aggregated reward per sample, per-group rewards [samples, groups]) for chosen option indices."""
        per_group = np.array([[self.option_reward(g, k, c) if c is not None else self.unparsable_reward
                               for g in self.aggregator.groups] for k, c in zip(keys, choices)])
        parsed = np.array([c is not None for c in choices], bool)
        self.scored += len(choices)
        self.unparsable += int((~parsed).sum())
        return self._aggregate(per_group, parsed)

    def option_reward(self, group: str, key: str, choice: int) -> float:
        """One group's reward for picking option `choice` of question `key` (see the class docstring)."""
        p = float(self._predicted(group, key)[choice])
        if self.reference is None:
            return p
        ref = float(self.reference[key][choice])
        return self.beta * (math.log(max(p, _TINY)) - math.log(max(ref, _TINY)))

    def expected_rewards(self, keys: Sequence[str], distributions: Sequence[Sequence[float]]) -> np.ndarray:
        """Per group, the reward a policy answering with `distributions` (one per question of `keys`)
        earns on average over those questions: Σ_c π(c)·r_g(c), exactly rather than by sampling. For the
        log-ratio reward this is −beta·KL(π ‖ p_g) plus a term every group shares, so its differences
        between groups are how much farther the policy is from one group's prediction than another's."""
        rows = []
        for i, (key, values) in enumerate(zip(keys, distributions, strict=True)):
            dist = check_distribution(values, self._question(key), f"sample {i} (question {key!r})")
            rows.append([sum(p * self.option_reward(g, key, c) for c, p in enumerate(dist) if p > 0)
                         for g in self.aggregator.groups])
        return np.mean(rows, axis=0) if rows else np.zeros(len(self.aggregator.groups))

    def distribution_rewards(self, keys: Sequence[str],
                             distributions: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
        """The same for whole answer distributions (e.g. a policy's option probabilities): per group
        1 − JS distance to the group's prediction."""
        rows = []
        for i, (key, values) in enumerate(zip(keys, distributions, strict=True)):
            dist = check_distribution(values, self._question(key), f"sample {i} (question {key!r})")
            rows.append([alignment(self._predicted(g, key), dist) for g in self.aggregator.groups])
        return self._aggregate(np.array(rows), np.ones(len(rows), bool))

    def _aggregate(self, per_group: np.ndarray, learn_from: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        per_group = per_group.reshape(len(learn_from), len(self.aggregator.groups))  # also for 0 samples
        rewards = self.aggregator.combine(per_group)
        self.aggregator.update(per_group[learn_from])
        return rewards, per_group

    def _question(self, key: str) -> Question:
        if key not in self.questions:
            raise RewardModelError(f"question key {key!r} is not among the {len(self.questions)} questions the "
                                   f"reward was built for (e.g. {list(self.questions)[:3]})")
        return self.questions[key]

    def _predicted(self, group: str, key: str) -> np.ndarray:
        self._question(key)
        return self.predictions[group][key]


def neutral_unparsable(rewards: np.ndarray, parsed: Sequence[bool], group_size: int) -> np.ndarray:
    """Rewards where each unparsable sample earns the mean reward of the parsed samples of its block of
    `group_size` consecutive samples (TRL's completions of one prompt; 0 where none parsed). Its GRPO
    advantage (reward minus the block's mean) is then 0: it neither pushes its answer down nor anything
    up. A fixed low reward would push that answer down for every question, also where it is an option
    (a letter beyond a 2-option question's B is a valid C of a 3-option one)."""
    rewards, parsed = np.asarray(rewards, np.float64).copy(), np.asarray(parsed, bool)
    if len(rewards) % group_size:
        raise RewardModelError(f"{len(rewards)} samples do not fall into blocks of {group_size} completions per prompt")
    for start in range(0, len(rewards), group_size):
        block, ok = rewards[start:start + group_size], parsed[start:start + group_size]
        block[~ok] = block[ok].mean() if ok.any() else 0.0  # a view: writes into `rewards`
    return rewards


def _completion_text(completion) -> str:
    """A standard completion is a string; a conversational one a list of messages (the last is the answer)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise RewardModelError(f"cannot read a completion of type {type(completion).__name__}; expected a string "
                           "or a list of chat messages")


def make_trl_reward(model: GroupRewardModel, contexts: Sequence[GroupContext], questions: Sequence[Question], *,
                    aggregate: str = "mean", temperature: float = 0.05, momentum: float = 0.9,
                    unparsable_reward: float = 0.0, question_column: str = "question",
                    reference: Mapping[str, np.ndarray] | None = None, beta: float = 1.0) -> GroupReward:
    """A reward function for TRL (e.g. `GRPOTrainer(reward_funcs=[make_trl_reward(...)])`).

    Every group's distribution on every question is predicted once, here, so training never waits
    on the embedder. The dataset needs a `question` column holding each prompt's `Question.key`
    (`format_question` gives a matching prompt). `reference` and `beta`: the log-ratio reward
    (`GroupReward`), for a trainer whose KL coefficient is the same beta."""
    keys = [q.key for q in questions]
    if not keys or len(set(keys)) != len(keys):
        raise RewardModelError(f"questions need distinct keys (they name each prompt's question), got {keys[:10]}")
    aggregator = GroupAggregator([c.name for c in contexts], aggregate, temperature, momentum)
    predicted = model.predict_groups(contexts, questions)
    predictions = {g: dict(zip(keys, dists)) for g, dists in predicted.items()}
    return GroupReward(dict(zip(keys, questions)), predictions, aggregator, unparsable_reward, question_column,
                       reference, beta)


# ----------------------------------------------------------------------------- files and the CLI


def _read_json(path: Path):
    if not path.is_file():
        raise RewardModelError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RewardModelError(f"{path}: not valid UTF-8 JSON ({exc})") from None


def _question_entry(entry, where: str) -> Question:
    if not isinstance(entry, dict):
        raise RewardModelError(f"{where}: expected an object with \"question\" and \"options\", got {entry!r:.80}")
    text, options = entry.get("question"), entry.get("options")
    if not isinstance(text, str) or not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise RewardModelError(f"{where}: \"question\" must be a string and \"options\" a list of strings")
    key = entry.get("key", question_key(text, options))
    question = Question(key=str(key), text=text.strip(), options=tuple(o.strip() for o in options))
    check_question(question, where)
    return question


def load_contexts(path: str | Path) -> list[GroupContext]:
    """Group contexts from a context file (format in the module docstring)."""
    path = Path(path)
    blob = _read_json(path)
    entries = blob if isinstance(blob, list) else [blob]
    if not entries:
        raise RewardModelError(f"{path}: no group in the file")
    contexts = []
    for i, entry in enumerate(entries):
        where = f"{path}: group entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("answers"), list):
            raise RewardModelError(f"{where}: expected {{\"group\": name, \"answers\": [...]}}")
        name = entry.get("group")
        answers = []
        for j, answer in enumerate(entry["answers"]):
            question = _question_entry(answer, f"{where} ({name!r}), answer {j}")
            if "distribution" not in answer:
                raise RewardModelError(f"{where} ({name!r}), answer {j}: missing \"distribution\"")
            answers.append((question, answer["distribution"]))
        try:
            contexts.append(GroupContext(name, answers))
        except RewardModelError as exc:
            raise RewardModelError(f"{path}: {exc}") from None
        if [c.name for c in contexts].count(name) > 1:
            raise RewardModelError(f"{where}: group {name!r} appears more than once; give each group one entry")
    return contexts


def load_questions(path: str | Path) -> list[Question]:
    """Questions from a questions file (format in the module docstring)."""
    path = Path(path)
    blob = _read_json(path)
    if not isinstance(blob, list) or not blob:
        raise RewardModelError(f"{path}: expected a non-empty list of {{\"question\", \"options\"}} objects")
    questions = [_question_entry(entry, f"{path}: question {i}") for i, entry in enumerate(blob)]
    keys = [q.key for q in questions]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise RewardModelError(f"{path}: question keys {repeated[:5]} occur more than once")
    return questions


def score_command(checkpoint: str | Path, context_file: str | Path, questions_file: str | Path, *,
                  cache_dir: str | Path | None = None, device: str = "auto", progress: bool = False) -> dict:
    """`pluralllm score`: each group's predicted distributions on the questions, as a JSON-able dict."""
    contexts, questions = load_contexts(context_file), load_questions(questions_file)
    model = GroupRewardModel.from_checkpoint(checkpoint, cache_dir=cache_dir, device=device, progress=progress)
    predicted = model.predict_groups(contexts, questions)
    groups = {}
    for c in contexts:
        groups[c.name] = {"context_questions": len(c.answers), "predictions": [
            {"key": q.key, "question": q.text, "options": list(q.options), "distribution": p.round(6).tolist(),
             "most_likely": q.options[int(np.argmax(p))]} for q, p in zip(questions, predicted[c.name])]}
    meta = model.metadata
    return {"checkpoint": str(Path(checkpoint).resolve()), "embedder": model.embedder,
            "embedding_dim": model.embedding_dim, "trained_on": {k: meta.get(k) for k in ("dataset", "train_groups")},
            "groups": groups}


def format_scores(result: dict) -> str:
    """`score_command`'s result as plain text for the terminal."""
    lines = [f"checkpoint {result['checkpoint']} (embedder {result['embedder']})"]
    for group, scored in result["groups"].items():
        lines.append(f"\n{group} (context: {scored['context_questions']} questions)")
        for p in scored["predictions"]:
            lines.append(f"  {p['question']}")
            for i, (option, prob) in enumerate(zip(p["options"], p["distribution"])):
                mark = "  <- most likely" if option == p["most_likely"] else ""
                lines.append(f"    {LETTERS[i]}. {option:<40.40} {prob:6.3f}{mark}")
    return "\n".join(lines)
