"""How much of a group's difference from the other groups can be read on questions nobody trained on?

The reward-model case (issue 16) asks the predictor for a group's answers on unseen questions, and
"the target matters" needs it to know, for a new question, which way Democrats and Republicans lean.
This measures what the inputs available here carry about that, apart from any trained model. For
each seed's unseen questions (data.unseen_question_ids, the share that run-config heldout-questions
keeps from training) and every group of the default OpinionQA split, it correlates the group's true
deviation from the training groups' mean answer (per option) with:

- features: a ridge regression from the option features (`features.option_features` of --embedder's vectors) to that
  deviation, fitted on the seen questions;
- siblings: the group's deviations on the seen questions with the very same options, weighted by the
  questions' cosine similarity (softmax, temperature 0.05). It reads *every* seen answer of the group,
  far more than a context, so it is generous; unseen questions without such a sibling are left out
  (their share is printed).
- "D − R": the same for the Democrat-minus-Republican difference.

With --run, a trained predictor's own predictions for Democrat and Republican (the reward path of
`pluralllm align`, from contexts of each size in --contexts; with --nearest also from each question's most
similar seen questions) on the --top unseen questions where the two groups differ most: is each prediction
closer to its own group than to the other? And how well the predicted difference of the two follows the
true one on every unseen question.
And for every group, its prediction's alignment to the group's own answers against the other groups'
(which groups the reward model tells apart on new questions at all).
With --persona, the policy LM (SmolLM2-135M-Instruct) asked to answer "as a Democrat" and "as a
Republican" (`align.lm_opinions`): does the difference of its two opinions follow the parties'?

    python benchmarks/unseen_signal.py --data ../shared/data/opinionqa/human_resp [--run RUN [--nearest]] [--persona]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
from scipy.special import softmax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pluralllm_flwr.data import (OPINIONQA_EVAL, OPINIONQA_TRAIN, load_opinionqa,  # noqa: E402
                                 unseen_question_ids)
from pluralllm_flwr.embeddings import embed_questions  # noqa: E402
from pluralllm_flwr.features import option_features  # noqa: E402
from pluralllm_flwr.metrics import alignments  # noqa: E402

PARTIES = ("Democrat", "Republican")


def ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)


def question_vectors(table) -> np.ndarray:
    """Each question's options' summed vector, unit length: what a question's cosine similarity compares."""
    stem = np.add.reduceat(table.vectors.astype(np.float64), table.offsets[:-1], 0)
    return stem / np.linalg.norm(stem, axis=1, keepdims=True)


def correlations(data, table, features, seed: int, args) -> tuple[dict[str, tuple[float, float]], float]:
    """group (and 'D − R') -> (features correlation, siblings correlation); and the share of unseen
    questions with a sibling."""
    groups = OPINIONQA_TRAIN + OPINIONQA_EVAL
    off, nq = table.offsets, len(data.questions)
    common = [q for q in range(nq) if all(q in data.answers[g] for g in groups)]
    unseen_ids = set(unseen_question_ids(nq, args.heldout_questions, seed))
    seen = [q for q in common if q not in unseen_ids]
    unseen = [q for q in common if q in unseen_ids]
    rows = lambda qs: np.concatenate([np.arange(off[q], off[q + 1]) for q in qs])  # noqa: E731
    answer = {g: np.zeros(len(table.vectors)) for g in groups}
    for g in groups:
        for q in common:
            answer[g][off[q]:off[q + 1]] = data.answers[g][q]
    mean = np.mean([answer[g] for g in OPINIONQA_TRAIN], 0)
    deviation = {g: answer[g] - mean for g in groups}
    deviation["D − R"] = answer[PARTIES[0]] - answer[PARTIES[1]]
    x = features.vectors.astype(np.float64)
    stem = question_vectors(table)
    siblings = {q: [s for s in seen if data.questions[s].options == data.questions[q].options] for q in unseen}
    covered = [q for q in unseen if siblings[q]]
    weights = {q: softmax(stem[siblings[q]] @ stem[q] / args.temperature) for q in covered}
    seen_rows, unseen_rows, covered_rows = rows(seen), rows(unseen), rows(covered)
    out = {}
    for g, dev in deviation.items():
        fitted = x[unseen_rows] @ ridge(x[seen_rows], dev[seen_rows], args.ridge)
        from_siblings = np.concatenate([sum(w * dev[off[s]:off[s + 1]] for w, s in zip(weights[q], siblings[q]))
                                        for q in covered])
        out[g] = (float(np.corrcoef(fitted, dev[unseen_rows])[0, 1]),
                  float(np.corrcoef(from_siblings, dev[covered_rows])[0, 1]))
    return out, len(covered) / len(unseen)


def party_difference(answers: dict[str, list[np.ndarray]]) -> np.ndarray:
    """Democrat minus Republican, every option of every question."""
    return np.concatenate([a - b for a, b in zip(answers[PARTIES[0]], answers[PARTIES[1]])])


def nearest_predictions(exp, model, task) -> dict[str, list[np.ndarray]]:
    """Each party's prediction on each of the task's questions from its own context: the party's
    `task.context` seen questions most similar to that question (cosine of the questions' mean option
    vectors), instead of one seeded draw for all: does a context about the new question's topic help?"""
    from pluralllm_flwr.reward import GroupContext

    stem = question_vectors(exp.table)
    row = {q.key: i for i, q in enumerate(exp.data.questions)}
    out = {}
    for g in PARTIES:
        seen = np.asarray(exp.question_ids(g, "seen"))
        contexts = []  # one per question, named by its place, all predicted in one call (one embedding pass)
        for j, question in enumerate(task.questions):
            near = seen[np.argsort(-(stem[seen] @ stem[row[question.key]]), kind="stable")[:task.context]]
            contexts.append(GroupContext(f"{g} {j}", [(exp.data.questions[i], exp.data.answers[g][i]) for i in near]))
        predicted = model.predict_groups(contexts, task.questions)
        out[g] = [predicted[f"{g} {j}"][j] for j in range(len(task.questions))]
    return out


def predictor_separation(run: str, args) -> list[str]:
    """A trained predictor's Democrat and Republican predictions on its unseen questions where the two
    differ most, from contexts of each size (drawn as `pluralllm align` draws them, seed 0; with --nearest
    also each question's most similar seen questions), and the correlation of the predicted
    Democrat-minus-Republican difference with the true one on every unseen question."""
    from pluralllm_flwr.align import alignment_task, central_predictions, checkpoint_of
    from pluralllm_flwr.config import RunConfig
    from pluralllm_flwr.experiment import prepare_experiment
    from pluralllm_flwr.results import load_results
    from pluralllm_flwr.reward import GroupRewardModel

    if args.nearest:  # the run's data and reward model, once for every context size
        exp = prepare_experiment(RunConfig.from_mapping(load_results(run)["config"]), progress=False)
        model = GroupRewardModel.from_checkpoint(checkpoint_of(run))
    lines = []
    for size in args.contexts:
        task = alignment_task(run, list(PARTIES), size, 0, 0)
        truth = task.truth
        js = 1 - alignments(truth[PARTIES[0]], truth[PARTIES[1]])
        top = np.argsort(-js, kind="stable")[:args.top]
        draws = {"seeded draw": central_predictions(task, run)}
        if args.nearest:
            draws["nearest"] = nearest_predictions(exp, model, task)
        for how, predicted in draws.items():
            cells = []
            for g in PARTIES:
                pred = [predicted[g][i] for i in top]
                own, other = (alignments(pred, [truth[h][i] for i in top]).mean() for h in (g, *set(PARTIES) - {g}))
                cells.append(f"{own:.4f} | {other:.4f}")
            corr = np.corrcoef(party_difference(predicted), party_difference(truth))[0, 1]
            lines.append(f"| {run} | {size}, {how} | {len(task.questions)} | " + " | ".join(cells) + f" | {corr:+.3f} |")
    return lines


def group_separation(runs: list[str], size: int) -> list[str]:
    """For every group, a trained predictor's prediction on the run's unseen questions (from a context
    of `size`, drawn as `pluralllm align` draws it): its alignment to the group's own answers against its
    mean alignment to every other group's, one row per group over the runs."""
    from pluralllm_flwr.align import alignment_task, central_predictions

    groups = OPINIONQA_TRAIN + OPINIONQA_EVAL
    own, others = {g: [] for g in groups}, {g: [] for g in groups}
    for run in runs:
        task = alignment_task(run, groups, size, 0, 0)
        predicted = central_predictions(task, run)
        for g in groups:
            to = {h: alignments(predicted[g], task.truth[h]).mean() for h in groups}
            own[g].append(to[g])
            others[g].append(np.mean([v for h, v in to.items() if h != g]))
    lines = []
    for g in sorted(groups, key=lambda g: -np.mean(np.subtract(own[g], others[g]))):
        gap = np.subtract(own[g], others[g])
        lines.append(f"| {g} | {np.mean(own[g]):.4f} | {np.mean(others[g]):.4f} | {np.mean(gap):+.4f} ± {np.std(gap):.4f} "
                     f"| {int(np.sum(gap > 0))} of {len(gap)} |")
    return lines


def persona_correlation(data, seed: int, args) -> tuple[float, float]:
    """Correlation of the LM's 'as a Democrat' minus 'as a Republican' opinions with the parties' true
    difference, over the seed's unseen questions and over the --top of them where the parties differ most."""
    from pluralllm_flwr.align import letter_tokens, load_policy, lm_opinions, policy_folder

    model, tok = load_policy(policy_folder(args.policy))
    qs = [q for q in unseen_question_ids(len(data.questions), args.heldout_questions, seed)
          if all(q in data.answers[g] for g in PARTIES)]
    letters = letter_tokens(tok, max(len(data.questions[q].options) for q in qs))
    opinions = {}
    for g in PARTIES:
        asked = [dataclasses.replace(data.questions[q], text=f"You are a {g} in the United States. "
                                     f"{data.questions[q].text}") for q in qs]
        opinions[g] = lm_opinions(model, tok, asked, letters)[0]
    lm_diff = [a - b for a, b in zip(opinions[PARTIES[0]], opinions[PARTIES[1]])]
    true_diff = [data.answers[PARTIES[0]][q] - data.answers[PARTIES[1]][q] for q in qs]
    js = 1 - alignments([data.answers[PARTIES[0]][q] for q in qs], [data.answers[PARTIES[1]][q] for q in qs])
    top = np.argsort(-js, kind="stable")[:args.top]
    corr = lambda idx: float(np.corrcoef(np.concatenate([lm_diff[i] for i in idx]),  # noqa: E731
                                         np.concatenate([true_diff[i] for i in idx]))[0, 1])
    return corr(range(len(qs))), corr(top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="OpinionQA's human_resp folder")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--heldout-questions", type=float, default=0.1)
    p.add_argument("--features", default="question-option")
    p.add_argument("--embedder", default="minilm", help="the option vectors the features probe reads (minilm | "
                   "smollm2 | a hub id or folder)")
    p.add_argument("--ridge", type=float, default=100.0, help="ridge penalty of the features probe")
    p.add_argument("--temperature", type=float, default=0.05, help="softmax temperature over sibling cosines")
    p.add_argument("--run", default="", help="a run trained with heldout-questions > 0 (its own seed's split); "
                   "with {seed} in it, one run per seed of --seeds")
    p.add_argument("--contexts", default="20,100", help="context sizes for --run")
    p.add_argument("--nearest", action="store_true", help="with --run, also contexts of each question's most similar "
                   "seen questions")
    p.add_argument("--top", type=int, default=20, help="unseen questions where the parties differ most")
    p.add_argument("--persona", action="store_true", help="also ask the policy LM to answer as each party")
    p.add_argument("--policy", default="smollm2")
    args = p.parse_args()
    args.contexts = [int(c) for c in args.contexts.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    data = load_opinionqa(args.data)
    table, _ = embed_questions(data.questions, args.embedder, progress=True)
    features = option_features(table, args.features)
    per_seed = [correlations(data, table, features, s, args) for s in seeds]
    names = list(per_seed[0][0])
    fmt = lambda v: f"{np.mean(v):+.2f} ± {np.std(v):.2f}" if len(v) > 1 else f"{v[0]:+.2f}"  # noqa: E731
    print(f"Pearson correlation with the true deviation from the training groups' mean, per option, on the unseen "
          f"questions (seeds {seeds}; {args.features} features of {args.embedder}; siblings cover "
          f"{fmt([c for _, c in per_seed]).replace('+', '')} of them):\n")
    print("| group | features (ridge) | siblings (every seen answer) |\n|---|---|---|")
    for g in names:
        print(f"| {g} | {fmt([r[0][g][0] for r in per_seed])} | {fmt([r[0][g][1] for r in per_seed])} |")
    held = [np.mean([r[0][g][i] for g in OPINIONQA_EVAL]) for r in per_seed for i in (0, 1)]
    print(f"| held-out groups, mean | {fmt(held[0::2])} | {fmt(held[1::2])} |")

    if args.persona:
        print(f"\nThe policy LM ({args.policy}) asked to answer as a Democrat and as a Republican: correlation of "
              f"its two opinions' difference with the parties' (all unseen questions; the {args.top} where they "
              "differ most)\n\n| seed | all | top |\n|---|---|---|")
        for s in seeds:
            print(f"| {s} | " + " | ".join(f"{c:+.2f}" for c in persona_correlation(data, s, args)) + " |")

    if args.run:
        print(f"\nA trained predictor's predictions on the {args.top} unseen questions (of its own) where Democrats and "
              "Republicans differ most: alignment to the predicted group and to the other one\n\n| run | context | "
              "unseen questions | Democrat prediction: to Democrats | to Republicans | Republican prediction: to "
              "Republicans | to Democrats | D − R: correlation with the truth, every unseen question |\n"
              "|---|---|---|---|---|---|---|---|")
        runs = list(dict.fromkeys(args.run.format(seed=s) for s in seeds))
        print("\n".join(line for run in runs for line in predictor_separation(run, args)))
        print(f"\nEvery group: the predictor's prediction for it on the unseen questions (context {args.contexts[0]}), "
              "its alignment to the group's answers and its mean alignment to the other groups' (mean over the "
              "runs; the separation is the difference)\n\n| group | to its own | to the others | separation | "
              "runs where positive |\n|---|---|---|---|---|")
        print("\n".join(group_separation(runs, args.contexts[0])))


if __name__ == "__main__":
    main()
