"""Group preference data: one in-memory form for every dataset, plus its loaders and splits.

Everything downstream (embeddings, training, the Flower apps) sees only `PreferenceData`:
groups → questions → a probability distribution over that question's options.
"""
from __future__ import annotations

import ast
import json
import logging
import re
import socket
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

from .config import RunConfig

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data: the message names the file, the row or question, and what is wrong."""


@dataclass(frozen=True)
class Question:
    """One multiple-choice question; `ordinal` holds each option's position on an ordinal scale
    (OpinionQA), or None where the options are not ordered."""

    key: str
    text: str
    options: tuple[str, ...]
    ordinal: tuple[float, ...] | None = None


@dataclass
class PreferenceData:
    """Questions (indexed by position) and, per group, its answer distribution per question."""

    dataset: str
    questions: list[Question]
    answers: dict[str, dict[int, np.ndarray]]  # group -> question index -> distribution (sums to 1)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count, see `pluralllm data`
    unusable: list[str] = field(default_factory=list)  # groups in the files with no usable answer at all

    @property
    def groups(self) -> list[str]:
        return list(self.answers)


@dataclass
class GroupVectors:
    """One group's questions in the form the predictor eats: option vectors and the group's
    probabilities, flattened; question i owns rows offsets[i]:offsets[i+1]. This is also what a
    deployed SuperNode holds (and nothing of any other group)."""

    group: str
    keys: list[str]          # question keys, in row order
    x: np.ndarray            # float32 [n_options, dim]: one embedding per (question, option)
    y: np.ndarray            # float32 [n_options]: the group's probability of each option
    offsets: np.ndarray      # int64 [n_questions + 1]

    @property
    def num_questions(self) -> int:
        return len(self.keys)

    def subset(self, question_ids: np.ndarray | list[int]) -> "GroupVectors":
        """The same group restricted to some of its questions, in the given order."""
        ids = np.asarray(question_ids, dtype=np.int64)
        lengths = np.diff(self.offsets)[ids]
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in ids]) if len(ids) else np.zeros(0, np.int64)
        return GroupVectors(self.group, [self.keys[i] for i in ids], self.x[rows], self.y[rows],
                            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


# ----------------------------------------------------------------------------- loading

GOQA_REPO = "Anthropic/llm_global_opinions"
GOQA_FILE = "data/global_opinions.csv"
GOQA_REVISION = "cb2880488749218abb81802a94c2c62ebfde2f35"  # the revision the project was checked against
# PluralLLM's split of GPO's 14 countries.
GOQA_TRAIN = ["Nigeria", "Egypt", "India (Current national sample)", "Germany", "United States",
              "Canada", "Argentina", "Australia"]
GOQA_EVAL = ["China", "Japan", "France", "Spain", "Brazil", "New Zealand"]
# GPO's OpinionQA groups present in the human_resp counts (its religion groups are not: no RELIG file),
# split so that every held-out group has training groups of the same attribute.
OPINIONQA_TRAIN = ["Northeast", "Male", "College graduate/some postgrad", "Democrat", "Republican",
                   "$100,000 or more", "Conservative", "Liberal", "Asian", "Black", "White"]
OPINIONQA_EVAL = ["South", "Female", "Less than high school", "Less than $30,000", "Moderate", "Hispanic"]
OPINIONQA_ATTRIBUTES = ("AGE", "CREGION", "EDUCATION", "INCOME", "POLIDEOLOGY", "POLPARTY", "RACE", "SEX")
REFUSAL = "Refused"
SUM_TOLERANCE = 0.01  # distributions summing within 1% of 1 are renormalised; further off is an error
MAX_OPTIONS = 26  # GPO's prompt letters its options A..Z (embeddings.LETTERS)

_DEFAULTDICT = re.compile(r"^\s*defaultdict\(\s*<class 'list'>\s*,\s*(\{.*\})\s*\)\s*$", re.S)


def load_globalopinionqa(path: str | Path | None = None, cache_dir: str | Path | None = None) -> PreferenceData:
    """GlobalOpinionQA in the hub's CSV format; downloaded (and cached) when no path is given."""
    path = Path(path) if path else download_globalopinionqa(cache_dir)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; GlobalOpinionQA is one CSV file (global_opinions.csv): give its path")
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected GlobalOpinionQA's global_opinions.csv)")
    frame = _read_csv(path, "GlobalOpinionQA's columns question, selections, options, source")
    missing = {"question", "selections", "options"} - set(frame.columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}; GlobalOpinionQA has "
                        "question, selections, options, source")
    questions: list[Question] = []
    answers: dict[str, dict[int, np.ndarray]] = {}
    dropped: Counter[str] = Counter()
    seen: set[str] = set()
    for row, (text, selections, options) in enumerate(zip(frame["question"], frame["selections"], frame["options"])):
        where = f"{path} row {row + 1} (question {_short(text)!r})"
        opts = tuple(_option_label(o) for o in _literal(options, list, where, "options"))
        check_options(opts, where)
        match = _DEFAULTDICT.match(selections)
        per_group = _literal(match.group(1) if match else selections, dict, where, "selections")
        qid = len(questions)
        questions.append(Question(key=str(row), text=text.strip(), options=opts))
        for group, values in per_group.items():
            seen.add(str(group))
            dist = _distribution(values, len(opts), f"{where}, group {group!r}", dropped)
            if dist is not None:
                answers.setdefault(str(group), {})[qid] = dist
    if not questions:
        raise DataError(f"{path}: no questions (a header and no rows)")
    log.info("loaded %d GlobalOpinionQA questions from %s", len(questions), path)
    return PreferenceData("globalopinionqa", questions, answers, dict(dropped), sorted(seen - set(answers)))


def download_globalopinionqa(cache_dir: str | Path | None = None) -> Path:
    """Fetch global_opinions.csv from the Hugging Face hub (needs a network; cached afterwards)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.constants import ENDPOINT

    hint = ("Without a network, download global_opinions.csv elsewhere and pass its path: "
            "`--path /abs/global_opinions.csv` on the CLI, DATA=/abs/path with make, or "
            "--run-config \"data-path='/abs/global_opinions.csv'\" with flwr run")
    host = urlparse(ENDPOINT).hostname or "huggingface.co"
    try:  # fail in milliseconds rather than after the hub client's minute of retries
        socket.getaddrinfo(host, 443)
    except OSError:
        raise DataError(f"cannot download GlobalOpinionQA ({GOQA_REPO}): no network ({host} does not resolve). "
                        + hint) from None
    try:
        return Path(hf_hub_download(GOQA_REPO, GOQA_FILE, repo_type="dataset", revision=GOQA_REVISION,
                                    cache_dir=str(Path(cache_dir) / "hub") if cache_dir else None))
    except Exception as exc:  # any hub failure becomes one actionable message
        raise DataError(f"could not download GlobalOpinionQA ({GOQA_REPO}/{GOQA_FILE}): "
                        f"{type(exc).__name__}: {_short(str(exc), 200)}. " + hint) from None


def load_opinionqa(path: str | Path) -> PreferenceData:
    """OpinionQA's `human_resp` layout: per survey, info.csv and <ATTR>_data.json with per-group counts.

    Options and their ordinal positions come from info.csv (the JSON's MC_options are split at commas
    upstream); refusals are excluded; the group "Refused" and missing labels are not groups. A value that
    names groups of several attributes ("Other") is qualified with its attribute: "Other (RACE)".
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (expected OpinionQA's human_resp folder, one subfolder per survey)")
    surveys = sorted(p for p in root.iterdir() if p.is_dir())
    if not surveys:
        raise DataError(f"{root}: no survey folders found (expected e.g. American_Trends_Panel_W26/)")
    dropped: Counter[str] = Counter()
    questions: list[Question] = []
    qid_of: dict[str, int] = {}
    counts: dict[tuple[str, str], dict[int, np.ndarray]] = {}  # (attribute, value) -> qid -> distribution
    repeated: set[tuple[str, str]] = set()  # (survey, key) of questions an earlier survey already had
    seen: set[tuple[str, str]] = set()  # every (attribute, value) with answer counts, usable or not
    for survey in surveys:
        info = _opinionqa_info(survey)
        seen_here: set[str] = set()
        for attr in OPINIONQA_ATTRIBUTES:
            file = survey / f"{attr}_data.json"
            if not file.is_file():
                continue
            try:
                blob = json.loads(file.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise DataError(f"{file}: not UTF-8 text (byte {exc.object[exc.start]:#x} at offset {exc.start})") from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{file}: not valid JSON ({exc})") from None
            _expect(blob, dict, f"{file}", "the file", "question keys to entries")
            for key, entry in blob.items():
                _expect(entry, dict, f"{file}, question {key!r}", "its entry", "groups to answer counts")
                if key not in info:
                    raise DataError(f"{file}: question {key!r} is not in {survey / 'info.csv'}")
                if key in qid_of and key not in seen_here:
                    repeated.add((survey.name, key))
                    continue
                if key not in qid_of:
                    text, options, ordinal = info[key]
                    qid_of[key] = len(questions)
                    questions.append(Question(key, text, options, ordinal))
                seen_here.add(key)
                question = questions[qid_of[key]]
                for value, option_counts in entry.items():
                    if value in ("MC_options", "question_text"):
                        continue
                    if value in (REFUSAL, "nan", ""):
                        dropped[f"answers of the non-group {value or 'empty'!r}"] += 1
                        continue
                    where = f"{file}, question {key!r}, group {value!r}"
                    _expect(option_counts, dict, where, "the answer counts", "options to counts")
                    seen.add((attr, value))
                    dist = _counts_to_distribution(option_counts, question.options, where, dropped)
                    if dist is not None:
                        counts.setdefault((attr, value), {})[qid_of[key]] = dist
    if not questions:
        raise DataError(f"{root}: no questions in any survey's <ATTRIBUTE>_data.json "
                        f"(attributes {', '.join(OPINIONQA_ATTRIBUTES)})")
    if repeated:
        dropped["question repeated in a later survey (first kept)"] = len(repeated)
    attrs_of = Counter(value for _, value in seen)
    name = {(attr, value): f"{value} ({attr})" if attrs_of[value] > 1 else value for attr, value in seen}
    answers = {name[group]: dists for group, dists in sorted(counts.items())}
    log.info("loaded %d OpinionQA questions from %d surveys in %s", len(questions), len(surveys), root)
    return PreferenceData("opinionqa", questions, answers, dict(dropped), sorted(set(name.values()) - set(answers)))


def _opinionqa_info(survey: Path) -> dict[str, tuple[str, tuple[str, ...], tuple[float, ...] | None]]:
    file = survey / "info.csv"
    if not file.is_file():
        raise DataError(f"{file}: missing (every OpinionQA survey folder has info.csv)")
    frame = _read_csv(file, "OpinionQA's info.csv columns key, question, references, option_ordinal")
    missing = {"key", "question", "references"} - set(frame.columns)
    if missing:
        raise DataError(f"{file}: missing column(s) {sorted(missing)}")
    info = {}
    for row, rec in enumerate(frame.to_dict("records")):
        where = f"{file} row {row + 1} (question {rec['key']!r})"
        options = tuple(str(o) for o in _literal(rec["references"], list, where, "references") if str(o) != REFUSAL)
        check_options(options, where)
        ordinal = None
        if rec.get("option_ordinal"):
            values = _literal(rec["option_ordinal"], list, where, "option_ordinal")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise DataError(f"{where}: option_ordinal must be a list of numbers, got {_short(rec['option_ordinal'])!r}")
            ordinal = tuple(float(v) for v in values) if len(values) == len(options) else None
        info[rec["key"]] = (rec["question"].strip(), options, ordinal)
    return info


def _counts_to_distribution(option_counts: dict, options: tuple[str, ...], where: str,
                            dropped: Counter) -> np.ndarray | None:
    index = {o: i for i, o in enumerate(options)}
    folded = {o.casefold(): i for i, o in enumerate(options)}
    values = np.zeros(len(options))
    answered = False  # any count besides refusals, even 0
    for option, count in option_counts.items():
        if option == REFUSAL:
            continue
        answered = True
        i = index.get(option)
        if i is None:
            i = folded.get(option.casefold())
            if i is None:
                raise DataError(f"{where}: answer option {option!r} is not among the question's options {list(options)}")
            dropped["option label matched ignoring case (kept)"] += 1
        if not isinstance(count, (int, float)) or not np.isfinite(count) or count < 0:
            raise DataError(f"{where}: count for {option!r} must be a non-negative number, got {count!r}")
        values[i] += count
    total = values.sum()
    if total == 0:
        dropped["all-zero counts (group answers)" if answered else "no answers besides refusals (group answers)"] += 1
        return None
    return (values / total).astype(np.float32)


def _distribution(values, n_options: int, where: str, dropped: Counter) -> np.ndarray | None:
    if not isinstance(values, (list, tuple)):
        raise DataError(f"{where}: distribution must be a list of numbers, got {values!r}")
    if len(values) == 0:
        dropped["empty distribution (group answers)"] += 1
        return None
    try:
        dist = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: distribution must hold numbers only, got {values!r}") from None
    if len(dist) != n_options:
        raise DataError(f"{where}: distribution has {len(dist)} values but the question has {n_options} options")
    if not np.all(np.isfinite(dist)):
        raise DataError(f"{where}: distribution contains NaN or infinite values: {values!r}")
    if np.any(dist < 0):
        raise DataError(f"{where}: distribution contains negative values: {values!r}")
    total = dist.sum()
    if total == 0:
        dropped["all-zero distribution (group answers)"] += 1
        return None
    if abs(total - 1) > SUM_TOLERANCE:
        raise DataError(f"{where}: distribution sums to {total:.4f}, more than {SUM_TOLERANCE:.0%} off 1")
    if abs(total - 1) > 1e-6:
        dropped["renormalised: sum within 1% of 1 (group answers, kept)"] += 1
    return (dist / total).astype(np.float32)


def check_options(options: tuple[str, ...], where: str) -> None:
    """What every consumer of a question needs (the lettered prompt, training, bundles, the reward model's
    `check_question`): 2 to MAX_OPTIONS distinct, non-empty options."""
    if not 2 <= len(options) <= MAX_OPTIONS:
        raise DataError(f"{where}: needs 2 to {MAX_OPTIONS} options, got {len(options)}")
    if any(not isinstance(o, str) or not o.strip() for o in options) or len(set(options)) != len(options):
        raise DataError(f"{where}: options must be distinct non-empty strings, got {list(options)}")


def _read_csv(path: Path, expected: str) -> pd.DataFrame:
    """A CSV as text cells; an empty, non-UTF-8 or malformed file is a DataError naming it. (pandas
    is imported here: a deployed ClientApp reads a bundle, never a CSV, and pays no 0.6 s for it.)"""
    import pandas as pd

    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file (expected {expected})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#x} at offset {exc.start})") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None


def _expect(value, kind: type, where: str, what: str, meaning: str) -> None:
    if not isinstance(value, kind):
        raise DataError(f"{where}: {what} must be a JSON object ({meaning}), got {type(value).__name__} "
                        f"{_short(json.dumps(value), 40)}")


def _literal(text: str, kind: type, where: str, column: str):
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        if re.search(r"\bnan\b", text, re.I):
            raise DataError(f"{where}: {column} contains NaN values: {_short(text)!r}") from None
        raise DataError(f"{where}: cannot parse {column} {_short(text)!r} as a Python {kind.__name__} literal") from None
    if not isinstance(value, kind):
        raise DataError(f"{where}: {column} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _option_label(option) -> str:
    """Scale points arrive as floats (1.0 ... 10.0); write them as the integers they are."""
    if isinstance(option, float) and option.is_integer():
        return str(int(option))
    return str(option)


def _short(text: str, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


# ----------------------------------------------------------------------------- groups and splits


@dataclass(frozen=True)
class GroupSplit:
    train: list[str]
    eval: list[str]


def load_dataset(cfg: RunConfig) -> PreferenceData:
    if cfg.dataset == "globalopinionqa":
        return load_globalopinionqa(cfg.data_path or None, cfg.cache_path)
    return load_opinionqa(cfg.data_path)


def default_split(dataset: str) -> GroupSplit:
    """The dataset's documented default split (PluralLLM's countries; our OpinionQA groups)."""
    return (GroupSplit(GOQA_TRAIN, GOQA_EVAL) if dataset == "globalopinionqa"
            else GroupSplit(OPINIONQA_TRAIN, OPINIONQA_EVAL))


def split_groups(data: PreferenceData, cfg: RunConfig) -> GroupSplit:
    """The training and held-out groups: the dataset's default split, named lists, or "auto"."""
    train, held = cfg.group_list("train_groups"), cfg.group_list("eval_groups")
    if "auto" in (train, held):
        if train != held:
            raise DataError("run-config: 'auto' must be given for both train-groups and eval-groups")
        return _auto_split(data, cfg)
    default = default_split(data.dataset)
    split = GroupSplit(train or default.train, held or default.eval)
    for key, names in (("train-groups", split.train), ("eval-groups", split.eval)):
        unusable = [g for g in names if g in data.unusable]
        if unusable:
            raise DataError(f"run-config '{key}': group(s) {unusable} of {data.dataset} have no usable answer (every "
                            "distribution of theirs is empty or all zeros; see `pluralllm data`)")
        unknown = [g for g in names if g not in data.answers]
        if unknown:
            raise DataError(f"run-config '{key}': unknown group(s) {unknown} in {data.dataset}; "
                            f"known groups: {sorted(data.answers)} (see `pluralllm data`)")
    overlap = sorted(set(split.train) & set(split.eval))
    if overlap:
        raise DataError(f"run-config: group(s) {overlap} are in both train-groups and eval-groups")
    if not split.train or not split.eval:
        raise DataError("run-config: train-groups and eval-groups must each name at least one group")
    return split


def _auto_split(data: PreferenceData, cfg: RunConfig) -> GroupSplit:
    eligible = sorted(g for g, answers in data.answers.items() if len(answers) >= cfg.min_group_questions)
    if len(eligible) < 2:
        raise DataError(f"'auto' split: only {len(eligible)} group(s) of {data.dataset} have at least "
                        f"{cfg.min_group_questions} questions (run-config 'min-group-questions'); need 2")
    order = np.random.default_rng(cfg.seed).permutation(len(eligible))
    n_eval = min(max(1, round(cfg.auto_eval_fraction * len(eligible))), len(eligible) - 1)
    return GroupSplit(train=[eligible[i] for i in sorted(order[n_eval:])],
                      eval=[eligible[i] for i in sorted(order[:n_eval])])


def restrict(data: PreferenceData, groups: list[str], common_questions: bool, max_questions: int = 0) -> PreferenceData:
    """Only these groups; with `common_questions`, only questions every one of them answered; with
    `max_questions`, a random subset of that many (the same for every seed: seeds vary training only).

    Questions are renumbered; what is removed is counted in `dropped`."""
    dropped = Counter(data.dropped)
    answered = [set(data.answers[g]) for g in groups]
    keep = sorted(set.intersection(*answered) if common_questions else set.union(*answered))
    if common_questions:
        dropped["question not answered by every selected group"] += len(set.union(*answered)) - len(keep)
    if not keep:
        raise DataError(f"{data.dataset}: no question is answered by every selected group {groups}; "
                        "set run-config common-questions=false or choose other groups")
    if 0 < max_questions < len(keep):
        dropped["question outside the max-questions subset"] += len(keep) - max_questions
        keep = sorted(np.random.default_rng(0).choice(keep, max_questions, replace=False).tolist())
    new_id = {old: new for new, old in enumerate(keep)}
    answers = {g: {new_id[q]: d for q, d in data.answers[g].items() if q in new_id} for g in groups}
    return PreferenceData(data.dataset, [data.questions[q] for q in keep], answers, dict(dropped))


def heldback_split(question_ids: list[int], fraction: float, seed: int, group: str) -> tuple[list[int], list[int]]:
    """A training group's questions split into (train, held back), seeded by the seed and the group's
    name, so every node and the server derive the same split independently."""
    rng = seeded_rng(seed, group)
    ids = np.asarray(sorted(question_ids))[rng.permutation(len(question_ids))]
    n_back = int(round(fraction * len(ids)))
    return sorted(ids[n_back:].tolist()), sorted(ids[:n_back].tolist())


def unseen_question_ids(n_questions: int, fraction: float, seed: int) -> list[int]:
    """The run's unseen questions (run-config heldout-questions): a seeded share of the question
    indices that no training group trains on, the same on every node and the server."""
    n = int(round(fraction * n_questions))
    return sorted(seeded_rng(seed, "heldout-questions").choice(n_questions, size=n, replace=False).tolist()) if n else []


def seeded_rng(seed: int, *stream: int | str) -> np.random.Generator:
    """An independent, reproducible random stream for (seed, group, round, ...): the same names give
    the same stream in every process, whatever the order in which groups are visited."""
    return np.random.default_rng([seed, *(zlib.crc32(s.encode()) if isinstance(s, str) else s for s in stream)])


def prepare(cfg: RunConfig, data: PreferenceData | None = None) -> tuple[PreferenceData, GroupSplit]:
    """Load, split and restrict the data for a run, and check each group can serve its role."""
    data = data if data is not None else load_dataset(cfg)
    split = split_groups(data, cfg)
    data = restrict(data, split.train + split.eval, cfg.common_questions, cfg.max_questions)
    for group in split.eval:
        n = len(data.answers[group])
        if n <= cfg.eval_context:
            raise DataError(f"held-out group {group!r} has {n} questions, but evaluation needs more than "
                            f"eval-context={cfg.eval_context} (context plus at least one target)")
    for group in split.train:
        n = len(heldback_split(list(data.answers[group]), cfg.heldback_fraction, cfg.seed, group)[0])
        if n < cfg.min_context + 1:
            raise DataError(f"training group {group!r} has {n} training questions, but an episode needs at "
                            f"least min-context={cfg.min_context} context questions plus one target")
    return data, split


def summary(data: PreferenceData) -> dict:
    """What `pluralllm data --json` prints."""
    return {
        "dataset": data.dataset,
        "questions": len(data.questions),
        "options": sum(len(q.options) for q in data.questions),
        "groups": {g: len(a) for g, a in sorted(data.answers.items())},
        "dropped": dict(sorted(data.dropped.items())),
    }
