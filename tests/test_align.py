"""`pluralllm align`: the log-ratio reward's optimum on a toy case, the LM's opinion, and GRPO end to end
on a tiny LM built in code."""
import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import softmax

from pluralllm_flwr.align import (ALIGN_FILE, REWARD_REPLY, AlignError, AlignSettings, alignment_task,
                                  central_predictions, checkpoint_of, federated_predictions, kl_optimum, letter_tokens,
                                  lm_opinions, load_policy)
from pluralllm_flwr.bundle import read_bundle, write_bundles
from pluralllm_flwr.centralized import train_centralized
from pluralllm_flwr.cli import main
from pluralllm_flwr.config import RunConfig
from pluralllm_flwr.data import GroupSplit, Question
from pluralllm_flwr.experiment import bundle_experiment, prepare_experiment
from pluralllm_flwr.metrics import alignment
from pluralllm_flwr.results import load_checkpoint, load_results
from pluralllm_flwr.reward import GroupAggregator, GroupReward, RewardModelError, format_question, neutral_unparsable
from pluralllm_flwr.reward_queries import PREDICTIONS_QUERY, RewardRequest, answer_query, query_content

from .conftest import TINY_RUN, tiny_causal_lm

QUESTION = Question("q", "How much?", ("A lot", "Some", "Not at all"))
REFERENCE = np.array([0.7, 0.2, 0.1])  # the policy before training
GROUPS = {"Dem": np.array([0.2, 0.3, 0.5]), "Rep": np.array([0.6, 0.3, 0.1])}
BETA = 0.1


def option_rewards(groups: list[str], aggregate: str = "mean", reference=REFERENCE) -> np.ndarray:
    """The aggregated reward of each option, from the reward code itself."""
    reward = GroupReward({"q": QUESTION}, {g: {"q": GROUPS[g]} for g in groups}, GroupAggregator(groups, aggregate),
                         reference=None if reference is None else {"q": reference}, beta=BETA)
    return reward.choice_rewards(["q"] * 3, [0, 1, 2])[0]


def best_policy(rewards: np.ndarray) -> np.ndarray:
    """argmax over answer distributions of E_pi[r] − beta·KL(pi || reference), found numerically."""
    def loss(logits):
        pi = softmax(logits)
        return -(pi @ rewards - BETA * np.sum(pi * np.log(pi / REFERENCE)))
    return softmax(minimize(loss, np.zeros(3), method="BFGS", options={"gtol": 1e-12}).x)


def test_under_the_kl_penalty_the_log_ratio_reward_is_best_answered_with_the_groups_distribution():
    rewards = option_rewards(["Dem"])
    np.testing.assert_allclose(rewards, BETA * np.log(GROUPS["Dem"] / REFERENCE))
    np.testing.assert_allclose(best_policy(rewards), GROUPS["Dem"], atol=1e-5)
    np.testing.assert_allclose(kl_optimum(REFERENCE, rewards, BETA), GROUPS["Dem"], atol=1e-12)
    # the probability reward p_g(c) is best answered far from the group: toward its likeliest option
    plain = best_policy(option_rewards(["Dem"], reference=None))
    assert plain[2] > GROUPS["Dem"][2] + 0.1 and alignment(plain, GROUPS["Dem"]) < alignment(GROUPS["Dem"], GROUPS["Dem"]) - 0.05


@pytest.mark.parametrize("aggregate, expected", [
    ("mean", np.sqrt(GROUPS["Dem"] * GROUPS["Rep"])),     # the groups' geometric mean
    ("min", np.minimum(GROUPS["Dem"], GROUPS["Rep"])),   # their pointwise minimum
])
def test_several_groups_optimum(aggregate, expected):
    np.testing.assert_allclose(best_policy(option_rewards(["Dem", "Rep"], aggregate)), expected / expected.sum(),
                               atol=1e-5)


def test_a_letter_beyond_the_questions_options_gets_no_grpo_advantage():
    rewards = np.array([0.3, -0.1, 9.0, 0.5, 1.0, 2.0])  # two prompts' completions, three each
    parsed = [True, True, False, False, False, True]
    neutral = neutral_unparsable(rewards, parsed, group_size=3)
    np.testing.assert_allclose(neutral, [0.3, -0.1, 0.1, 2.0, 2.0, 2.0])
    advantage = neutral - np.repeat(neutral.reshape(2, 3).mean(1), 3)  # GRPO's: minus its prompt's mean
    assert advantage[2] == 0 and np.all(advantage[3:] == 0)
    assert advantage[0] == pytest.approx(0.3 - 0.1) and advantage[1] == pytest.approx(-0.1 - 0.1)  # as without it
    with pytest.raises(RewardModelError, match="blocks of 4"):
        neutral_unparsable(rewards, parsed, group_size=4)


def test_the_log_ratio_reward_refuses_a_bad_beta_or_a_missing_reference():
    with pytest.raises(RewardModelError, match="beta > 0"):
        GroupReward({"q": QUESTION}, {"Dem": {"q": GROUPS["Dem"]}}, GroupAggregator(["Dem"]), reference={"q": REFERENCE},
                    beta=0.0)
    with pytest.raises(RewardModelError, match=r"no distribution for questions \['q'\]"):
        GroupReward({"q": QUESTION}, {"Dem": {"q": GROUPS["Dem"]}}, GroupAggregator(["Dem"]), reference={})
    with pytest.raises(AlignError, match="generations must be at least 2"):
        AlignSettings(generations=1)
    with pytest.raises(AlignError, match="trainer must be one of one-token, trl, got 'ppo'"):
        AlignSettings(trainer="ppo")


# ----------------------------------------------------------------------------- the LM's opinion


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny Llama that answers "A" to most questions (a few steps of fitting), saved as a local folder,
    as `pluralllm align --policy FOLDER` takes it: an opinionated LM, far from any group's answers."""
    prompts = [format_question(Question(f"k{i}", f"Synthetic survey question number {i}: how do you feel about topic "
                                        f"{i}?", tuple(f"Option {c} for topic {i}" for c in "ABC"))) for i in range(8)]
    model, tok = tiny_causal_lm([p + " A" for p in prompts] + [" A", " B", " C", " D"], vocab_size=300)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = tok([p + " A" for p in prompts], return_tensors="pt")  # the same length: no padding
    for _ in range(15):
        optimizer.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("policy")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_the_lms_opinion_is_its_next_token_distribution_over_the_option_letters(policy):
    model, tok = load_policy(str(policy))
    questions = [Question("a", "Short?", ("Yes", "No")),
                 Question("b", "A much longer question that pads the other one?", ("A lot", "Some", "None", "Other"))]
    letters = letter_tokens(tok, 4)
    opinions, mass = lm_opinions(model, tok, questions, letters)
    assert [len(o) for o in opinions] == [2, 4] and all(abs(o.sum() - 1) < 1e-9 for o in opinions)
    assert 0 < mass <= 1
    for q, batched in zip(questions, opinions):  # padding in a batch changes nothing
        alone, _ = lm_opinions(model, tok, [q], letters)
        np.testing.assert_allclose(alone[0], batched, atol=1e-5)
    with torch.no_grad():  # the same as the full model's last logits, renormalised over the letters
        logits = model(**tok(format_question(questions[1]), return_tensors="pt")).logits[0, -1]
    np.testing.assert_allclose(softmax(logits[letters].double().numpy()), opinions[1], atol=1e-5)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def unseen_run(tiny_paths, tmp_path_factory):
    """A tiny predictor trained with a quarter of the questions held out from every group."""
    out = tmp_path_factory.mktemp("align_run")
    train_centralized(RunConfig.from_mapping({**TINY_RUN, **tiny_paths, "out-dir": str(out),
                                              "heldout-questions": 0.25}), progress=False)
    return out


def test_the_task_is_the_unseen_questions_and_refuses_a_run_without_them(unseen_run, tiny_paths, tmp_path):
    task = alignment_task(unseen_run, ["G0", "G4"], context=5, seed=0)
    assert len(task.questions) == 10 and all(len(c.answers) == 5 for c in task.contexts)
    assert not {q.key for q in task.questions} & {q.key for c in task.contexts for q, _ in c.answers}
    with pytest.raises(AlignError, match=r"no group \['Nowhere'\]"):
        alignment_task(unseen_run, ["G0", "Nowhere"])
    seen_all = tmp_path / "seen_all"
    train_centralized(RunConfig.from_mapping({**TINY_RUN, **tiny_paths, "out-dir": str(seen_all),
                                              "num-server-rounds": 1}), progress=False)
    with pytest.raises(AlignError, match="heldout-questions=0"):
        alignment_task(seen_all, ["G0"])


def test_grpo_moves_a_tiny_lm_toward_the_group_and_reports_it(unseen_run, policy, tiny_paths, tmp_path, capsys,
                                                              monkeypatch):
    from pluralllm_flwr import align as align_module
    from pluralllm_flwr.reward import GroupRewardModel

    loaded = []

    def keep(folder):  # the policy GRPO trains, to compare with its initial weights afterwards
        loaded.append(load_policy(folder))
        return loaded[-1]
    monkeypatch.setattr(align_module, "load_policy", keep)

    def decided(self, contexts, questions):  # sure the group answers A: far from the LM, and the same
        # target on every question (a tiny LM cannot tell how many options a question has)
        return {c.name: [np.eye(len(q.options))[0] * 0.8 + 0.2 / len(q.options) for q in questions] for c in contexts}
    monkeypatch.setattr(GroupRewardModel, "predict_groups", decided)
    initial, _ = load_policy(str(policy))
    out = tmp_path / "align"
    assert main(["align", "--run", str(unseen_run), "--groups", "G0", "--policy", str(policy), "--steps", "12",
                 "--eval-every", "6", "--generations", "4", "--prompts-per-step", "4", "--lr", "0.01",
                 "--trainable-layers", "1", "--context", "5", "--measure", "G4", "--cache-dir", tiny_paths["cache-dir"],
                 "--out", str(out)]) == 0
    trained = dict(loaded[0][0].named_parameters())
    changed = {name for name, p in initial.named_parameters() if not torch.equal(p, trained[name])}
    assert changed and all(name.startswith(("model.layers.1.", "model.norm")) for name in changed)  # the last block
    result = json.loads((out / ALIGN_FILE).read_text())
    assert [h["step"] for h in result["history"]] == [0, 6, 12]
    report = (out / "report.md").read_text()
    assert "| G0 |" in report and "| G4 (measured only) | – |" in report and "worst group" in report
    assert (out / "alignment.png").stat().st_size > 5000
    assert "align: step 12" in capsys.readouterr().out

    # TRL's trainer, every block learning: the policy moves toward what the reward asks, the predictor's distribution
    out = tmp_path / "align-all"
    assert main(["align", "--run", str(unseen_run), "--groups", "G0", "--policy", str(policy), "--steps", "12",
                 "--eval-every", "12", "--generations", "4", "--prompts-per-step", "4", "--lr", "0.03",
                 "--trainer", "trl", "--trainable-layers", "0", "--context", "5", "--measure", "G4", "--cache-dir", tiny_paths["cache-dir"],
                 "--out", str(out)]) == 0
    result = json.loads((out / ALIGN_FILE).read_text())
    before, after = result["history"][0], result["history"][-1]
    assert before["to_prediction"]["G0"] < 0.9  # the LM starts far from the reward's target
    assert after["to_prediction"]["G0"] > before["to_prediction"]["G0"] + 0.02
    assert result["unparsable"] < result["scored"] and result["scored"] >= 12 * 16
    report = (out / "report.md").read_text()
    assert set(after["per_group"]) == {"G0", "G4"} and set(after["to_prediction"]) == {"G0"}  # G4: measured only
    assert after["worst_group"] == "G0" and len(after["opinions"]) == len(result["questions"])


def test_adaptive_weighs_the_group_the_policy_is_farthest_from(unseen_run, policy, tiny_paths, tmp_path, monkeypatch):
    """The weights are softmax(KL(policy ‖ p_g) / temperature), from the policy's measured opinions."""
    from pluralllm_flwr.reward import GroupRewardModel

    def target(group: str, q: Question) -> np.ndarray:  # G0 sure of A, as the tiny LM is; G1 of the last option
        sure = np.eye(len(q.options))[0 if group == "G0" else -1]
        return sure * 0.8 + 0.2 / len(q.options)
    monkeypatch.setattr(GroupRewardModel, "predict_groups",
                        lambda self, contexts, questions: {c.name: [target(c.name, q) for q in questions]
                                                           for c in contexts})
    out = tmp_path / "adaptive"
    assert main(["align", "--run", str(unseen_run), "--groups", "G0,G1", "--policy", str(policy), "--steps", "4",
                 "--eval-every", "2", "--adapt-every", "2", "--temperature", "0.2", "--aggregate", "adaptive",
                 "--generations", "4", "--prompts-per-step", "2", "--trainable-layers", "1", "--context", "5",
                 "--cache-dir", tiny_paths["cache-dir"], "--out", str(out)]) == 0
    result = json.loads((out / ALIGN_FILE).read_text())
    task = alignment_task(unseen_run, ["G0", "G1"], context=5, seed=0)
    assert result["questions"] == [q.key for q in task.questions]
    for h in result["history"]:
        kl = {g: np.mean([np.sum(np.array(o) * np.log(np.array(o) / target(g, q)))
                          for o, q in zip(h["opinions"], task.questions)]) for g in ("G0", "G1")}
        assert kl["G1"] > kl["G0"] and h["weights"]["G1"] > h["weights"]["G0"]
        assert h["weights"]["G1"] / h["weights"]["G0"] == pytest.approx(np.exp((kl["G1"] - kl["G0"]) / 0.2),
                                                                        rel=1e-3)
    assert "Adaptive weights (temperature 0.2 nats" in (out / "report.md").read_text()


# ----------------------------------------------------------------------------- federated rewards


def test_a_node_predicts_from_its_own_data_what_the_aligner_would(unseen_run, tmp_path):
    """The query's answer on a deployed node (its bundle alone) and on a simulated one (the whole dataset)
    equals the central prediction, and holds nothing but the predicted probabilities."""
    groups = ["G0", "G3"]
    task = alignment_task(unseen_run, groups, context=5, seed=1)
    cfg = RunConfig.from_mapping(load_results(unseen_run)["config"])
    central = central_predictions(task, unseen_run, cache_dir=cfg.cache_dir)
    exp = prepare_experiment(cfg, progress=False)
    state, metadata = load_checkpoint(checkpoint_of(unseen_run))
    request = RewardRequest(str(checkpoint_of(unseen_run)), groups, 5, 1, task.questions, str(tmp_path / "reply.json"))
    bundles = write_bundles(exp, groups, tmp_path / "bundles")
    for g in groups:
        deployed = bundle_experiment(cfg, [read_bundle(bundles[g])], GroupSplit([g], []))
        for node in (exp, deployed):
            reply = answer_query(node, g, query_content(request, g, state, metadata))
            assert set(reply) == {"predictions", "for"} and list(reply["predictions"]) == ["probabilities"]
            np.testing.assert_allclose(reply["predictions"]["probabilities"].numpy(), np.concatenate(central[g]),
                                       rtol=0, atol=1e-6)
    with pytest.raises(AlignError, match=r"\['G2'\] has no node"):  # a held-out group: no node hosts it
        federated_predictions(alignment_task(unseen_run, ["G2"], context=5, read_contexts=False), unseen_run, tmp_path)


@pytest.mark.slow
def test_federated_rewards_equal_central_ones_and_no_answer_leaves_a_node(unseen_run, policy, tmp_path):
    """`pluralllm align --federated`: a Flower simulation of the run's federation (one node per training
    group) computes the groups' predictions, which give the central rewards, and the ServerApp's audit of
    every message shows weights, question texts and settings going out and predictions alone coming back."""
    groups = ["G0", "G3"]
    task = alignment_task(unseen_run, groups, context=5, seed=0, read_contexts=False)
    assert task.contexts == []  # federated, the aligner never reads a context answer
    out = tmp_path / "align"
    assert main(["align", "--run", str(unseen_run), "--groups", ",".join(groups), "--federated", "--policy", str(policy),
                 "--steps", "2", "--eval-every", "2", "--generations", "2", "--prompts-per-step", "2",
                 "--context", "5", "--out", str(out)]) == 0
    reply = json.loads((out / REWARD_REPLY).read_text())
    federated = {g: [np.asarray(p) for p in reply["predictions"][g]] for g in groups}
    cfg = RunConfig.from_mapping(load_results(unseen_run)["config"])
    central = central_predictions(alignment_task(unseen_run, groups, context=5, seed=0), unseen_run,
                                  cache_dir=cfg.cache_dir)
    keys = [q.key for q in task.questions]
    rewards = [GroupReward(dict(zip(keys, task.questions)), {g: dict(zip(keys, p[g])) for g in groups},
                           GroupAggregator(groups, "mean")) for p in (federated, central)]
    choices = [c for q in task.questions for c in range(len(q.options))]
    picked = [k for q, k in zip(task.questions, keys) for _ in q.options]
    np.testing.assert_allclose(*(r.choice_rewards(picked, choices)[0] for r in rewards), rtol=0, atol=1e-6)

    weights = set(load_checkpoint(checkpoint_of(unseen_run))[0])
    asked = f"query.{PREDICTIONS_QUERY}"
    sent = [a for a in reply["audit"] if a["type"] == asked and a["direction"] == "to node"]
    back = [a for a in reply["audit"] if a["type"] == asked and a["direction"] == "from node"]
    assert len(sent) == len(back) == len(groups) and sorted(reply["predictions"]) == groups
    for a in sent:
        assert set(a["records"]) == {"arrays", "config"} and set(a["records"]["arrays"]["arrays"]) == weights
        assert a["records"]["config"]["keys"] == ["checkpoint", "context", "group", "questions", "seed"]
    n = sum(len(q.options) for q in task.questions)
    assert all(a["records"] == {"predictions": {"arrays": {"probabilities": [n]}}, "for": {"keys": ["group"]}}
               for a in back)
    others = [a for a in reply["audit"] if a["type"] != asked]  # before them: which node hosts which group
    assert others and all(a["type"] == "query.hosted_groups" and a["records"] in (
        {"config": {"keys": []}}, {"hosted": {"keys": ["groups"]}}) for a in others)
    for g in groups:  # and what came back are predictions, not the group's answers to those questions
        assert all(not np.allclose(p, t, atol=1e-3) for p, t in zip(federated[g], task.truth[g]))
    assert json.loads((out / ALIGN_FILE).read_text())["rewards"] == "federated"
    assert f"back: predictions [probabilities of shape [{n}]]; for [group]" in (out / "report.md").read_text()
