"""The reproduction's report: `docs/results.md` and its PNGs, from the manifest and run directories
that `reproduce.py` leaves. Every number is computed here from results.json files; the verdicts on
the paper's claims follow the rules stated in the report itself.
"""
from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: reports are written on headless machines too
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .config import ADAPTIVE_STRATEGIES  # noqa: E402
from .experiment import fmt_gain  # noqa: E402
from .metrics import rounds_to_target  # noqa: E402
from .report import available_baselines, curve_plot, fmt, group_plot  # noqa: E402
from .results import best_entry, load_results  # noqa: E402

PAPER = {"fed_rounds": 634, "central_rounds": 1180, "alignment_gain": 0.04}
TARGETS = (0.95, 0.99)
CENTRAL = "Centralized"
FAIRNESS_TOLERANCE = 0.01  # "nearly the same fairness": Jain's index within this of centralized
BREAKDOWN_SHARE = 0.9  # stress test: FedAvg breaks down where it reaches less of centralized's gain over uniform


def write_reproduction_report(manifest: dict, report: str | Path, command: str) -> Path:
    """docs/results.md (or `report`) plus PNGs in a folder named after it."""
    report = Path(report)
    figures = report.with_suffix("")  # docs/results.md -> docs/results/
    figures.mkdir(parents=True, exist_ok=True)
    scale = manifest["scale"]
    lines = [
        "# Reproducing PluralLLM's comparison", "",
        f"Runs by {_invocations(manifest['invocations'])} ({os.cpu_count()} CPU cores, {platform.machine()}); "
        f"this report written by `{command}` on "
        f"{time.strftime('%Y-%m-%d')} (commit {_commit()}). {_flower_overhead(manifest)}"
        "Do not edit by hand: rerun the command (complete runs are reused; the report is rewritten).", "",
        f"**Scale `{scale['name']}`**: {scale['rounds']} federated rounds, evaluated every {scale['eval_every']}, "
        f"seeds {list(scale['seeds'])}. " + _scale_note(scale), "",
    ]
    claims, sections = [], []
    for name, plan in manifest["datasets"].items():
        dataset_claims, section = _dataset_section(name, plan, scale, figures, report.parent)
        claims += dataset_claims
        sections += section
    lines += ["## The paper's claims against ours", "",
              "| claim (PluralLLM) | paper | ours | holds? |", "|---|---|---|---|", *claims, "",
              "Rules: a claim *holds* when it holds in every seed; *no* when it fails in every seed; *mixed* "
              "otherwise; *not reached* when a method never reached the target within this scale's budget. "
              "Reaching a score = the first evaluation at that share of the best centralized score (mean over seeds "
              "of the compute-matched centralized run's best). \"Nearly the same fairness\" = Jain's index within "
              f"{FAIRNESS_TOLERANCE} of centralized.", ""]
    lines += _method_notes(scale)
    lines += sections
    if manifest.get("skipped"):
        lines += ["## Not run", ""] + [f"- **{n}**: {reason}" for n, reason in manifest["skipped"].items()] + [""]
    report.write_text("\n".join(lines) + "\n")
    return report


def _scale_note(scale: dict) -> str:
    if scale["name"] == "full":
        return "This is the paper's scale (its federated runs converged at 634 rounds)."
    if scale["name"] == "smoke":
        return "A smoke run: it checks that every run, figure and table is produced; its numbers mean nothing."
    return ("Scaled down for a 2-core CPU (the time it took is above): the paper ran about 1,000 rounds, so absolute "
            "scores, and whether a method *reaches* a target at all, are for this budget only; the full scale is "
            "`make reproduce SCALE=full`.")


def _method_notes(scale: dict) -> list[str]:
    return ["## How the methods are compared", "",
            "- **FedAvg / FedProx**: every round, each training group's client runs `local-steps` (6) steps, one "
            "episode each, and the server averages (weighted by the groups' training questions). FedProx's mu is "
            "chosen from the sweep below by the training groups' *held-back* questions, never the held-out groups.",
            "- **Centralized**: one gradient step per epoch on a batch with one episode of every training group "
            "(the authors' reference). A federated round therefore does `local-steps` times the work of an epoch. "
            "One run per seed trains for rounds × local-steps epochs: its first `rounds` epochs are the "
            "**reference** view (epochs = rounds, as the paper counts), the whole run is the **compute-matched** view "
            "(the same episodes — forward/backward work and data seen — as the federated run).",
            "- Same model, embeddings, seeds (initial weights), episodes sizes and held-out evaluation for every "
            "method: 20 context questions per held-out group, all others targets, 5 seeded draws averaged.",
            "- x axes: *round/epoch* (the paper's view), *gradient steps* (federated: summed over clients), "
            "*episodes* (work), *training seconds* (wall-clock since the initial evaluation, less the held-out "
            "evaluations; federated runs include Flower's simulation overhead, ~15 s of Ray start-up in round 1).", ""]


def _dataset_section(name: str, plan: dict, scale: dict, figures: Path, root: Path) -> tuple[list[str], list[str]]:
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    first = load_results(plan["main"]["FedAvg"][0])
    out = [f"## {name}", "",
           f"{len(first['train_groups'])} training groups ({', '.join(first['train_groups'])}); "
           f"{len(first['eval_groups'])} held-out groups, never trained on ({', '.join(first['eval_groups'])}); "
           f"embedder `{first['embedder']}`. Runs: `{_shown(Path(plan['main']['FedAvg'][0]).parents[1])}`.", ""]
    claims, section = _comparison(name, "GPO", "", plan["main"], scale["rounds"], figures, rel)
    out += [f"### GPO, the paper's predictor (`{first['config']['model']}`, features `{first['config']['features']}`)",
            "", *section]
    out += ["#### FedProx: the mu sweep (seed " f"{scale['seeds'][0]})", "",
            "| mu | held-back alignment (training groups; chooses mu) | held-out alignment |", "|---|---|---|"]
    for s in plan["mu_sweep"]:
        chosen = " **(chosen)**" if s["mu"] == plan["mu"] else ""
        out.append(f"| {s['mu']:g}{chosen} | {fmt(s['heldback'])} | {fmt(s['heldout'])} |")
    out.append("")
    out += _ablations(name, plan, scale["seeds"][0], figures, rel)
    if plan.get("default_main"):
        default = load_results(plan["default_main"]["FedAvg"][0])
        cfg = default["config"]
        more, section = _comparison(name, f"default predictor ({cfg['model']})", "default-", plan["default_main"],
                                    default["final"]["round"], figures, rel)
        claims += more
        out += [f"### The default predictor (`{cfg['model']}`, features `{cfg['features']}`)", "",
                f"The same comparison in FedAvg's federation (`config.FEDAVG_FEDERATION`): every round each client "
                f"runs {cfg['local-steps']} local steps of {cfg['episodes-per-step']} episodes, Adam at lr {cfg['lr']:g} "
                f"with a {cfg['lr-schedule']} schedule; FedProx's mu is "
                f"{load_results(plan['default_main'][_fedprox(plan['default_main'])][0])['config']['proximal-mu']:g}.",
                "", *section]
    out += _stress(name, plan.get("stress") or {}, figures, rel)
    out += _strategies(name, plan.get("strategies") or {}, figures, rel)
    return claims, out


def _fedprox(main: dict) -> str:
    return next(label for label in main if label.startswith("FedProx"))


def _comparison(name: str, predictor: str, tag: str, main: dict[str, list[str]], rounds: int, figures: Path,
                rel) -> tuple[list[str], list[str]]:
    """One predictor's FedAvg / FedProx / centralized comparison: curves, the alignment and fairness
    table, the rounds to reach the centralized score, per group, and its rows of the claims table
    (its figures' names start with `name`-`tag`)."""
    runs = {label: [_since_start(load_results(p)) for p in paths] for label, paths in main.items()}
    central = runs.pop(CENTRAL)
    views = {**runs, f"{CENTRAL} (reference, {rounds} epochs)": [_until(r, rounds) for r in central],
             f"{CENTRAL} (compute-matched)": central}
    first = central[0]
    best_central = float(np.mean([r["best"]["alignment"] for r in central]))
    prefix = f"{name}-{tag}"
    out = []
    curves = {"round": "round (federated) / epoch (centralized)", "gradient_steps": "gradient steps",
              "episodes": "episodes (work: forward/backward passes)", "train_seconds": "training seconds"}
    plot_runs = {**runs, CENTRAL: central}
    for x, label in curves.items():
        fig = curve_plot(plot_runs, x, label)
        fig.axes[0].set_title(f"{name}, {predictor}: held-out alignment against {label.split(' (')[0]}")
        if x == "gradient_steps":
            fig.axes[0].set_xscale("symlog", linthresh=10)
        out.append(f"![alignment against {label}]({rel(_save(fig, figures / f'{prefix}alignment-vs-{x}.png'))})")
    out += ["", "Lines: mean over seeds; bands: min–max over seeds; grey: the uniform and train-mean baselines.", ""]
    out += ["#### Alignment and fairness", "",
            "| method | final alignment | best alignment | conditioning gain (final) | unseen questions (final) | "
            + ("final W1 alignment | " if _has_w1(first) else "")
            + "Jain (final) | CoV (final) | worst held-out group (final) |",
            "|---|---|---|---|---|" + ("---|" if _has_w1(first) else "") + "---|---|---|"]
    for label, rs in views.items():
        w1 = f"{_ms([r['final'].get('alignment_w1') for r in rs])} | " if _has_w1(first) else ""
        worst = [(r["final"]["fairness"]["worst_group"], r["final"]["fairness"]["worst"]) for r in rs]
        out.append(f"| {label} | {_ms([r['final']['alignment'] for r in rs])} | {_ms([r['best']['alignment'] for r in rs])} "
                   f"| {_ms([r['final'].get('conditioning_gain') for r in rs])} "
                   f"| {_ms([(r['final'].get('unseen') or {}).get('alignment') for r in rs])} "
                   f"| {w1}{_ms([r['final']['fairness']['jain'] for r in rs], 5)} | "
                   f"{_ms([r['final']['fairness']['cov'] for r in rs])} | "
                   f"{_mode([w for w, _ in worst])} ({_ms([s for _, s in worst])}) |")
    for base, b in available_baselines(first["baselines"]).items():
        out.append(f"| {base} baseline | {fmt(b['alignment'])} | – | – | {fmt(b.get('unseen'))} | "
                   + ("– | " if _has_w1(first) else "") + "– | – | – |")
    out += ["", "mean ± standard deviation over seeds; – where it does not apply (the conditioning gain needs two "
            "held-out groups answering the same context questions; unseen questions need run-config heldout-questions "
            "> 0, which the paper's protocol does not set).", ""]

    out += [f"#### Reaching the centralized score (best: {best_central:.4f})", "",
            "| method | target | round / epoch | gradient steps | episodes | training seconds | seeds reaching |",
            "|---|---|---|---|---|---|---|"]
    reach = {}
    start = min(r["history"][0]["alignment"] for rs in plot_runs.values() for r in rs)
    for frac in TARGETS:
        target = frac * best_central
        if target <= start:
            out.append(f"| every method | {frac:.0%} ({target:.4f}) | reached by the initial model ({start:.4f}): "
                       "uninformative at this scale | | | | |")
        for label, rs in plot_runs.items():
            hits = {x: [rounds_to_target(r["history"], target, x=x) for r in rs] for x in curves}
            reach[label, frac] = hits
            cells = " | ".join(_mean_reached(hits[x]) for x in curves)
            out.append(f"| {label} | {frac:.0%} ({target:.4f}) | {cells} | "
                       f"{sum(h is not None for h in hits['round'])}/{len(rs)} |")
    out += ["", "Centralized rounds are epochs (one step each); its episodes are epochs × training groups.", ""]

    out += ["#### Per held-out group (final model, mean over seeds)", "",
            "| group | " + " | ".join(views) + " | " + " | ".join(f"{b} baseline" for b in available_baselines(first["baselines"])) + " |",
            "|---" * (1 + len(views) + len(available_baselines(first["baselines"]))) + "|"]
    for group in first["eval_groups"]:
        cells = [fmt(float(np.mean([r["final"]["per_group"][group] for r in rs]))) for rs in views.values()]
        cells += [fmt(b["per_group"][group]) for b in available_baselines(first["baselines"]).values()]
        out.append(f"| {group} | " + " | ".join(cells) + " |")
    out += ["", f"![per group]({rel(_save(group_plot(plot_runs), figures / f'{prefix}per-group.png'))})", ""]

    return _claims(f"{name}, {predictor}", runs["FedAvg"], central, rounds, reach, best_central), out


def _claims(name: str, fedavg: list[dict], central: list[dict], rounds: int, reach: dict,
            best_central: float) -> list[str]:
    rows = []
    for frac, x, what in [(f, x, w) for f in TARGETS for x, w in (("round", "rounds vs epochs (paper's count)"),
                                                                   ("episodes", "at equal work (episodes)"))]:
        fed, cen = reach["FedAvg", frac][x], reach[CENTRAL, frac][x]
        verdicts = [_faster(f, c) for f, c in zip(fed, cen)]
        if all(f == 0 and c == 0 for f, c in zip(fed, cen)):
            verdicts = ["trivial"]  # the initial model already scores above the target
        rows.append(f"| {name}: FedAvg reaches {frac:.0%} of the centralized score sooner, {what} | "
                    "634 vs 1,180 rounds to converge (46% fewer) | "
                    f"{_mean_reached(fed)} vs {_mean_reached(cen)} {_percent_fewer(fed, cen)} | {_verdict(verdicts)} |")
    for what, pairs in (("at equal work (best score)",
                         [(f["best"]["alignment"], c["best"]["alignment"]) for f, c in zip(fedavg, central)]),
                        (f"after {rounds} rounds vs {rounds} epochs",
                         [(f["final"]["alignment"], _until(c, rounds)["final"]["alignment"])
                          for f, c in zip(fedavg, central)])):
        gains = [f / c - 1 for f, c in pairs]
        rows.append(f"| {name}: better alignment, {what} | +4% | {np.mean(gains):+.1%} "
                    f"({np.mean([f for f, _ in pairs]):.4f} vs {np.mean([c for _, c in pairs]):.4f}) | "
                    f"{_verdict([g > 0 for g in gains])} |")
    jain = [(f["final"]["fairness"]["jain"], c["final"]["fairness"]["jain"]) for f, c in zip(fedavg, central)]
    rows.append(f"| {name}: nearly the same fairness (Jain, final, equal work) | \"nearly the same\" | "
                f"{np.mean([f for f, _ in jain]):.5f} vs {np.mean([c for _, c in jain]):.5f} | "
                f"{_verdict([abs(f - c) <= FAIRNESS_TOLERANCE for f, c in jain])} |")
    train_mean = central[0]["baselines"]["train_mean"]["alignment"]
    if train_mean is not None:
        beats = [r["best"]["alignment"] > train_mean for r in fedavg + central]
        rows.append(f"| {name}: (not a paper claim) the predictor beats the training groups' mean answer | – | "
                    f"best FedAvg {np.mean([r['best']['alignment'] for r in fedavg]):.4f}, centralized "
                    f"{best_central:.4f} vs train-mean {train_mean:.4f} | {_verdict(beats)} |")
    return rows


def _ablations(name: str, plan: dict, seed: int, figures: Path, rel) -> list[str]:
    if not plan["local_steps"]:
        return []
    central = load_results(plan["main"][CENTRAL][0])["final"]
    out = [f"#### Ablations (seed {seed}, FedAvg unless named)", "", "##### Local steps at equal work", "",
           "Every run does the same local steps per client in total (rounds × local steps fixed), which is also "
           f"the work of the compute-matched centralized run of seed {seed} (final alignment "
           f"{fmt(central['alignment'])}).", "",
           "| local steps | rounds | final alignment | best alignment | centralized minus federated (final, same "
           "work) | Jain (final) |", "|---|---|---|---|---|---|"]
    steps_runs = {int(k): load_results(p) for k, p in plan["local_steps"].items()}
    for k, r in sorted(steps_runs.items()):
        out.append(f"| {k} | {r['final']['round']} | {fmt(r['final']['alignment'])} | {fmt(r['best']['alignment'])} | "
                   f"{central['alignment'] - r['final']['alignment']:+.4f} | {r['final']['fairness']['jain']:.5f} |")
    fig = curve_plot({f"local steps {k:>2}": [r] for k, r in sorted(steps_runs.items())}, "episodes", "episodes (work)")
    out += ["", f"![local steps]({rel(_save(fig, figures / f'{name}-local-steps.png'))})", ""]

    sizes = plan["weighting_sizes"]
    low, high = min(sizes.values()), max(sizes.values())
    differ = ("so the weights differ (the main runs keep only common questions: there every group has the same "
              "size and both weightings are the same)" if low < high else
              "the same number for every group, so on this dataset both weightings are the same")
    out += ["##### Size-weighted against uniform aggregation", "",
            f"With every group's own questions (common-questions=false), the training groups hold {low} to {high} "
            f"training questions, {differ}.", "",
            "| weighting | final alignment | best alignment | Jain | CoV | worst group |", "|---|---|---|---|---|---|"]
    for weighting, path in plan["weighting"].items():
        run = load_results(path)
        r, f = run["final"], run["final"]["fairness"]
        out.append(f"| {weighting} | {fmt(r['alignment'])} | {fmt(run['best']['alignment'])} | "
                   f"{f['jain']:.5f} | {fmt(f['cov'])} | {f['worst_group']} ({fmt(f['worst'])}) |")
    out += ["", "##### Evaluation context size", "",
            "The final models of the main runs, evaluated with k context questions per held-out group "
            "(mean over seeds).", "",
            "| method | " + " | ".join(f"k={k}" for k in _contexts(plan)) + " |", "|---" * (1 + len(_contexts(plan))) + "|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, paths in plan["main"].items():
        scores = [[plan["eval_context"][p][k] for k in _contexts(plan)] for p in paths]
        mean = np.mean(scores, axis=0)
        out.append(f"| {label} | " + " | ".join(fmt(float(v)) for v in mean) + " |")
        ax.plot([int(k) for k in _contexts(plan)], mean, marker="o", label=label)
    ax.set_xlabel("context questions per held-out group")
    ax.set_ylabel("held-out alignment")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out += ["", f"![evaluation context]({rel(_save(fig, figures / f'{name}-eval-context.png'))})", ""]

    out += ["##### Embedder", "", "| embedder | width | questions | final alignment | best alignment |",
            "|---|---|---|---|---|"]
    emb_runs = {}
    for embedder, info in plan["embedders"].items():
        r = emb_runs[embedder] = load_results(info["run"])
        out.append(f"| {embedder} | {info['dim']} | {info['questions']} | {fmt(r['final']['alignment'])} | "
                   f"{fmt(r['best']['alignment'])} |")
    fig = curve_plot({k: [r] for k, r in emb_runs.items()}, "round", "round")
    out += ["", f"![embedders]({rel(_save(fig, figures / f'{name}-embedders.png'))})", ""]
    return out


def _stress(name: str, stress: dict[str, dict[str, str]], figures: Path, rel) -> list[str]:
    """The non-IID stress test: each method's final held-out alignment and conditioning gain against
    the skew strength, and the strength at which FedAvg breaks down relative to centralized training."""
    if not stress:
        return []
    runs = {float(skew): {label: load_results(path) for label, path in by_method.items()}
            for skew, by_method in stress.items()}
    skews = sorted(runs)
    methods = list(runs[skews[0]])
    first = runs[skews[0]]["FedAvg"]
    baselines = {skew: {b: v["alignment"] for b, v in available_baselines(rs["FedAvg"]["baselines"]).items()}
                 for skew, rs in runs.items()}
    share = {skew: _share_of_gain(rs["FedAvg"], rs[CENTRAL], baselines[skew]["uniform"]) for skew, rs in runs.items()}
    broken = next((skew for skew in skews if share[skew] is not None and share[skew] < BREAKDOWN_SHARE), None)
    cfg = first["config"]
    out = ["### Non-IID stress test (the paper's experiment 3)", "",
           f"The default predictor (`{cfg['model']}`, features `{cfg['features']}`) in FedAvg's federation "
           f"({cfg['local-steps']} local steps of {cfg['episodes-per-step']} episodes, {first['final']['round']} rounds, "
           f"seed {cfg['seed']}), on data whose every group, trained or held out, is pulled toward a seeded preference "
           "of its own over option positions with strength *skew* (run-config `skew`; `pluralllm_flwr/skew.py` "
           "defines the transform). Centralized training does the same work (compute-matched); FedProx's "
           f"mu is {runs[skews[0]]['FedProx']['config']['proximal-mu']:g}. Final held-out alignment; the conditioning "
           "gain in brackets.",
           "", "| skew | " + " | ".join(methods) + " | " + " | ".join(baselines[skews[0]]) + " | FedAvg's share of "
           "centralized's gain over uniform |", "|---" * (2 + len(methods) + len(baselines[skews[0]])) + "|"]
    for skew in skews:
        cells = [f"{fmt(r['final']['alignment'])} ({fmt_gain(r['final'])})" for r in runs[skew].values()]
        out.append(f"| {skew:g} | " + " | ".join(cells) + " | " + " | ".join(fmt(v) for v in baselines[skew].values())
                   + " | " + ("– (centralized does not beat uniform)" if share[skew] is None else f"{share[skew]:.0%}")
                   + " |")
    if broken is not None:
        verdict = (f"**FedAvg breaks down at skew {broken:g}**: the first strength at which it gains less than "
                   f"{BREAKDOWN_SHARE:.0%} of what centralized training gains over the uniform prediction.")
    elif all(v is None for v in share.values()):
        verdict = "**No verdict**: centralized training does not beat the uniform prediction at any strength."
    else:
        verdict = (f"**No breakdown within the range**: wherever centralized training beats the uniform prediction, "
                   f"FedAvg gains at least {BREAKDOWN_SHARE:.0%} of what it gains.")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in methods:
        axes[0].plot(skews, [runs[s][label]["final"]["alignment"] for s in skews], marker="o", label=label)
        axes[1].plot(skews, [_or_nan(runs[s][label]["final"].get("conditioning_gain")) for s in skews], marker="o",
                     label=label)
    for base, style in zip(baselines[skews[0]], (":", "--", "-.", (0, (5, 1, 1, 1)))):
        axes[0].plot(skews, [baselines[s][base] for s in skews], ls=style, color="grey", alpha=0.8, label=base)
    for ax, ylabel in zip(axes, ("held-out alignment (final)", "conditioning gain (final)")):
        ax.set_xlabel("skew (0: the survey as it is; 1: only each group's own preference)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{name}: non-IID stress test")
    return out + ["", verdict, "", f"![stress test]({rel(_save(fig, figures / f'{name}-stress.png'))})", ""]


def _strategies(name: str, strategies: dict[str, list[str]], figures: Path, rel) -> list[str]:
    """Open question 3: alignment, fairness and the worst group of each aggregation rule, with seed
    bands, and which rules lift the worst group above FedAvg's in every seed."""
    if not strategies:
        return []
    runs = {label: [load_results(p) for p in paths] for label, paths in strategies.items()}
    reference = next(iter(runs))  # the first rule, size-weighted FedAvg, is the reference
    first = runs[reference][0]
    cfg = first["config"]
    adaptive = sorted({r["config"]["server-lr"] for rs in runs.values() for r in rs
                       if r["config"]["strategy"] in ADAPTIVE_STRATEGIES})
    out = ["### Aggregation strategies and fairness (the paper's open question 3)", "",
           f"The default predictor (`{cfg['model']}`) in FedAvg's federation ({cfg['local-steps']} local steps of "
           f"{cfg['episodes-per-step']} episodes, {first['final']['round']} rounds) on every group of {name} with at "
           f"least {cfg['min-group-questions']} questions: {len(first['train_groups'])} clients and "
           f"{len(first['eval_groups'])} held-out groups, drawn anew by each seed ('auto' split), each group with all "
           "its own questions (common-questions=false), so that group sizes differ. The adaptive rules share server-lr "
           f"{', '.join(f'{v:g}' for v in adaptive) or '–'} (not tuned per rule; the README says how it was chosen); "
           "q-FedAvg runs SGD clients, as it assumes. "
           "Centralized training does the same work. Final held-out scores, mean ± standard deviation over seeds "
           f"{[r['config']['seed'] for r in runs[reference]]}.", "",
           "| strategy | alignment | conditioning gain | Jain | CoV | worst held-out group | worst group above "
           "FedAvg's (seeds) |", "|---|---|---|---|---|---|---|"]
    worst = {label: [r["final"]["fairness"]["worst"] for r in rs] for label, rs in runs.items()}
    better = {label: sum(w > f for w, f in zip(worst[label], worst[reference])) for label in runs}
    for label, rs in runs.items():
        gains = [r["final"].get("conditioning_gain") for r in rs]
        out.append(f"| {label} | {_ms([r['final']['alignment'] for r in rs])} | "
                   f"{_ms(gains) if None not in gains else 'n/a'} | "
                   f"{_ms([r['final']['fairness']['jain'] for r in rs], 5)} | "
                   f"{_ms([r['final']['fairness']['cov'] for r in rs])} | "
                   f"{_mode([r['final']['fairness']['worst_group'] for r in rs])} ({_ms(worst[label])}) | "
                   + ("–" if label == reference else f"{better[label]}/{len(rs)}") + " |")
    lifted = [label for label in runs if label not in (reference, CENTRAL) and better[label] == len(runs[label])]
    verdict = (f"**A higher worst group than FedAvg's in every seed**: {', '.join(lifted)}." if lifted else
               "**No federated strategy gives a higher worst-group score than FedAvg's in every seed.**")
    labels = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, values, title in ((axes[0], {k: [r["final"]["alignment"] for r in rs] for k, rs in runs.items()},
                               "held-out alignment (final)"), (axes[1], worst, "worst held-out group (final)")):
        means = [float(np.mean(values[k])) for k in labels]
        ax.bar(range(len(labels)), means, color=["tab:grey" if k == CENTRAL else "tab:blue" for k in labels])
        for i, k in enumerate(labels):
            ax.plot([i] * len(values[k]), values[k], "k.", ms=4)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(min(min(v) for v in values.values()) - 0.01, max(max(v) for v in values.values()) + 0.005)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{name}: aggregation strategies (bars: mean; dots: seeds)")
    fig.tight_layout()
    return out + ["", verdict, "", f"![strategies]({rel(_save(fig, figures / f'{name}-strategies.png'))})", ""]


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _share_of_gain(fed: dict, central: dict, uniform: float) -> float | None:
    """How much of centralized training's gain over the uniform prediction FedAvg reaches (None where
    centralized training gains nothing, so there is nothing to share)."""
    gained = central["final"]["alignment"] - uniform
    return (fed["final"]["alignment"] - uniform) / gained if gained > 0 else None


def _contexts(plan: dict) -> list[str]:
    return list(next(iter(plan["eval_context"].values())))


def _since_start(run: dict) -> dict:
    """Training seconds counted from the initial evaluation (a federated run's ServerApp loads its
    data before it; Ray's start-up in round 1 stays in, as a real cost of the simulation)."""
    zero = run["history"][0].get("train_seconds", 0.0)
    history = [{**e, "train_seconds": e["train_seconds"] - zero} for e in run["history"]]
    return {**run, "history": history, "final": history[-1],
            "best": next(e for e in history if e["round"] == run["best"]["round"])}


def _until(run: dict, last_round: int) -> dict:
    """The run as if it had stopped at `last_round` (the centralized reference view)."""
    history = [e for e in run["history"] if e["round"] <= last_round]
    return {**run, "history": history, "final": history[-1], "best": best_entry(history)}


def _faster(fed: int | None, central: int | None) -> bool | None:
    if fed is None:
        return None if central is None else False
    return central is None or fed < central


def _verdict(flags: list) -> str:
    if flags == ["trivial"]:
        return "undecided: the initial model already reaches the target"
    if any(f is None for f in flags):
        return "not reached"
    return "yes" if all(flags) else "no" if not any(flags) else "mixed"


def _percent_fewer(fed: list, central: list) -> str:
    pairs = [(f, c) for f, c in zip(fed, central) if f is not None and c is not None]
    central_mean = np.mean([c for _, c in pairs]) if pairs else 0
    if not central_mean:
        return ""
    fewer = 1 - np.mean([f for f, _ in pairs]) / central_mean
    return f"({fewer:.0%} fewer)" if fewer >= 0 else f"({-fewer:.0%} more)"


def _mean_reached(values: list) -> str:
    reached = [v for v in values if v is not None]
    if not reached:
        return "not reached"
    text = f"{np.mean(reached):,.0f}"
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)} seeds)"


def _ms(values: list, digits: int = 4) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}" if len(values) > 1 else f"{values[0]:.{digits}f}"


def _mode(names: list[str]) -> str:
    return max(set(names), key=names.count)


def _has_w1(run: dict) -> bool:
    return run["final"].get("alignment_w1") is not None


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _shown(path: Path) -> str:
    """A path relative to the current directory where it lies below it (no machine paths in docs)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _invocations(invocations: list[dict]) -> str:
    """`cmd` (55 minutes), then `cmd` (0 minutes, reusing the runs), ...: every call that built this reproduction."""
    return ", then ".join(f"`{i['command']}` ({i['seconds'] / 60:.0f} minutes)" for i in invocations)


def _flower_overhead(manifest: dict) -> str:
    """Flower's fixed cost: the seconds of its simulations outside the runs themselves (start-up of
    the SuperLink, SuperExec and Ray, the set-up between a batch's runs, teardown), as a share of the
    reproduction's time. The federated runs of a dataset share a few simulations (run-config batch)."""
    simulations = manifest.get("simulations", [])
    total = sum(i["seconds"] for i in manifest["invocations"])
    if not simulations or not total:
        return ""
    fixed = sum(s["seconds"] - s["run_seconds"] for s in simulations)
    return (f"Flower's start-up, teardown and set-up between runs: {fixed:.0f} s in {len(simulations)} simulations "
            f"of {sum(s['runs'] for s in simulations)} federated runs, {100 * fixed / total:.1f}% of the "
            f"{total / 60:.0f} minutes. ")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"
