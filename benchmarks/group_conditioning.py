"""Does the predictor learn each group? The ablation behind the README's conditioning figures.

For each setting (model × features × sampler, one factor changed at a time from the default) and
each method (centralized; FedAvg through Flower's simulation at its best settings; the demo's federation,
FedAdam over one-step clients), over seeds, it prints a Markdown table
of held-out alignment, conditioning gain (own context minus another held-out group's answers to the
same context questions), alignment with 5 and 50 context questions, and seen against unseen
questions, beside the four baselines measured in the same runs; then writes the table and figures
to --report (default docs/conditioning/). Every run is an ordinary run directory under --out;
complete runs with the same run-config are reused, so an interrupted benchmark continues.

    python benchmarks/group_conditioning.py --data ../shared/data/opinionqa/human_resp
    python benchmarks/group_conditioning.py --data ... --settings default --methods centralized --seeds 0
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pluralllm_flwr.centralized import train_centralized  # noqa: E402
from pluralllm_flwr.config import (DEMO_FEDERATION, DEMO_ROUNDS, FEDAVG_FEDERATION, FEDAVG_ROUNDS,  # noqa: E402
                                   RunConfig, parse_overrides)
from pluralllm_flwr.data import prepare  # noqa: E402
from pluralllm_flwr.report import baseline_lines, focus_limits  # noqa: E402
from pluralllm_flwr.reproduce import run_or_reuse  # noqa: E402
from pluralllm_flwr.results import BASELINE_NAMES, load_results  # noqa: E402
from pluralllm_flwr.simulation import simulate  # noqa: E402

# One factor at a time from the default (the run-config defaults in pyproject.toml). GPO keeps its own
# learning rate (the reference's Adam 3e-4): at the mixture's 3e-3 it stays at the uniform answer.
GPO_LR = 3e-4
SETTINGS = {
    "default": {},
    "gpo": {"model": "gpo", "lr": GPO_LR},
    "gpo-raw": {"model": "gpo", "features": "raw", "lr": GPO_LR},
    "residual": {"model": "residual"},
    "raw-features": {"features": "raw"},
    "question-option": {"features": "question-option"},
    "same-questions": {"episode-sampler": "same-questions"},
}
FEDERATIONS = {"fedavg": (FEDAVG_FEDERATION, FEDAVG_ROUNDS), "fedadam": (DEMO_FEDERATION, DEMO_ROUNDS)}
METHODS = ("centralized", *FEDERATIONS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="OpinionQA's human_resp folder")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {list(SETTINGS)}")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--skip", default="", help="comma-separated SETTING/METHOD cells of the grid not to run (e.g. "
                   "gpo/fedavg, hours per seed on 2 CPU cores); the report names them")
    p.add_argument("--steps", type=int, default=3000, help="centralized gradient steps")
    p.add_argument("--rounds", type=int, default=0, help=f"federated rounds (0: fedavg {FEDAVG_ROUNDS}, fedadam "
                   f"{DEMO_ROUNDS}, the demo's)")
    p.add_argument("--heldout-questions", type=float, default=0.1, help="share of questions nobody trains on")
    p.add_argument("--run-config", "-c", default="", help="further run-config overrides for every run")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the centralized runs (0 = torch's default)")
    p.add_argument("--out", default="runs/group_conditioning")
    p.add_argument("--report", default="docs/conditioning", help="folder for results.md and the figures")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = args.settings.split(",")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        p.error(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    base = {"dataset": "opinionqa", "data-path": str(Path(args.data).resolve()),
            "heldout-questions": args.heldout_questions, **parse_overrides([args.run_config])}
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    if set(methods) - set(METHODS):
        p.error(f"unknown methods {sorted(set(methods) - set(METHODS))}; known: {list(METHODS)}")
    cells = [cell for cell in args.skip.split(",") if cell]
    outside = [cell for cell in cells if cell not in {f"{s}/{m}" for s in settings for m in methods}]
    if outside:
        p.error(f"--skip {outside}: not SETTING/METHOD cells of --settings x --methods")
    skipped = [tuple(cell.split("/")) for cell in cells]
    nodes = len(prepare(RunConfig.from_mapping(base))[1].train)  # a bad path or setting fails here, before any run
    out = Path(args.out).resolve()
    runs: dict[tuple[str, str], list[dict]] = {}
    plan = [(s, m, seed) for s in settings for m in methods if (s, m) not in skipped for seed in seeds]
    for i, (setting, method, seed) in enumerate(plan, 1):
        values = {**base, **SETTINGS[setting], "seed": seed}
        if method == "centralized":
            values.update({"num-server-rounds": args.steps, "eval-every": max(1, args.steps // 10)})
            cfg, last, go = RunConfig.from_mapping(values), args.steps, lambda c: train_centralized(c, progress=False)
        else:
            federation, rounds = FEDERATIONS[method]
            last = args.rounds or rounds
            values.update({**federation, "num-server-rounds": last})
            cfg = RunConfig.from_mapping(values)
            go = lambda c: simulate(c, nodes, echo=lambda line: None)  # noqa: E731 - one virtual node per group
        path = run_or_reuse(out / setting / method / f"seed-{seed}", cfg, last, go, print,
                            f"[{i}/{len(plan)}] {setting}/{method}/seed-{seed}")
        runs.setdefault((setting, method), []).append(load_results(path))
    table = markdown(runs)
    if skipped:
        table += "\n\nNot run (--skip): " + ", ".join(f"{s} {m}" for s, m in skipped) + "."
    print(table)
    write_report(runs, table, Path(args.report), " ".join(["python", "benchmarks/group_conditioning.py", *(argv or sys.argv[1:])]))
    return 0


def _mean_sd(values: list[float | None], sign: str = "") -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    return f"{np.mean(values):{sign}.4f} ± {np.std(values):.4f}" if len(values) > 1 else f"{values[0]:{sign}.4f}"


def markdown(runs: dict[tuple[str, str], list[dict]]) -> str:
    first = next(iter(runs.values()))[0]
    lines = [f"Held-out groups {', '.join(first['eval_groups'])}; {len(first['train_groups'])} training groups; "
             "mean ± sd over seeds of the final model.", "",
             "| setting | method | seeds | alignment | minus the context mixture | conditioning gain | 5 context | "
             "50 context | unseen | unseen, uninformative context | unseen, conditioning gain |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (setting, method), rs in runs.items():
        finals = [r["final"] for r in rs]
        mixture = [r["baselines"]["context_mixture"]["alignment"] for r in rs]
        lines.append(f"| {setting} | {method} | {len(rs)} | {_mean_sd([f['alignment'] for f in finals])} | "
                     f"{_mean_sd([f['alignment'] - m for f, m in zip(finals, mixture)], '+')} | "
                     f"{_mean_sd([f.get('conditioning_gain') for f in finals], '+')} | "
                     f"{_mean_sd([f['context_curve'].get('5') for f in finals])} | "
                     f"{_mean_sd([f['context_curve'].get('50') for f in finals])} | "
                     f"{_mean_sd([f.get('unseen', {}).get('alignment') for f in finals])} | "
                     f"{_mean_sd([f.get('unseen', {}).get('no_context') for f in finals])} | "
                     f"{_mean_sd([f.get('unseen', {}).get('conditioning_gain') for f in finals], '+')} |")
    by_seed = {r["seed"]: r["baselines"] for rs in runs.values() for r in rs}  # the seed draws split and contexts
    lines += ["", f"Baselines on the same draws, mean ± sd over seeds {sorted(by_seed)} (they depend on the seed's "
              "held-back split, unseen questions and context draws, not on any model):", "",
              "| baseline | alignment | unseen |", "|---|---|---|"]
    for name in first["baselines"]:
        lines.append(f"| {BASELINE_NAMES.get(name, name)} | {_mean_sd([b[name]['alignment'] for b in by_seed.values()])} | "
                     f"{_mean_sd([b[name].get('unseen') for b in by_seed.values()])} |")
    return "\n".join(lines)


def write_report(runs: dict, table: str, folder: Path, command: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    first = next(iter(runs.values()))[0]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # one colour per line, for up to 20 setting × method lines
    plotted: list[float] = []
    for (setting, method), rs in runs.items():
        sizes = sorted(rs[0]["final"]["context_curve"], key=int)
        values = np.array([[r["final"]["context_curve"][k] for k in sizes] for r in rs])
        line, = ax.plot([int(k) for k in sizes], values.mean(0), marker="o", label=f"{setting} {method}",
                        linestyle="-" if method == "centralized" else "--")
        if len(rs) > 1:
            ax.fill_between([int(k) for k in sizes], values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
        plotted += values.ravel().tolist()
    baseline_lines(ax, first["baselines"])
    ax.set_ylim(*focus_limits(plotted, first["baselines"]))
    ax.set_xscale("log")
    ax.set_xlabel("context questions of the held-out group")
    ax.set_ylabel("held-out alignment (1 − JS distance)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(folder / "alignment-vs-context.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(7.5, 0.8 * len(runs)), 4.5))
    labels = [f"{s} {m}" for s, m in runs]
    gains = [[r["final"].get("conditioning_gain") or 0.0 for r in rs] for rs in runs.values()]
    ax.bar(range(len(labels)), [np.mean(g) for g in gains], yerr=[np.std(g) for g in gains], capsize=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=35, ha="right")
    ax.set_ylabel("conditioning gain (own − another group's context)")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(folder / "conditioning-gain.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    (folder / "results.md").write_text(
        f"# Group conditioning: measured\n\nWritten by `{command}`.\n\n{table}\n\n"
        "![alignment against context size](alignment-vs-context.png)\n\n![conditioning gain](conditioning-gain.png)\n")


if __name__ == "__main__":
    sys.exit(main())
