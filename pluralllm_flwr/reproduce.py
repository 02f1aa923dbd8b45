"""`pluralllm reproduce`: the paper's comparison (FedAvg, FedProx, centralized) and the ablations of
its open questions, on real data, as one command; `reproduction_report.py` writes the report.

Every run is an ordinary run directory (the results contract) under <out>/<dataset>/<name>/seed-<s>.
A run already complete with the same run-config is reused, so an interrupted reproduction goes on
where it stopped, and the report can be rewritten without training again. What the report needs
beyond the run directories (skipped datasets, the chosen mu, the commands
that ran and their time) is in <out>/manifest.json.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import data as D
from .centralized import train_centralized
from .config import ConfigError, RunConfig
from .experiment import fmt_gain, prepare_experiment
from .results import LAST_CHECKPOINT, RESULTS_FILE, claim_run_dir, holds_run, load_results
from .simulation import simulate_batch

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Scale:
    """How much of the reproduction to run. Rounds are federated rounds; the centralized runs and
    the local-steps ablation are given the same work (episodes), see centralized.py."""

    name: str
    rounds: int
    eval_every: int
    seeds: tuple[int, ...] = (0, 1, 2)
    mus: tuple[float, ...] = (0.01, 0.1, 1.0)           # FedProx sweep, chosen on held-back questions
    local_steps: tuple[int, ...] = (1, 3, 6, 12)        # at equal total work
    eval_contexts: tuple[int, ...] = (5, 10, 20, 50)
    embedders: tuple[str, ...] = ("minilm", "smollm2")
    embedder_questions: int = 0                         # the embedder ablation on a subset (0 = all questions)
    ablations_on_every_dataset: bool = False            # else on the first dataset only
    # the default predictor in FedAvg's federation: its comparison (every seed, evaluated five times), then on
    # the first dataset the non-IID stress test (first seed, final evaluation only) at these skew strengths
    default_rounds: int = 30
    skews: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    stress_rounds: int = 30                             # = default_rounds: skew 0 reuses the comparison's runs
    # aggregation strategies (open question 3; default predictor, every group of the first dataset, 'auto' split)
    strategy_rounds: int = 16
    strategy_seeds: int = 2                             # the first this many of `seeds`

    def describe(self) -> str:
        return (f"scale '{self.name}': {self.rounds} federated rounds (evaluated every {self.eval_every}), seeds "
                f"{list(self.seeds)}, FedProx mu in {list(self.mus)}, local steps {list(self.local_steps)}, "
                f"evaluation context {list(self.eval_contexts)}, embedders {list(self.embedders)}"
                + (f" on {self.embedder_questions} questions" if self.embedder_questions else "")
                + f"; the default predictor: {self.default_rounds} rounds; stress test: skew {list(self.skews)}, "
                f"{self.stress_rounds} rounds; strategies: "
                f"{self.strategy_rounds} rounds, {self.strategy_seeds} seeds")


SCALES = {
    # minutes: checks the whole pipeline on real data (the default 6-layer model, 3 rounds)
    "smoke": Scale("smoke", rounds=3, eval_every=1, seeds=(0, 1), mus=(0.1, 1.0), local_steps=(3, 6),
                   eval_contexts=(5, 20), embedders=("minilm",), default_rounds=2, skews=(0.0, 1.0),
                   stress_rounds=2, strategy_rounds=2),
    # under 90 minutes on a 2-core CPU for OpinionQA, embeddings included (README): 24 rounds where the
    # paper ran ~1,000 (30 rounds of GPO, 40 of the default predictor and 20 of the strategies took 110)
    "default": Scale("default", rounds=24, eval_every=8, embedder_questions=200),
    # the paper's scale (1,000 rounds, every question, ablations on every dataset): GPU territory
    "full": Scale("full", rounds=1000, eval_every=10, ablations_on_every_dataset=True),
}


@dataclass
class Plan:
    """What one dataset's reproduction ran: run directories by role, and what the report adds."""

    dataset: str
    main: dict[str, list[str]] = field(default_factory=dict)        # method label -> run dirs (one per seed)
    mu_sweep: list[dict] = field(default_factory=list)              # {"mu", "run", "heldback", "heldout"}
    mu: float | None = None
    local_steps: dict[int, str] = field(default_factory=dict)       # local steps -> run dir
    weighting: dict[str, str] = field(default_factory=dict)         # weighting -> run dir
    weighting_sizes: dict[str, int] = field(default_factory=dict)   # training group -> training questions
    embedders: dict[str, dict] = field(default_factory=dict)        # embedder -> {"run", "dim", "questions"}
    eval_context: dict[str, dict[str, float]] = field(default_factory=dict)  # run dir -> {context: alignment}
    default_main: dict[str, list[str]] = field(default_factory=dict)  # the default predictor's: method -> run dirs
    stress: dict[str, dict[str, str]] = field(default_factory=dict)  # skew -> method label -> run dir
    strategies: dict[str, list[str]] = field(default_factory=dict)   # strategy label -> run dirs (one per seed)


# The paper's predictor and optimiser (GPO on its raw embeddings, Adam 3e-4, no schedule): what the
# reproduction runs unless its run-config overrides name something else.
PAPER_PREDICTOR = {"model": "gpo", "features": "raw", "lr": 0.0003, "lr-schedule": "constant", "warmup-steps": 0}
# The default predictor's FedProx (its comparison, the stress test, the strategies): the middle of the
# paper's predictor's mu sweep, not swept again.
DEFAULT_PREDICTOR_MU = 0.1
# Open question 3: the aggregation rules compared, as run-config changes to FedAvg's federation. The
# adaptive ones share one normalised server step, FedAdam's best of 0.003, 0.01, 0.03 and 0.1 in a
# 30-round probe (README); q-FedAvg assumes SGD clients, whose lr is its 1/L (strategies.py).
STRATEGY_COMPARISON = {
    "FedAvg (size-weighted)": {"strategy": "fedavg", "weighting": "num-examples"},
    "FedAvg (uniform)": {"strategy": "fedavg", "weighting": "uniform"},
    f"FedProx (mu={DEFAULT_PREDICTOR_MU:g})": {"strategy": "fedprox", "proximal_mu": DEFAULT_PREDICTOR_MU},
    "FedAdam": {"strategy": "fedadam", "server_lr": 0.03},
    "FedYogi": {"strategy": "fedyogi", "server_lr": 0.03},
    "FedAdagrad": {"strategy": "fedadagrad", "server_lr": 0.03},
    "q-FedAvg (q=1)": {"strategy": "qfedavg", "qfedavg_q": 1.0, "client_optimizer": "sgd", "lr": 1.0},
}


def reproduce(datasets: dict[str, str], scale: Scale, base: RunConfig, out: str | Path, echo=print,
              command: str = "", plural: RunConfig | None = None) -> dict:
    """Run every missing run of the reproduction and return the manifest (also written to out).

    `base` is the paper's predictor (PAPER_PREDICTOR), `plural` the default predictor in FedAvg's
    federation (its comparison, the stress test and the strategies; none without it). `datasets` maps a
    dataset name to its path ("" = the hub for GlobalOpinionQA). A dataset that cannot be loaded is
    reported as skipped, with the reason, before any training starts."""
    out = Path(out).resolve()
    started = time.perf_counter()
    usable, skipped = {}, {}
    for name, path in datasets.items():
        cfg = base.replace(dataset=name, data_path=str(Path(path).resolve()) if path else "")
        try:
            D.prepare(cfg)  # fails fast on a bad path, unknown groups or (offline) the hub
            usable[name] = cfg
        except (D.DataError, OSError) as exc:
            skipped[name] = f"{exc} (to `pluralllm reproduce`: --dataset {name}=PATH)"
            echo(f"reproduce: SKIPPING {name}: {skipped[name]}")
    if not usable:
        raise D.DataError(f"no dataset could be loaded: {skipped}")
    echo(f"reproduce: {scale.describe()}; datasets {list(usable)}; runs in {out}")
    # Earlier invocations (an interrupted reproduction, or one that reused every run) keep their time.
    before = load_manifest(out) if (out / MANIFEST).is_file() else {}
    manifest = {"invocations": [*before.get("invocations", []), {"command": command, "seconds": 0.0}],
                "simulations": before.get("simulations", []), "scale": asdict(scale),
                "base_config": base.to_mapping(), "skipped": skipped, "datasets": {}}
    for i, (name, cfg) in enumerate(usable.items()):
        ablations = i == 0 or scale.ablations_on_every_dataset
        plan = _reproduce_dataset(cfg, scale, out / name, echo, ablations=ablations, simulations=manifest["simulations"])
        if plural is not None:
            plural_here = plural.replace(dataset=cfg.dataset, data_path=cfg.data_path)
            plan.default_main = _default_comparison(plural_here, scale, out / name, echo, manifest["simulations"])
            if ablations:
                plan.stress = _stress_test(plural_here, scale, out / name, echo, manifest["simulations"],
                                           plan.default_main)
                plan.strategies = _strategies(plural_here, scale, out / name, echo, manifest["simulations"])
        manifest["datasets"][name] = asdict(plan)
        manifest["invocations"][-1]["seconds"] = round(time.perf_counter() - started, 1)
        _write_manifest(out, manifest)
    return manifest


def _write_manifest(out: Path, manifest: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def load_manifest(out: str | Path) -> dict:
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no reproduction here; run `pluralllm reproduce` first")
    return json.loads(path.read_text())


def _reproduce_dataset(cfg: RunConfig, scale: Scale, out: Path, echo, ablations: bool, simulations: list) -> Plan:
    cfg = cfg.replace(num_server_rounds=scale.rounds, eval_every=scale.eval_every)
    plan = Plan(cfg.dataset)
    first, *others = scale.seeds
    fedavg = cfg.replace(strategy="fedavg", proximal_mu=0.0)
    fedprox = cfg.replace(strategy="fedprox")
    uneven = fedavg.replace(seed=first, common_questions=False)  # groups keep all their questions: sizes differ
    embedder_cfgs = {e: fedavg.replace(seed=first, embedder=e, max_questions=scale.embedder_questions)
                     for e in scale.embedders}
    # every run's data and embeddings first (with progress): a bad embedder fails now, not after an hour
    prepared = {c: prepare_experiment(c) for c in [fedavg.replace(seed=first)]
                + ([uneven, *embedder_cfgs.values()] if ablations else [])}
    # every run of a dataset trains the same groups: one virtual SuperNode per training group
    run = _Runner(out, echo, nodes=len(prepared[fedavg.replace(seed=first)].split.train), simulations=simulations)
    # Federated runs are queued and run as one batch per Flower simulation (Flower and Ray start once):
    # first every run that does not depend on the chosen mu, then FedProx's other seeds with it.
    runs = {"FedAvg": [run.federated("fedavg", fedavg.replace(seed=s)) for s in scale.seeds]}
    sweep = {mu: run.federated(f"fedprox-mu{mu:g}", fedprox.replace(seed=first, proximal_mu=mu)) for mu in scale.mus}
    if ablations:
        work = cfg.num_server_rounds * cfg.local_steps  # local steps per client, held fixed across the ablation
        per_round = cfg.eval_every * cfg.local_steps  # and evaluated at the same work
        for steps in scale.local_steps:
            plan.local_steps[steps] = runs["FedAvg"][0] if steps == cfg.local_steps else run.federated(
                f"local-steps-{steps}", fedavg.replace(seed=first, local_steps=steps,
                                                       num_server_rounds=max(1, round(work / steps)),
                                                       eval_every=max(1, round(per_round / steps))))
        exp = prepared[uneven]
        plan.weighting_sizes = {g: len(exp.question_ids(g, "train")) for g in exp.split.train}
        for weighting in ("num-examples", "uniform"):
            plan.weighting[weighting] = run.federated(f"weighting-{weighting}", uneven.replace(weighting=weighting))
        for embedder, emb_cfg in embedder_cfgs.items():
            reuse = emb_cfg == fedavg.replace(seed=first)
            path = runs["FedAvg"][0] if reuse else run.federated(f"embedder-{_slug(embedder)}", emb_cfg)
            plan.embedders[embedder] = {"run": path, "dim": prepared[emb_cfg].table.dim,
                                        "questions": len(prepared[emb_cfg].data.questions)}
    run.flush()
    runs["Centralized"] = [run.centralized("centralized", cfg.replace(seed=s)) for s in scale.seeds]
    for mu, path in sweep.items():
        final = load_results(path)["final"]
        plan.mu_sweep.append({"mu": mu, "run": path, "heldback": final.get("heldback_alignment"),
                              "heldout": final["alignment"]})
    plan.mu = _choose_mu(plan.mu_sweep)
    echo(f"reproduce: FedProx mu = {plan.mu:g} (best held-back alignment of the training groups)")
    runs["FedProx"] = [sweep[plan.mu]] + [run.federated(f"fedprox-mu{plan.mu:g}", fedprox.replace(
        seed=s, proximal_mu=plan.mu)) for s in others]
    run.flush()
    plan.main = {"FedAvg": runs["FedAvg"], f"FedProx (mu={plan.mu:g})": runs["FedProx"],
                 "Centralized": runs["Centralized"]}
    if ablations:
        plan.eval_context = _eval_context([p for paths in runs.values() for p in paths], scale.eval_contexts)
    return plan


def _default_comparison(cfg: RunConfig, scale: Scale, out: Path, echo, simulations: list) -> dict[str, list[str]]:
    """The paper's comparison again with the default predictor: FedAvg, FedProx (DEFAULT_PREDICTOR_MU)
    and centralized training (compute-matched), every seed."""
    cfg = cfg.replace(num_server_rounds=scale.default_rounds, eval_every=max(1, scale.default_rounds // 5))
    mu = DEFAULT_PREDICTOR_MU
    echo(f"reproduce: the default predictor ({cfg.model!r}): FedAvg, FedProx (mu={mu:g}), centralized")
    run = _Runner(out, echo, nodes=len(prepare_experiment(cfg).split.train), simulations=simulations)
    runs = {"FedAvg": [run.federated("default-model/fedavg", cfg.replace(seed=s, strategy="fedavg"))
                       for s in scale.seeds],
            f"FedProx (mu={mu:g})": [run.federated(f"default-model/fedprox-mu{mu:g}", cfg.replace(
                seed=s, strategy="fedprox", proximal_mu=mu)) for s in scale.seeds]}
    run.flush()
    runs["Centralized"] = [run.centralized("default-model/centralized", cfg.replace(seed=s)) for s in scale.seeds]
    return runs


def _stress_test(cfg: RunConfig, scale: Scale, out: Path, echo, simulations: list,
                 default_main: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """The paper's experiment 3: FedAvg, FedProx and centralized training (at equal work) of the
    default predictor on the data skewed at each strength of `scale.skews` (skew.py), first seed.
    Skew 0 is the data itself: at the comparison's rounds, its runs are the comparison's first seed's."""
    cfg = cfg.replace(num_server_rounds=scale.stress_rounds, eval_every=scale.stress_rounds, seed=scale.seeds[0])
    echo(f"reproduce: non-IID stress test, skew {list(scale.skews)}, model {cfg.model!r}")
    run = _Runner(out, echo, nodes=len(prepare_experiment(cfg).split.train), simulations=simulations)
    fedprox = f"FedProx (mu={DEFAULT_PREDICTOR_MU:g})"
    runs = {}
    for skew in scale.skews:
        if skew == 0 and scale.stress_rounds == scale.default_rounds:
            runs["0"] = {"FedAvg": default_main["FedAvg"][0], "FedProx": default_main[fedprox][0],
                         "Centralized": default_main["Centralized"][0]}
            echo("reproduce: stress test at skew 0 = the default predictor's comparison, seed "
                 f"{scale.seeds[0]} (the same runs)")
            continue
        at = cfg.replace(skew=skew)
        runs[f"{skew:g}"] = {"FedAvg": run.federated(f"stress/skew-{skew:g}/fedavg", at.replace(strategy="fedavg")),
                             "FedProx": run.federated(f"stress/skew-{skew:g}/fedprox-mu{DEFAULT_PREDICTOR_MU:g}",
                                                      at.replace(strategy="fedprox", proximal_mu=DEFAULT_PREDICTOR_MU))}
    run.flush()
    for skew in scale.skews:
        if "Centralized" not in runs[f"{skew:g}"]:
            runs[f"{skew:g}"]["Centralized"] = run.centralized(f"stress/skew-{skew:g}/centralized",
                                                               cfg.replace(skew=skew))
    return runs


def _strategies(cfg: RunConfig, scale: Scale, out: Path, echo, simulations: list) -> dict[str, list[str]]:
    """Open question 3: every rule of STRATEGY_COMPARISON, and centralized training at equal work, on
    every group of the dataset as a client or held out ('auto' split, which each seed draws anew), each
    group with all its own questions, so that group sizes differ."""
    cfg = cfg.replace(train_groups="auto", eval_groups="auto", common_questions=False,
                      num_server_rounds=scale.strategy_rounds, eval_every=scale.strategy_rounds)
    seeds = scale.seeds[:scale.strategy_seeds]
    echo(f"reproduce: aggregation strategies {list(STRATEGY_COMPARISON)}, seeds {list(seeds)}")
    run = _Runner(out, echo, nodes=len(prepare_experiment(cfg.replace(seed=seeds[0])).split.train),
                  simulations=simulations)
    runs = {label: [run.federated(f"strategies/{re.sub(r'[^a-z0-9.]+', '-', label.lower()).strip('-')}",
                                  cfg.replace(seed=s, **changes)) for s in seeds]
            for label, changes in STRATEGY_COMPARISON.items()}
    run.flush()
    runs["Centralized"] = [run.centralized("strategies/centralized", cfg.replace(seed=s)) for s in seeds]
    return runs


def _choose_mu(sweep: list[dict]) -> float:
    """The mu whose run scores best on the training groups' held-back questions (validation data:
    the held-out groups are never used to choose); the smallest mu on ties."""
    if any(s["heldback"] is None for s in sweep):
        raise ConfigError("choosing FedProx's mu needs the clients' held-back evaluation: set heldback-fraction > 0")
    return max(sweep, key=lambda s: (s["heldback"], -s["mu"]))["mu"]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name.strip("/").split("/")[-1])


def _eval_context(paths: list[str], contexts: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Held-out alignment of each run's final model with k context questions per held-out group: its
    final evaluation's context-size curve (run-config eval-context-sizes), which every run records."""
    scores: dict[str, dict[str, float]] = {}
    for path in paths:
        run = load_results(path)
        curve = run["final"].get("context_curve") or {}
        missing = [k for k in contexts if str(k) not in curve]
        if missing:
            raise ConfigError(f"{path}: its evaluation has no context size {missing} (it has {sorted(curve, key=int)}); "
                              f"add them to run-config eval-context-sizes={run['config']['eval-context-sizes']!r}")
        scores[path] = {str(k): curve[str(k)] for k in contexts}
    return scores


class _Runner:
    """Runs (or reuses) one run directory per (name, seed), printing a line per run. Centralized runs
    run at once; federated ones are queued until `flush`, which runs those not already complete as
    one batch in one Flower simulation and records its fixed cost in `simulations`."""

    def __init__(self, out: Path, echo, nodes: int, simulations: list) -> None:
        self.out, self.echo, self.nodes, self.simulations, self.count = out, echo, nodes, simulations, 0
        self.queued: list[tuple[str, RunConfig]] = []

    def federated(self, name: str, cfg: RunConfig) -> str:
        path, label = self._place(name, cfg)
        cfg = claim_or_reuse(path, cfg, cfg.num_server_rounds, self.echo, label)
        if cfg is not None:
            self.queued.append((label, cfg))
            self.echo(f"{label}: queued")
        return str(path)

    def flush(self) -> None:
        """Run every queued federated run, in one Flower simulation."""
        if not self.queued:
            return
        queued, self.queued = self.queued, []
        self.echo(f"reproduce: {len(queued)} federated run(s) in one Flower simulation ...")
        started = time.perf_counter()
        labels, reported = {cfg.out_dir: label for label, cfg in queued}, set()

        def report(out_dir: str) -> None:
            reported.add(out_dir)
            _report(Path(out_dir), labels[out_dir], load_results(out_dir)["final"]["wall_seconds"], self.echo)

        def progress(line: str) -> None:  # the ServerApp's last line of each run names its out-dir
            out_dir = line.rsplit("results in ", 1)[-1].strip()
            if line.startswith("done:") and out_dir in labels:
                report(out_dir)
        simulate_batch([cfg for _, cfg in queued], self.nodes, echo=progress)
        seconds = time.perf_counter() - started
        for out_dir in labels.keys() - reported:
            report(out_dir)
        in_runs = sum(load_results(cfg.out_dir)["final"]["wall_seconds"] for _, cfg in queued)
        self.simulations.append({"runs": len(queued), "seconds": round(seconds, 1), "run_seconds": round(in_runs, 1)})
        self.echo(f"reproduce: {len(queued)} run(s) in {seconds:.0f} s, of which {seconds - in_runs:.0f} s Flower's "
                  "start-up, teardown and the set-up between runs")

    def centralized(self, name: str, cfg: RunConfig) -> str:
        path, label = self._place(name, cfg)
        return run_or_reuse(path, cfg, cfg.num_server_rounds * cfg.local_steps,
                            lambda cfg: train_centralized(cfg, compute_matched=True, progress=False), self.echo, label)

    def _place(self, name: str, cfg: RunConfig) -> tuple[Path, str]:
        self.count += 1
        return self.out / name / f"seed-{cfg.seed}", f"[{self.count}] {self.out.name}/{name}/seed-{cfg.seed}"


def claim_or_reuse(path: Path, cfg: RunConfig, last_round: int, echo, label: str) -> RunConfig | None:
    """None when `path` holds a complete run with the same run-config (reused); else the run's config
    writing into `path`, an incomplete or differently configured run there moved aside first."""
    cfg = cfg.replace(out_dir=str(path))
    if _complete(path, cfg, last_round):
        echo(f"{label}: complete, reused")
        return None
    if holds_run(path):
        echo(f"{label}: the run there is incomplete or has another run-config; moved to "
             f"{claim_run_dir(cfg, path, overwrite=True)}")
    return cfg


def run_or_reuse(path: Path, cfg: RunConfig, last_round: int, go, echo, label: str) -> str:
    """Run `go(cfg)` into `path`, unless a complete run with the same run-config is already there
    (`claim_or_reuse`); a line before and after."""
    cfg = claim_or_reuse(path, cfg, last_round, echo, label)
    if cfg is not None:
        started = time.perf_counter()
        echo(f"{label}: running ...")
        go(cfg)
        _report(path, label, time.perf_counter() - started, echo)
    return str(path)


def _report(path: Path, label: str, seconds: float, echo) -> None:
    final = load_results(path)["final"]
    echo(f"{label}: held-out alignment {final['alignment']:.4f}, conditioning gain {fmt_gain(final)} at round "
         f"{final['round']} ({seconds:.0f} s)")


# Settings that may differ without changing a run's numbers.
_INCIDENTAL = {"cache-dir", "device", "round-timeout", "data-path"}


def _complete(path: Path, cfg: RunConfig, last_round: int) -> bool:
    if not (path / RESULTS_FILE).is_file() or not (path / LAST_CHECKPOINT).is_file():
        return False
    try:
        results = load_results(path)
    except (OSError, ValueError):
        return False
    recorded = {**RunConfig().to_mapping(), **results["config"]}  # a key added since then has its default, which
    # by this project's rule keeps the behaviour of the code that wrote the run
    same = {k: v for k, v in recorded.items() if k not in _INCIDENTAL} == \
        {k: v for k, v in cfg.to_mapping().items() if k not in _INCIDENTAL}
    final = results.get("final") or {}
    return same and final.get("round") == last_round and not math.isnan(final.get("alignment", math.nan))

