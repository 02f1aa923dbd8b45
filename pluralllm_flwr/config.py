"""The typed, validated view of the Flower run-config.

The run-config (`[tool.flwr.app.config]` in pyproject.toml, overridden with `--run-config`) is the
one place where settings live; every entry point (ServerApp, ClientApp, CLI) turns that mapping into
a `RunConfig` here, so a bad value fails once, with one message, before any work starts.
The dataclass defaults equal the pyproject defaults (a test keeps them equal), so the CLI works the
same outside `flwr run`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DATASETS = ("globalopinionqa", "opinionqa")
STRATEGIES = ("fedavg", "fedprox", "fedmedian", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold",
              "qfedavg")  # strategies.STRATEGIES
ADAPTIVE_STRATEGIES = ("fedadam", "fedyogi", "fedadagrad")  # server-lr is their normalised step (e.g. 0.01)
SERVER_STATE_STRATEGIES = ("fedavgm", "scaffold") + ADAPTIVE_STRATEGIES  # server optimiser state that checkpoints do not hold
WEIGHTINGS = ("num-examples", "uniform")
DEVICES = ("auto", "cpu", "cuda")
DP_MODES = ("none", "client", "server")
MODELS = ("gpo", "mixture", "residual")          # predictors.ARCHITECTURES (a test keeps them equal)
FEATURES = ("raw", "question-option", "question-option-position")  # features.FEATURES (likewise)
SAMPLERS = ("independent", "same-questions")
LR_SCHEDULES = ("constant", "cosine")
CLIENT_OPTIMIZERS = ("adam", "sgd")


# The demo's federation (`pluralllm demo`, `make demo`): FedAdam over clients that each take one SGD step
# on four episodes of their group, i.e. Adam on the federation's mean gradient, one round per step. FedAvg's
# local steps on one group each learn the directions along which groups differ far more slowly per round
# (docs/conditioning.md, "Why FedAvg learns the groups slowly"). Run-config overrides given to the demo win.
DEMO_FEDERATION = {"strategy": "fedadam", "server-lr": 0.003, "server-tau": 1e-6, "client-optimizer": "sgd",
                   "lr": 1.0, "local-steps": 1, "episodes-per-step": 4, "eval-every": 100}
DEMO_ROUNDS = 800
# FedAvg at its best settings found (docs/conditioning.md): 12 local Adam steps of 4 episodes per round, each
# round doing more work per message, since on 2 CPU cores a round's time is mostly Flower's per-message cost.
FEDAVG_FEDERATION = {"strategy": "fedavg", "local-steps": 12, "episodes-per-step": 4, "eval-every": 20}
FEDAVG_ROUNDS = 200


class ConfigError(ValueError):
    """A run-config value is missing, mistyped or out of range; the message names the key."""


@dataclass(frozen=True)
class RunConfig:
    # data
    dataset: str = "globalopinionqa"
    data_path: str = ""               # "" = download GlobalOpinionQA from the hub (OpinionQA needs a path)
    train_groups: str = ""            # comma-separated; "" = the dataset's default split; "auto" = by size
    eval_groups: str = ""             # held-out groups, never trained on; same conventions
    min_group_questions: int = 50     # "auto" split: groups with at least this many questions
    auto_eval_fraction: float = 0.3   # "auto" split: seeded share of those groups held out
    common_questions: bool = True     # keep only questions every selected group answered (the authors' protocol)
    heldback_fraction: float = 0.2    # share of each training group's questions kept back for its own evaluation
    max_questions: int = 0            # 0 = all; else a seeded random subset of this many questions (quick runs)
    heldout_questions: float = 0.0    # seeded share of questions no training group trains on (scored apart)
    skew: float = 0.0                 # non-IID stress: 0..1 pull of every group's answers toward its own preference (skew.py)
    eval_bundles: str = ""            # deployment server: comma-separated absolute paths of the held-out groups' bundles
    # embeddings
    embedder: str = "minilm"
    features: str = "question-option-position"  # what the predictor reads per option (features.py)
    cache_dir: str = ""               # "" = cache_folder()'s default: ~/.cache/pluralllm, or under XDG_CACHE_HOME
    # run
    out_dir: str = ""                 # "" = runs/<timestamp> under the current directory
    seed: int = 0
    device: str = "auto"
    batch: str = ""                   # absolute path of a JSON list of run-configs one Flower run executes in turn
    reward_request: str = ""          # absolute path of a JSON reward query (reward_queries.py); "" = train
    # federated schedule
    num_server_rounds: int = 1000
    local_steps: int = 6
    episodes_per_step: int = 1        # episodes of each group in one gradient step's batch
    lr: float = 3e-3
    client_optimizer: str = "adam"    # a client's local optimiser, fresh each round (sgd: plain SGD at lr)
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    server_lr: float = 1.0            # fedavgm: step on the averaged update (1 = FedAvg); adaptive: their step
    server_momentum: float = 0.0      # fedavgm's momentum
    server_tau: float = 1e-3          # adaptive: the epsilon beside the second moment's root (Flower's tau)
    qfedavg_q: float = 0.1            # qfedavg: q of q-FFL (0 = uniform FedAvg; larger favours high-loss groups)
    weighting: str = "num-examples"
    fraction_train: float = 1.0
    min_train_nodes: int = 0          # 0 = every training group must report (simulation); lower for deployments
    round_timeout: float = 600.0      # seconds a round waits for replies
    # evaluation
    eval_every: int = 10
    eval_context: int = 20
    eval_draws: int = 5
    eval_context_sizes: str = "1,5,10,20,50,100"  # the context-size curve of every evaluation
    # episodes
    min_context: int = 10
    max_context: int = 100
    min_target: int = 10
    max_target: int = 100
    # model
    model: str = "mixture"            # gpo (the paper's) | mixture | residual
    prototypes: int = 16              # mixture: prototype answer heads
    inference_steps: int = 10         # mixture: EM steps fitting a group's weights to its context
    episode_sampler: str = "independent"  # or "same-questions" (GPO's: one question order for every group of a step)
    lr_schedule: str = "cosine"       # or "constant"; cosine decays over all steps/rounds after warmup-steps
    warmup_steps: int = 0
    d_model: int = 128
    embed_depth: int = 4
    num_layers: int = 6
    num_heads: int = 4
    dim_feedforward: int = 128
    # differential privacy (Flower's fixed-clipping wrappers) and recovery
    dp: str = "none"                  # none | client (clip on each client) | server (clip on the server)
    dp_clip: float = 1.0              # clipping norm of each client's update
    dp_noise: float = 1.0             # noise multiplier of the Gaussian mechanism
    dp_delta: float = 1e-5            # delta at which the spent epsilon is reported
    resume: bool = False              # continue the run in out-dir from its last checkpoint

    def __post_init__(self) -> None:
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("device", self.device, DEVICES)
        _check_choice("model", self.model, MODELS)
        _check_choice("features", self.features, FEATURES)
        _check_choice("episode_sampler", self.episode_sampler, SAMPLERS)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("client_optimizer", self.client_optimizer, CLIENT_OPTIMIZERS)
        if self.prototypes < 1 or self.inference_steps < 0 or self.warmup_steps < 0:
            raise ConfigError(f"run-config needs prototypes >= 1, inference-steps >= 0 and warmup-steps >= 0, got "
                              f"{self.prototypes}, {self.inference_steps}, {self.warmup_steps}")
        if not 0 <= self.skew <= 1:
            raise ConfigError(f"run-config 'skew' must be in [0, 1] (0 = the survey as it is), got {self.skew}")
        if not 0 <= self.heldout_questions < 1:
            raise ConfigError(f"run-config 'heldout-questions' must be in [0, 1), got {self.heldout_questions}")
        if self.embed_depth < 2:
            raise ConfigError(f"run-config 'embed-depth' must be at least 2 (input and output layer), got {self.embed_depth}")
        for key in ("num_server_rounds", "local_steps", "episodes_per_step", "eval_every", "eval_context", "eval_draws",
                    "min_context", "min_target", "d_model", "num_layers", "num_heads", "dim_feedforward"):
            if getattr(self, key) < 1:
                raise ConfigError(f"run-config '{_kebab(key)}' must be at least 1, got {getattr(self, key)}")
        for key in ("lr", "round_timeout"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"run-config '{_kebab(key)}' must be positive, got {getattr(self, key)}")
        if self.proximal_mu < 0:
            raise ConfigError(f"run-config 'proximal-mu' must be >= 0, got {self.proximal_mu}")
        if not self.server_lr > 0 or not 0 <= self.server_momentum < 1:
            raise ConfigError(f"run-config needs server-lr > 0 and 0 <= server-momentum < 1, got {self.server_lr} and "
                              f"{self.server_momentum}")
        if self.qfedavg_q < 0:
            raise ConfigError(f"run-config 'qfedavg-q' must be >= 0, got {self.qfedavg_q}")
        if not self.server_tau > 0:
            raise ConfigError(f"run-config 'server-tau' must be positive, got {self.server_tau}")
        if self.strategy in ADAPTIVE_STRATEGIES and self.server_lr > 0.1:
            raise ConfigError(f"run-config server-lr={self.server_lr} with strategy {self.strategy!r} would move every "
                              "weight by up to that much each round: an adaptive server step is normalised, so give "
                              "it a step like 0.01")
        if self.resume and self.strategy in SERVER_STATE_STRATEGIES:
            raise ConfigError(f"run-config resume=true cannot continue strategy {self.strategy!r}: its server "
                              "optimiser's state (momentum, moment estimates) is not in the checkpoints, so a resumed "
                              "run would differ from an uninterrupted one")
        if self.max_questions < 0:
            raise ConfigError(f"run-config 'max-questions' must be >= 0 (0 = all), got {self.max_questions}")
        if self.min_train_nodes < 0:
            raise ConfigError(f"run-config 'min-train-nodes' must be >= 0, got {self.min_train_nodes}")
        for key in ("auto_eval_fraction", "fraction_train"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"run-config '{_kebab(key)}' must be in (0, 1], got {getattr(self, key)}")
        if not 0 <= self.heldback_fraction < 1:
            raise ConfigError(f"run-config 'heldback-fraction' must be in [0, 1), got {self.heldback_fraction}")
        if self.max_context < self.min_context or self.max_target < self.min_target:
            raise ConfigError("run-config needs min-context <= max-context and min-target <= max-target, got "
                              f"{self.min_context}..{self.max_context} and {self.min_target}..{self.max_target}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"run-config 'd-model' ({self.d_model}) must be divisible by 'num-heads' ({self.num_heads})")
        _check_choice("dp", self.dp, DP_MODES)
        if self.dp != "none":
            if not (self.dp_clip > 0 and self.dp_noise > 0 and 0 < self.dp_delta < 1):
                raise ConfigError(f"run-config dp={self.dp!r} needs dp-clip > 0, dp-noise > 0 and 0 < dp-delta < 1, got "
                                  f"{self.dp_clip}, {self.dp_noise}, {self.dp_delta}")
            if self.weighting != "uniform" or self.fraction_train != 1 or self.strategy in ("fedmedian", "scaffold"):
                raise ConfigError(f"run-config dp={self.dp!r} needs weighting='uniform', fraction-train=1 and a "
                                  "mean-based strategy (not fedmedian; not scaffold, whose control variates are not "
                                  "clipped): the noise is calibrated to a uniform "
                                  "average of every client's clipped update")
        try:
            sizes = self.context_sizes
        except ValueError:
            sizes = ()
        if not sizes or min(sizes) < 1:
            raise ConfigError(f"run-config 'eval-context-sizes' must be comma-separated positive integers, e.g. "
                              f"'1,5,20', got {self.eval_context_sizes!r}")
        if self.resume and not self.out_dir:
            raise ConfigError("run-config resume=true needs 'out-dir': the directory of the run to continue")
        if self.reward_request and not Path(self.reward_request).is_absolute():
            raise ConfigError(f"run-config 'reward-request' needs an absolute path (the ServerApp runs in the "
                              f"SuperLink's directory), got {self.reward_request!r}")
        if self.batch and not Path(self.batch).is_absolute():
            raise ConfigError(f"run-config 'batch' needs an absolute path (the ServerApp runs in the SuperLink's "
                              f"directory), got {self.batch!r}")
        relative = [p for p in self.bundle_paths if not Path(p).is_absolute()]
        if relative:
            raise ConfigError(f"run-config 'eval-bundles' needs absolute paths (the ServerApp runs in the SuperLink's "
                              f"directory), got {relative}")
        if self.dataset == "opinionqa" and not self.data_path and not self.eval_bundles:
            raise ConfigError("run-config 'data-path' is required for dataset 'opinionqa': pass the opinions_qa "
                              "human_resp folder, e.g. --run-config \"data-path='/abs/path/human_resp'\"")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Build from a run-config mapping (kebab-case keys); unknown keys and wrong types are errors."""
        known = {_kebab(f.name): f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown run-config key(s) {unknown}; known keys: {sorted(known)}")
        kwargs = {known[k].name: _coerce(k, v, type(getattr(cls, known[k].name))) for k, v in values.items()}
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """The run-config mapping (kebab-case), e.g. to record in results.json or pass to `flwr run`."""
        return {_kebab(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @property
    def context_sizes(self) -> tuple[int, ...]:
        """`eval-context-sizes` as integers."""
        return tuple(int(s) for s in self.eval_context_sizes.split(",") if s.strip())

    @property
    def bundle_paths(self) -> list[str]:
        """`eval-bundles` as a list of paths."""
        return [p.strip() for p in self.eval_bundles.split(",") if p.strip()]

    @property
    def cache_path(self) -> Path:
        return cache_folder(self.cache_dir)

    def group_list(self, which: str) -> list[str] | str:
        """`train-groups`/`eval-groups` as a list of names (`group_names`), or "" (default split) / "auto"."""
        raw = getattr(self, which).strip()
        if raw in ("", "auto"):
            return raw
        return group_names(raw)


def group_names(raw: str) -> list[str]:
    """Group names given in one string, by run-config or on a command line: separated by ";" when there is
    one (OpinionQA has names with commas: "$100,000 or more"), else by ","."""
    return [g.strip() for g in raw.split(";" if ";" in raw else ",") if g.strip()]


def cache_folder(cache_dir: str | Path | None = None) -> Path:
    """The given cache folder, or the default (~/.cache/pluralllm, or under XDG_CACHE_HOME): one rule for
    the run-config's cache-dir and for the commands that take --cache-dir."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pluralllm"


def read_batch(path: str | Path) -> list[RunConfig]:
    """The runs of run-config `batch`: a JSON list of run-config mappings, each validated here, so a bad
    entry fails before the first run trains. Each must have its own out-dir and no batch of its own."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"run-config 'batch' {path}: cannot read a JSON list of run-configs ({exc})") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"run-config 'batch' {path}: must hold a non-empty JSON list of run-config objects")
    runs = []
    for i, entry in enumerate(entries):
        try:
            cfg = RunConfig.from_mapping(entry)
        except ConfigError as exc:
            raise ConfigError(f"run-config 'batch' {path}, run {i}: {exc}") from None
        if cfg.batch or not cfg.out_dir:
            raise ConfigError(f"run-config 'batch' {path}, run {i}: needs its own 'out-dir' and no 'batch' of its own")
        runs.append(cfg)
    out_dirs = [c.out_dir for c in runs]
    if len(set(out_dirs)) < len(out_dirs):
        raise ConfigError(f"run-config 'batch' {path}: two runs write to the same out-dir ({out_dirs})")
    return runs


# `flwr run --run-config` splits its text into KEY=VALUE pairs so (flwr.common.config.parse_config_args).
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def parse_overrides(texts: list[str] | None) -> dict[str, Any]:
    """`-c`/`--run-config` texts as `flwr run` reads them (KEY=VALUE pairs, each VALUE a TOML value),
    but every malformed pair, stray word or key given twice is a ConfigError naming it (Flower says only
    that the text as a whole is invalid)."""
    values: dict[str, Any] = {}
    for text in texts or []:
        stray = _PAIR.sub(" ", text).split()
        if stray:
            raise ConfigError(f"-c {text!r}: {stray[0]!r} is not KEY=VALUE (separate pairs by spaces, quote text "
                              "values: key='some text')")
        for key, raw in _PAIR.findall(text):
            try:
                value = tomllib.loads(f"{key} = {raw}")[key]
            except (tomllib.TOMLDecodeError, KeyError):
                raise ConfigError(f"-c {key}={raw}: {raw} is not a number, true/false or a quoted string (text "
                                  f"needs quotes: {key}='{raw.strip(chr(39) + chr(34))}')") from None
            if key in values:
                raise ConfigError(f"-c: run-config key {key!r} is given twice ({key}={values[key]!r} and {key}={value!r})")
            values[key] = value
    return values


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"run-config '{_kebab(key)}' must be one of {list(choices)}, got {value!r}")


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Accept what `--run-config` produces (ints for floats are fine); reject everything else by name."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"run-config '{key}' must be a {kind.__name__}, got {value!r} ({type(value).__name__})")
