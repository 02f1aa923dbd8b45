"""Result directories → PNG plots and a Markdown report (`pluralllm report DIR...`).

Reads only results.json (the results contract), so every method — federated or centralized — is
reported the same way. Runs of the same method with different seeds are drawn as a mean line with
a min–max band.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: reports are written on headless machines too
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .results import BASELINE_NAMES, load_results  # noqa: E402


def write_report(run_dirs: list[str | Path], out_dir: str | Path, title: str = "PluralLLM results") -> Path:
    """Plots (alignment vs rounds, vs gradient steps, per group) and report.md into out_dir."""
    runs = [load_results(d) for d in run_dirs]
    if not runs:
        raise ValueError("report needs at least one run directory")
    for run, path in zip(runs[1:], run_dirs[1:]):
        if (run["dataset"], run["eval_groups"]) != (runs[0]["dataset"], runs[0]["eval_groups"]):
            raise ValueError(f"{path}: dataset {run['dataset']} with held-out groups {run['eval_groups']} differs from "
                             f"{run_dirs[0]} ({runs[0]['dataset']}, {runs[0]['eval_groups']}); report comparable runs together")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_method: dict[str, list[dict]] = defaultdict(list)  # one line (and band over seeds) per setting
    for run in runs:
        by_method[_setting(run, runs)].append(run)
    figures = {
        "alignment_vs_rounds.png": curve_plot(by_method, "round", "round (federated) / epoch (centralized)"),
        "alignment_vs_steps.png": curve_plot(by_method, "gradient_steps", "gradient steps (all clients)"),
        "per_group.png": group_plot(by_method),
    }
    if all(r["final"].get("context_curve") for r in runs):
        figures["alignment_vs_context.png"] = context_plot(by_method)
    if any("epsilon" in e for run in runs for e in run["history"]):
        figures["alignment_vs_epsilon.png"] = _privacy_plot(runs)
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
    report = out / "report.md"
    report.write_text(_markdown(title, by_method, list(figures)))
    return report


# Settings that tell runs apart without changing what is compared (seeds make the bands).
_NOT_A_SETTING = {"seed", "out-dir", "resume", "cache-dir", "data-path", "num-server-rounds", "eval-bundles"}


def _setting(run: dict, runs: list[dict]) -> str:
    """The run's method plus every run-config value that differs between the runs of that method."""
    same_method = [r for r in runs if r["method"] == run["method"]]
    varying = sorted(k for k in run["config"] if k not in _NOT_A_SETTING
                     and len({str(r["config"].get(k)) for r in same_method}) > 1)
    return " ".join([run["method"], *(f"{k}={run['config'][k]}" for k in varying)])


def curve_plot(by_method: dict[str, list[dict]], x: str, xlabel: str):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, runs in sorted(by_method.items()):
        xs, mean, low, high = band(runs, x)
        line, = ax.plot(xs, mean, label=f"{method} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
    baseline_lines(ax, next(iter(by_method.values()))[0]["baselines"])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out alignment (1 − JS distance)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def band(runs: list[dict], x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over runs at the x values every run has; where runs share no x values
    (seconds), each run is interpolated onto a grid over the x range they all cover."""
    common = sorted(set.intersection(*({e[x] for e in r["history"]} for r in runs)))
    if len(common) < 2 and len(runs) > 1:
        start = max(r["history"][0][x] for r in runs)
        end = min(r["history"][-1][x] for r in runs)
        grid = np.linspace(start, end, 60)
        values = np.array([np.interp(grid, [e[x] for e in r["history"]], [e["alignment"] for e in r["history"]])
                           for r in runs])
        return grid, values.mean(0), values.min(0), values.max(0)
    values = np.array([[{e[x]: e["alignment"] for e in r["history"]}[v] for v in common] for r in runs], float)
    return np.array(common), values.mean(0), values.min(0), values.max(0)


BASELINE_STYLES = {"uniform": ("grey", ":"), "train_mean": ("black", "--"), "nearest_group": ("tab:brown", "-."),
                   "context_mixture": ("tab:red", (0, (5, 1, 1, 1, 1, 1)))}


def baseline_lines(ax, baselines: dict) -> None:
    for name, b in available_baselines(baselines).items():
        color, style = BASELINE_STYLES.get(name, ("grey", ":"))
        ax.axhline(b["alignment"], color=color, linestyle=style, linewidth=1,
                   label=f"{BASELINE_NAMES.get(name, name)} baseline ({b['alignment']:.3f})")


def focus_limits(values: list[float], baselines: dict) -> tuple[float, float]:
    """y-limits around the plotted values and the informed baselines (not uniform, far below), so
    differences of a few thousandths stay visible; the uniform line is then off the plot."""
    values = [v for v in values if np.isfinite(v)]
    values += [b["alignment"] for n, b in available_baselines(baselines).items() if n != "uniform"]
    low, high = min(values), max(values)
    pad = max(0.002, 0.1 * (high - low))
    return low - pad, high + pad


def context_plot(by_method: dict[str, list[dict]]):
    """Final alignment against the number of context questions, one line per setting (mean over seeds)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    plotted: list[float] = []
    for method, runs in sorted(by_method.items()):
        curves = [r["final"].get("context_curve") for r in runs]
        if not all(curves):
            continue
        sizes = sorted(curves[0], key=int)
        means = [float(np.mean([c[k] for c in curves])) for k in sizes]
        ax.plot([int(k) for k in sizes], means, marker="o", label=method)
        plotted += means
    baselines = next(iter(by_method.values()))[0]["baselines"]
    baseline_lines(ax, baselines)
    ax.set_ylim(*focus_limits(plotted, baselines))
    ax.set_xscale("log")
    ax.set_xlabel("context questions of the held-out group")
    ax.set_ylabel("held-out alignment (1 − JS distance)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _privacy_plot(runs: list[dict]):
    """Alignment against the privacy spent (epsilon at the run's delta), one line per DP run."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in runs:
        points = [(e["epsilon"], e["alignment"]) for e in run["history"] if e.get("epsilon")]  # > 0: log axis
        if points:
            c = run["config"]
            ax.plot(*zip(*points), marker="o", label=f"{run['method']} dp={c['dp']} noise={c['dp-noise']} "
                                                      f"clip={c['dp-clip']} (seed {run['seed']})")
    baseline_lines(ax, runs[0]["baselines"])
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon spent (delta = {runs[0]['config']['dp-delta']:g})")
    ax.set_ylabel("held-out alignment (1 − JS distance)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def group_plot(by_method: dict[str, list[dict]]):
    first = next(iter(by_method.values()))[0]
    groups = first["eval_groups"]
    methods = sorted(by_method)
    width = 0.8 / (len(methods) + 2)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 4.2))
    xs = np.arange(len(groups))
    bars = [(f"{m} (final)", [np.mean([r["final"]["per_group"][g] for r in by_method[m]]) for g in groups])
            for m in methods]
    bars += [(f"{name} baseline", [b["per_group"][g] for g in groups]) for name, b in available_baselines(first["baselines"]).items()]
    for i, (label, values) in enumerate(bars):
        ax.bar(xs + (i - len(bars) / 2 + 0.5) * width, values, width, label=label)
    ax.set_xticks(xs, groups, rotation=30, ha="right")
    low = min(min(v) for _, v in bars)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_ylabel("alignment")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def available_baselines(baselines: dict) -> dict:
    """The baselines that could be computed (a deployment's server can compute only uniform)."""
    return {name: b for name, b in baselines.items() if b["alignment"] is not None}


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _markdown(title: str, by_method: dict[str, list[dict]], figures: list[str]) -> str:
    first = next(iter(by_method.values()))[0]
    lines = [f"# {title}", "", f"Dataset `{first['dataset']}`, embedder `{first['embedder']}`; "
             f"{len(first['train_groups'])} training groups, held-out groups: {', '.join(first['eval_groups'])}.", "",
             "Conditioning gain: the final model's alignment with each held-out group's own context minus with another "
             "held-out group's answers to the same context questions (0 = the model ignores the group).", "",
             "| method | runs | final alignment | conditioning gain | best alignment (round) | gradient steps | Jain | CoV "
             "| worst group |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, runs in sorted(by_method.items()):
        final = [r["final"] for r in runs]
        best = [r["best"] for r in runs]
        lines.append(
            f"| {method} | {len(runs)} | {fmt(float(np.mean([f['alignment'] for f in final])))} | {_mean_gain(final)} | "
            f"{fmt(float(np.mean([b['alignment'] for b in best])))} ({', '.join(str(b['round']) for b in best)}) | "
            f"{final[0]['gradient_steps']} | {fmt(float(np.mean([f['fairness']['jain'] for f in final])))} | "
            f"{fmt(float(np.mean([f['fairness']['cov'] for f in final])))} | "
            f"{final[0]['fairness']['worst_group']} ({fmt(final[0]['fairness']['worst'])}) |")
    for name, base in first["baselines"].items():
        extra = f", coverage {base['coverage']:.0%}" if base.get("coverage") is not None else ""
        extra += f" (unavailable: {base['unavailable']})" if "unavailable" in base else ""
        lines.append(f"| {BASELINE_NAMES.get(name, name)} baseline{extra} | – | {fmt(base['alignment'])} | – | – | – | – | – | – |")
    lines += ["", "## Per held-out group (final model; baselines for comparison)", "",
              "| group | " + " | ".join(sorted(by_method)) + " | "
              + " | ".join(BASELINE_NAMES.get(n, n) for n in available_baselines(first["baselines"])) + " |",
              "|---" * (1 + len(by_method) + len(available_baselines(first["baselines"]))) + "|"]
    for group in first["eval_groups"]:
        cells = [fmt(float(np.mean([r["final"]["per_group"][group] for r in by_method[m]]))) for m in sorted(by_method)]
        cells += [fmt(b["per_group"][group]) for b in available_baselines(first["baselines"]).values()]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines += _context_section(by_method) + _unseen_section(by_method, first["baselines"])
    lines += [""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)


def _mean_gain(entries: list[dict]) -> str:
    gains = [e.get("conditioning_gain") for e in entries]
    return "n/a" if any(g is None for g in gains) else f"{np.mean(gains):+.4f}"


def _context_section(by_method: dict[str, list[dict]]) -> list[str]:
    curves = {m: [r["final"].get("context_curve") for r in runs] for m, runs in sorted(by_method.items())}
    curves = {m: c for m, c in curves.items() if all(c)}
    if not curves:
        return []
    sizes = sorted(next(iter(curves.values()))[0], key=int)
    lines = ["", "## Alignment against context size (final model)", "",
             "| method | " + " | ".join(sizes) + " |", "|---" * (1 + len(sizes)) + "|"]
    for method, cs in curves.items():
        lines.append(f"| {method} | " + " | ".join(fmt(float(np.mean([c[k] for c in cs]))) for k in sizes) + " |")
    return lines


def _unseen_section(by_method: dict[str, list[dict]], baselines: dict) -> list[str]:
    rows = {m: [r["final"]["unseen"] for r in runs] for m, runs in sorted(by_method.items())
            if all("unseen" in r["final"] for r in runs)}
    if not rows:
        return []
    uniform = baselines["uniform"].get("unseen")
    lines = ["", "## Unseen questions (no training group trained on them; final model)", "",
             f"Uniform scores {fmt(uniform)} on them; no train-mean exists there.", "",
             "| method | with the group's context | with an uninformative context | conditioning gain | questions |",
             "|---|---|---|---|---|"]
    for method, us in rows.items():
        gains = [u["conditioning_gain"] for u in us if u.get("conditioning_gain") is not None]
        gain = f"{float(np.mean(gains)):+.4f}" if gains else "n/a"
        lines.append(f"| {method} | {fmt(float(np.mean([u['alignment'] for u in us])))} | "
                     f"{fmt(float(np.mean([u['no_context'] for u in us])))} | {gain} | {us[0]['n_questions']} |")
    return lines
