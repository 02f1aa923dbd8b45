"""Does GRPO with the group reward steer a language model toward a group, toward the right one, and
does the aggregation rule protect the worst group? Prints Markdown tables.

Runs (each an ordinary `pluralllm align` output folder under --out, reused when its align.json holds the same
settings, groups and reward model):
- pair: the policy aligned to each of two groups alone (default Democrat, Republican), each LM measured
  on both groups. Reports each LM's gain over the base LM on its own target, and on the questions where
  the two groups differ most (largest JS distance between their true answers) three tests: each LM is
  closer to its own target than to the other group; each group is closer to the LM aligned to it
  than to the LM aligned to the other group (fairer where the base LM already leans to one group); and
  the LM aligned to one group leans further toward it, relative to the other group, than the LM aligned
  to the other group does (free of the base LM's lean and of what both LMs gain on the groups' shared
  answer).
- aggregation: the policy aligned to 3+ groups at once under mean, min and adaptive aggregation;
  reports the mean and the worst group's alignment before and after.

With --oracle the rewards are the groups' true answers on the unseen questions instead of the reward
model's predictions: what the pipeline (reward, GRPO, policy) would do with a perfect reward model, so a
test that fails with the reward model and holds with the oracle fails for the reward model's sake.

    .venv/bin/python benchmarks/align_groups.py --run runs/align/predictor [--seeds 0,1,2] [--steps 60]

One reward model serves every seed, so the seeds share its unseen questions. To let the seed also draw
the reward model's unseen questions, train one predictor per seed and name them with {seed}:

    for s in 0 1 2; do .venv/bin/pluralllm demo --dataset opinionqa --path $PWD/../shared/data/opinionqa/human_resp \
      -c "heldout-questions=0.1 seed=$s out-dir='$PWD/runs/align/predictor-seed$s'"; done
    .venv/bin/python benchmarks/align_groups.py --run 'runs/align/predictor-seed{seed}' --out runs/align/per-seed
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pluralllm_flwr.align import (ALIGN_FILE, TRAINERS, AlignSettings, align, alignment_task,  # noqa: E402
                                  central_predictions)
from pluralllm_flwr.align_report import write_align_report  # noqa: E402
from pluralllm_flwr.config import group_names  # noqa: E402
from pluralllm_flwr.metrics import alignments  # noqa: E402


APPA_CLAIM = "APPA (arXiv 2604.04261, PPO) reports up to +28% worst-group alignment for adaptive over average aggregation."


def predictor(args, seed: int) -> str:
    """The reward model's run for this seed: --run, with {seed} filled in when it names one predictor per
    seed (each trained with that seed, so each has its own unseen questions)."""
    return args.run.format(seed=seed)


def rewards_from(args, task, run: str) -> dict[str, list[np.ndarray]]:
    """What GRPO pulls each group toward: the reward model's predictions, or with --oracle the groups' true
    answers (the ceiling of the pipeline: what a perfect reward model would give)."""
    if args.oracle:
        return {g: task.truth[g] for g in task.groups}
    return central_predictions(task, run, cache_dir=args.cache_dir or None)


def run_once(args, name: str, groups: list[str], measure: list[str], aggregate: str, seed: int) -> dict:
    out = Path(args.out) / name / f"seed-{seed}"
    run, rewards = predictor(args, seed), "oracle" if args.oracle else "central"
    task = alignment_task(run, groups, args.context, args.questions, seed, measure_also=measure)
    settings = AlignSettings(steps=args.steps, beta=args.beta, learning_rate=args.lr, aggregate=aggregate,
                             seed=seed, eval_every=args.eval_every, temperature=args.temperature,
                             adapt_every=args.adapt_every, generations=args.generations,
                             prompts_per_step=args.prompts_per_step, trainer=args.trainer)
    reused = (out / ALIGN_FILE).is_file()
    if reused:
        done = json.loads((out / ALIGN_FILE).read_text())
        if (done["settings"] != asdict(settings) or done["groups"] != groups or done["run"] != str(run)
                or done["rewards"] != rewards):
            sys.exit(f"{out} holds an alignment with other settings, groups, reward model or rewards than asked "
                     "for; choose another --out or delete it")
    predicted = rewards_from(args, task, run)  # after the check: a mismatched folder stops before any work
    if not reused:
        align(task, predicted, args.policy, settings, out, run=run, rewards=rewards, cache_dir=args.cache_dir or None)
        write_align_report(out)
    return {"result": json.loads((out / ALIGN_FILE).read_text()), "task": task, "predicted": predicted}


def mean_sd(values) -> str:
    values = np.asarray(values, float)
    return f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.4f}"


def on_questions(distributions, truth, rows) -> float:
    """Mean alignment of `distributions` to `truth` over the questions `rows`."""
    return float(np.mean(alignments([np.asarray(distributions[i]) for i in rows], [truth[i] for i in rows])))


def pair(args, seeds: list[int]) -> list[str]:
    a, b = group_names(args.pair)
    # on each seed's --differ questions where a and b differ most, alignment to each group of: the base LM,
    # the LM aligned to each target (lm[target, seed]) and the reward model's prediction for it (predicted[...])
    gains, base, lm, predicted, asked = {}, {}, {}, {}, {}
    for target, other in ((a, b), (b, a)):
        for seed in seeds:
            done = run_once(args, f"pair/{target}", [target], [other], "mean", seed)
            result, task, prediction = done["result"], done["task"], done["predicted"][target]
            before, after = result["history"][0], result["history"][-1]
            gains[target, seed] = after["per_group"][target] - before["per_group"][target]
            differ = np.argsort(-(1 - alignments(task.truth[a], task.truth[b])))[:args.differ]
            asked[target, seed] = [task.questions[i].key for i in differ]
            base[seed] = {g: on_questions(before["opinions"], task.truth[g], differ) for g in (a, b)}
            lm[target, seed] = {g: on_questions(after["opinions"], task.truth[g], differ) for g in (a, b)}
            predicted[target, seed] = {g: on_questions(prediction, task.truth[g], differ) for g in (a, b)}
    for seed in seeds:
        if asked[a, seed] != asked[b, seed]:
            raise SystemExit(f"seed {seed}: the two runs were measured on different questions; rerun both")
    column = lambda table, target, group: [table[target, s][group] for s in seeds]  # noqa: E731
    lines = [f"### Aligned to {a} or to {b} ({len(seeds)} seeds)", "",
             f"Gain: alignment to its own target after GRPO minus the base LM's, on all the unseen questions. On the "
             f"{args.differ} questions where {a} and {b} differ most: the aligned LM's alignment to its target and to "
             "the other group; the LM aligned to the other group, scored against this target; and the reward model's "
             "prediction for the target (what GRPO pulls toward) against both groups.", "",
             "| aligned to | gain on its target | LM: own target | LM: other group | other group's LM: this target | "
             "prediction: own target | prediction: other group |",
             "|---|---|---|---|---|---|---|"]
    for target, other in ((a, b), (b, a)):
        lines.append(f"| {target} | {mean_sd([gains[target, s] for s in seeds])} | {mean_sd(column(lm, target, target))} | "
                     f"{mean_sd(column(lm, target, other))} | {mean_sd(column(lm, other, target))} | "
                     f"{mean_sd(column(predicted, target, target))} | {mean_sd(column(predicted, target, other))} |")
    # how far aligning to a instead of b moves the LM toward a relative to b: free of the base LM's own lean
    # and of the progress both LMs make toward what the groups share
    lean = {s: (lm[a, s][a] - lm[a, s][b]) - (lm[b, s][a] - lm[b, s][b]) for s in seeds}
    own = {s: lm[a, s][a] > lm[a, s][b] and lm[b, s][b] > lm[b, s][a] for s in seeds}
    rival = {s: lm[a, s][a] > lm[b, s][a] and lm[b, s][b] > lm[a, s][b] for s in seeds}
    pair_of = lambda d: f"{d[a]:.4f}, {d[b]:.4f}"  # noqa: E731
    yes = lambda holds: "yes" if holds else "no"  # noqa: E731
    lines += ["", f"Per seed, on those questions, alignment to {a}, {b}:", "",
              f"| seed | base LM | {a}-aligned LM | {b}-aligned LM | prediction for {a} | prediction for {b} | "
              "each LM closer to its own target | each group closer to its own LM | lean difference |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s} | {pair_of(base[s])} | {pair_of(lm[a, s])} | {pair_of(lm[b, s])} | {pair_of(predicted[a, s])} | "
              f"{pair_of(predicted[b, s])} | {yes(own[s])} | {yes(rival[s])} | {lean[s]:+.4f} |" for s in seeds]
    count = lambda holds: f"{sum(holds.values())} of {len(seeds)} seeds"  # noqa: E731
    margin = {t: [lm[t, s][t] - lm[t, s][o] for s in seeds] for t, o in ((a, b), (b, a))}  # own minus other, per seed
    lines += ["", f"Each LM closer to its own target than to the other group: {count(own)}; on the mean over the seeds: "
              f"{yes(all(np.mean(m) > 0 for m in margin.values()))} (own target minus other group, per seed: "
              + "; ".join(f"{t}-aligned {', '.join(f'{x:+.4f}' for x in m)}, mean {np.mean(m):+.4f}" for t, m in margin.items())
              + ").",
              f"Each group closer to the LM aligned to it than to the LM aligned to the other group: {count(rival)}.",
              f"Lean difference (the {a}-aligned LM's alignment to {a} minus to {b}, less the {b}-aligned LM's): "
              f"positive in {count({s: lean[s] > 0 for s in seeds})}.", ""]
    return lines


def aggregation(args, seeds: list[int]) -> list[str]:
    groups = group_names(args.groups)
    lines = [f"### Aggregation over {', '.join(groups)} ({len(seeds)} seeds)", "",
             "| aggregation | mean before | mean after | worst group before | worst group after |", "|---|---|---|---|---|"]
    worst = {}
    for aggregate in ("mean", "min", "adaptive"):
        results = [run_once(args, f"aggregation/{aggregate}", groups, [], aggregate, s)["result"] for s in seeds]
        first, last = [r["history"][0] for r in results], [r["history"][-1] for r in results]
        worst[aggregate] = [h["worst"] for h in last]
        lines.append(f"| {aggregate} | {mean_sd([h['mean'] for h in first])} | {mean_sd([h['mean'] for h in last])} | "
                     f"{mean_sd([h['worst'] for h in first])} | {mean_sd(worst[aggregate])} |")
    lines.append("")
    for rule in ("min", "adaptive"):
        change = np.asarray(worst[rule]) / np.asarray(worst["mean"]) - 1
        lines.append(f"- {rule} against mean, worst group after GRPO: {100 * change.mean():+.1f}% (per seed "
                     f"{', '.join(f'{100 * c:+.1f}%' for c in change)}; higher in {int((change > 0).sum())} of "
                     f"{len(change)} seeds)")
    every = [a for a in ("min", "adaptive") if all(x > m for x, m in zip(worst[a], worst["mean"]))]
    lines += ["", ("Worst group higher than under mean aggregation in every seed: " + ", ".join(every)) if every
              else "Neither min nor adaptive aggregation gives a higher worst group than mean aggregation in every seed.",
              APPA_CLAIM, ""]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a training run with heldout-questions > 0 (make align trains one); "
                   "with {seed} in it, one run per seed (e.g. runs/align/predictor-seed{seed})")
    p.add_argument("--pair", default="Democrat,Republican")
    p.add_argument("--groups", default="Democrat,Republican,Liberal", help="3+ groups for the aggregation runs, "
                   "separated by semicolons when a name has a comma")
    p.add_argument("--experiments", default="pair,aggregation")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=AlignSettings.steps)
    p.add_argument("--beta", type=float, default=AlignSettings.beta)
    p.add_argument("--lr", type=float, default=AlignSettings.learning_rate)
    p.add_argument("--eval-every", type=int, default=AlignSettings.eval_every)
    p.add_argument("--generations", type=int, default=AlignSettings.generations, help="completions per prompt")
    p.add_argument("--prompts-per-step", type=int, default=AlignSettings.prompts_per_step)
    p.add_argument("--trainer", default=AlignSettings.trainer, choices=TRAINERS)
    p.add_argument("--temperature", type=float, default=AlignSettings.temperature, help="adaptive (nats of KL)")
    p.add_argument("--adapt-every", type=int, default=AlignSettings.adapt_every, help="adaptive: steps between "
                   "re-weightings")
    p.add_argument("--context", type=int, default=20)
    p.add_argument("--questions", type=int, default=0, help="a seeded subset of the unseen questions (0 = all)")
    p.add_argument("--differ", type=int, default=20, help="the pair's most differing questions")
    p.add_argument("--policy", default="smollm2")
    p.add_argument("--oracle", action="store_true", help="reward with the groups' true answers on the unseen "
                   "questions instead of the reward model's predictions: the pipeline's ceiling, not a deployable reward")
    p.add_argument("--cache-dir", default="")
    p.add_argument("--out", default="runs/align/benchmark")
    args = p.parse_args()
    if len(group_names(args.pair)) != 2:
        p.error(f"--pair names two groups (separated by ';' when a name has a comma), got {group_names(args.pair)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    experiments = {"pair": pair, "aggregation": aggregation}
    chosen = args.experiments.split(",")
    if set(chosen) - set(experiments):
        p.error(f"--experiments: unknown {sorted(set(chosen) - set(experiments))}; choose from {list(experiments)}")
    lines = []
    for name in chosen:
        lines += experiments[name](args, seeds)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
