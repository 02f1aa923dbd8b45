"""The predictor as a reward model: predictions, rewards, aggregation, parsing, files, checkpoints, TRL."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pluralllm_flwr.centralized import train_centralized
from pluralllm_flwr.config import RunConfig
from pluralllm_flwr.data import Question, load_globalopinionqa
from pluralllm_flwr.experiment import prepare_experiment
from pluralllm_flwr.metrics import alignment
from pluralllm_flwr.gpo import GPOPredictor
from pluralllm_flwr.model import ModelConfig
from pluralllm_flwr.results import load_checkpoint, save_checkpoint
from pluralllm_flwr.reward import (GroupAggregator, GroupContext, GroupReward, GroupRewardModel, RewardModelError,
                                   format_question, format_scores, load_contexts, load_questions, make_trl_reward,
                                   parse_choice, score_command)
from pluralllm_flwr.training import predict

from .conftest import TINY_RUN, tiny_causal_lm

torch.set_num_threads(1)
N_CONTEXT = 5


@pytest.fixture(scope="module")
def run(tiny_paths, tmp_path_factory) -> dict:
    """A trained tiny checkpoint, the data it came from and the experiment that made it."""
    out = tmp_path_factory.mktemp("reward_run")
    cfg = RunConfig.from_mapping({**TINY_RUN, **tiny_paths, "out-dir": str(out)})
    train_centralized(cfg, progress=False)
    return {"cfg": cfg, "checkpoint": out / "best.safetensors", "cache": tiny_paths["cache-dir"],
            "data": load_globalopinionqa(tiny_paths["data-path"])}


@pytest.fixture(scope="module")
def model(run) -> GroupRewardModel:
    return GroupRewardModel.from_checkpoint(run["checkpoint"], cache_dir=run["cache"], device="cpu")


def context_of(data, group: str) -> GroupContext:
    return GroupContext(group, [(data.questions[i], data.answers[group][i]) for i in range(N_CONTEXT)])


@pytest.fixture(scope="module")
def setting(run) -> dict:
    """Two groups that lean to opposite ends, their contexts, and the remaining questions as targets."""
    data = run["data"]
    return {"contexts": [context_of(data, "G0"), context_of(data, "G4")], "questions": data.questions[N_CONTEXT:]}


# ----------------------------------------------------------------------------- predictions


def test_predictions_are_distributions_over_each_questions_options(model, setting):
    predicted = model.predict_groups(setting["contexts"], setting["questions"])
    assert list(predicted) == ["G0", "G4"]
    for dists in predicted.values():
        assert [len(p) for p in dists] == [len(q.options) for q in setting["questions"]]
        for p in dists:
            assert (p >= 0).all() and abs(p.sum() - 1) < 1e-9


def test_the_predictor_gets_the_rows_and_probabilities_training_gives_it(run, model, setting, monkeypatch):
    """The reward model must feed the predictor what training and evaluation feed it: the same option
    vectors, in question order, and the group's own probabilities on the context."""
    from pluralllm_flwr import reward as reward_module

    calls = []

    def recording(net, context, targets, device):
        calls.append((context, targets))
        return predict(net, context, targets, device)

    monkeypatch.setattr(reward_module, "predict", recording)
    got = model.predict_groups(setting["contexts"], setting["questions"])
    exp = prepare_experiment(run["cfg"], progress=False)  # same data, restricted to the run's groups
    keys = [q.key for q, _ in setting["contexts"][0].answers] + [q.key for q in setting["questions"]]
    for (context, targets), group in zip(calls, ["G0", "G4"], strict=True):
        vectors = exp.vectors(group)
        ids = [vectors.keys.index(k) for k in keys]
        truth_context, truth_targets = vectors.subset(ids[:N_CONTEXT]), vectors.subset(ids[N_CONTEXT:])
        np.testing.assert_allclose(context.x, truth_context.x, atol=1e-5)
        np.testing.assert_allclose(context.y, truth_context.y, atol=1e-6)
        np.testing.assert_array_equal(context.offsets, truth_context.offsets)
        np.testing.assert_allclose(targets.x, truth_targets.x, atol=1e-5)
        np.testing.assert_array_equal(targets.offsets, truth_targets.offsets)
        for p, q in zip(got[group], predict(model.model, truth_context, truth_targets, "cpu")):
            np.testing.assert_allclose(p, q, atol=1e-5)


def test_predictions_are_deterministic(model, setting):
    first = model.predict(setting["contexts"][1], setting["questions"][:3])
    again = model.predict(setting["contexts"][1], setting["questions"][:3])
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- rewards


def toy_reward(aggregate: str = "mean", **kwargs) -> GroupReward:
    """Two groups, two questions, hand-made predictions: no model needed."""
    questions = {"q1": Question("q1", "Yes or no?", ("Yes", "No")),
                 "q2": Question("q2", "How much?", ("A lot", "Some", "Not at all"))}
    predictions = {"north": {"q1": np.array([0.9, 0.1]), "q2": np.array([0.6, 0.3, 0.1])},
                   "south": {"q1": np.array([0.2, 0.8]), "q2": np.array([0.1, 0.2, 0.7])}}
    return GroupReward(questions, predictions, GroupAggregator(list(predictions), aggregate, **kwargs))


def test_the_most_likely_option_earns_the_highest_reward(model, setting):
    reward = make_trl_reward(model, setting["contexts"][:1], setting["questions"])
    for q in setting["questions"]:
        completions = [f"{letter}." for letter in "ABCDEFGH"[:len(q.options)]]
        rewards = reward(prompts=[format_question(q)] * len(completions), completions=completions,
                         question=[q.key] * len(completions))
        predicted = reward.predictions["G0"][q.key]
        assert int(np.argmax(rewards)) == int(np.argmax(predicted))
        np.testing.assert_allclose(rewards, predicted)
    assert reward.unparsable == 0


def test_distribution_reward_is_one_minus_js_distance():
    reward = toy_reward()
    own, _ = reward.distribution_rewards(["q1"], [[0.9, 0.1]])
    other, per_group = reward.distribution_rewards(["q1"], [[0.5, 0.5]])
    assert per_group[0, 0] == pytest.approx(alignment([0.9, 0.1], [0.5, 0.5]))
    assert per_group[0, 1] == pytest.approx(alignment([0.2, 0.8], [0.5, 0.5]))
    assert own[0] == pytest.approx((1.0 + alignment([0.2, 0.8], [0.9, 0.1])) / 2)
    assert other[0] == pytest.approx(per_group[0].mean())
    with pytest.raises(RewardModelError, match="2 options"):
        reward.distribution_rewards(["q1"], [[0.2, 0.3, 0.5]])


def test_mean_and_min_on_hand_made_cases():
    rewards = np.array([[0.9, 0.2], [0.4, 0.6]])
    np.testing.assert_allclose(GroupAggregator(["a", "b"], "mean").combine(rewards), [0.55, 0.5])
    np.testing.assert_allclose(GroupAggregator(["a", "b"], "min").combine(rewards), [0.2, 0.4])


def test_adaptive_moves_weight_to_the_worst_served_group():
    agg = GroupAggregator(["a", "b", "c"], "adaptive", temperature=0.1, momentum=0.5)
    assert agg.weights == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})  # nothing seen yet: the mean
    batch = np.array([[0.9, 0.3, 0.6], [0.7, 0.1, 0.6]])  # b is served worst, a best
    np.testing.assert_allclose(agg.combine(batch), batch.mean(axis=1))  # weights before the batch's update
    agg.update(batch)
    w = agg.weights
    assert w["b"] > w["c"] > w["a"] and sum(w.values()) == pytest.approx(1)
    expected = np.exp(-np.array([0.8, 0.2, 0.6]) / 0.1)
    assert list(w.values()) == pytest.approx((expected / expected.sum()).tolist())
    agg.update(np.array([[0.1, 0.9, 0.6]]))  # now b is served well: running = 0.5·old + 0.5·new
    assert agg.running == pytest.approx([0.45, 0.55, 0.6]) and agg.weights["a"] > agg.weights["b"]


def test_adaptive_interpolates_between_mean_and_min():
    history, batch = np.array([[0.9, 0.2]]), np.array([[0.8, 0.4]])
    hot, cold = (GroupAggregator(["a", "b"], "adaptive", temperature=t) for t in (1e3, 1e-3))
    for agg in (hot, cold):
        agg.update(history)
    assert hot.combine(batch)[0] == pytest.approx(0.6, abs=1e-3)  # the mean
    assert cold.combine(batch)[0] == pytest.approx(0.4, abs=1e-6)  # all weight on b, the worst so far


def test_expected_rewards_are_exact_and_differ_by_beta_times_the_kl_to_each_group():
    """Σ_c π(c)·beta·log(p_g(c)/ref(c)) = −beta·KL(π‖p_g) + a term all groups share: the adaptive weights
    computed from it follow how far the policy is from each group's prediction."""
    base = toy_reward()
    reference = {"q1": np.array([0.5, 0.5]), "q2": np.array([0.2, 0.5, 0.3])}
    reward = GroupReward(base.questions, base.predictions, GroupAggregator(["north", "south"], "adaptive",
                         temperature=0.01, batch_updates=False), reference=reference, beta=0.3)
    policy = [np.array([0.7, 0.3]), np.array([0.3, 0.4, 0.3])]
    expected = reward.expected_rewards(["q1", "q2"], policy)
    by_hand = [np.mean([sum(pi[c] * reward.option_reward(g, k, c) for c in range(len(pi)))
                        for k, pi in zip(["q1", "q2"], policy)]) for g in ("north", "south")]
    np.testing.assert_allclose(expected, by_hand, rtol=1e-12)
    kl = [np.mean([np.sum(pi * np.log(pi / reward.predictions[g][k])) for k, pi in zip(["q1", "q2"], policy)])
          for g in ("north", "south")]
    assert expected[0] - expected[1] == pytest.approx(-0.3 * (kl[0] - kl[1]), rel=1e-9)
    assert kl[1] > kl[0]  # the policy is farther from south
    reward(prompts=["p"] * 2, completions=["Yes", "Yes"], question=["q1", "q1"])  # batches move nothing here
    assert reward.aggregator.running is None
    reward.aggregator.observe(expected)
    w = reward.aggregator.weights
    assert w["south"] > w["north"]
    assert w["south"] / w["north"] == pytest.approx(np.exp((expected[0] - expected[1]) / 0.01))
    with pytest.raises(RewardModelError, match="2 groups"):
        reward.aggregator.observe(np.zeros(3))


def test_aggregator_rejects_bad_settings():
    for kwargs in ({"mode": "max"}, {"temperature": 0.0}, {"momentum": 1.0}):
        with pytest.raises(RewardModelError):
            GroupAggregator(["a", "b"], **kwargs)
    with pytest.raises(RewardModelError, match="distinct"):
        GroupAggregator(["a", "a"])
    with pytest.raises(RewardModelError, match=r"\[samples, 2 groups\]"):
        GroupAggregator(["a", "b"]).combine(np.zeros((3, 3)))


def test_trl_reward_counts_unparsable_and_scores_them_low():
    reward = toy_reward("min")
    rewards = reward(prompts=["p"] * 4, completions=["A", "no", "I refuse to answer", [{"role": "assistant",
                                                                                       "content": "Answer: C"}]],
                     question=["q1", "q1", "q2", "q2"], trainer_state=None)
    assert rewards == pytest.approx([0.2, 0.1, 0.0, 0.1])
    assert (reward.unparsable, reward.scored) == (1, 4)


def test_unparsable_completions_do_not_move_adaptive_weights():
    reward = toy_reward("adaptive", temperature=0.1)
    reward(prompts=["p"] * 2, completions=["gibberish", "???"], question=["q1", "q2"])
    assert reward.aggregator.running is None and reward.unparsable == 2
    reward(prompts=["p"], completions=["Yes"], question=["q1"])  # north 0.9, south 0.2
    assert reward.aggregator.weights["south"] > 0.99


def test_trl_reward_names_a_missing_column_or_unknown_key():
    reward = toy_reward()
    with pytest.raises(RewardModelError, match="'question' column"):
        reward(prompts=["p"], completions=["A"])
    with pytest.raises(RewardModelError, match="'q9' is not among"):
        reward(prompts=["p"], completions=["A"], question=["q9"])


def test_trl_reward_logs_per_group_metrics_when_the_trainer_offers_it():
    logged: dict[str, float] = {}
    toy_reward()(prompts=["p"] * 2, completions=["A", "?"], question=["q1", "q1"],
                 log_metric=lambda name, value: logged.__setitem__(name, value))
    assert logged == pytest.approx({"group_reward/north": 0.45, "group_reward/south": 0.1, "unparsable_fraction": 0.5})


# ----------------------------------------------------------------------------- parsing

LIKERT = ("Strongly agree", "Agree", "Disagree", "Strongly disagree")


@pytest.mark.parametrize("completion, expected", [
    ("B", 1), ("B.", 1), (" (B)", 1), ("B) Agree", 1), ("**D**", 3), ("Answer: B", 1), ("The answer is (C).", 2),
    ("Option D, definitely", 3), ("I strongly agree.", 0), ("agree", 1), ("I DISAGREE", 2),
    ("strongly disagree, really", 3), ("Agree or disagree?", None), ("E", None), ("Answer: E", None),
    ("b", None), ("", None), ("Maybe", None), ("A lot of people agree", 1),
])
def test_parse_choice(completion, expected):
    assert parse_choice(completion, LIKERT) == expected


def test_a_letter_that_begins_an_option_text_is_that_text():
    options = ("Some", "A lot", "Not at all")
    assert parse_choice("Answer: A lot", options) == 1
    assert parse_choice("A.", options) == 0
    assert parse_choice("not at all", options) == 2


def test_format_question_round_trips_through_parse_choice():
    q = Question("k", "How much?", ("A lot", "Some", "Not at all"))
    prompt = format_question(q)
    assert prompt.startswith("Question: How much?") and "C. Not at all" in prompt and prompt.endswith("Answer:")
    assert parse_choice(" C. Not at all", q.options) == 2


# ----------------------------------------------------------------------------- contexts and files


@pytest.mark.parametrize("dist, message", [([0.5, 0.2, 0.3], "3 values but the question has 2"),
                                          ([1.2, -0.2], "non-negative"), ([0.5, 0.4], "sums to 0.9000"),
                                          (["x", 1], "list of numbers")])
def test_group_context_rejects_bad_distributions(dist, message):
    q = Question("k", "Yes or no?", ("Yes", "No"))
    with pytest.raises(RewardModelError, match=message) as info:
        GroupContext("France", [(q, dist)])
    assert "group 'France', answer 0" in str(info.value)


def test_group_context_needs_a_name_and_answers_and_renormalises():
    q = Question("k", "Yes or no?", ("Yes", "No"))
    with pytest.raises(RewardModelError, match="non-empty name"):
        GroupContext("", [(q, [0.5, 0.5])])
    with pytest.raises(RewardModelError, match="at least one"):
        GroupContext("France", [])
    with pytest.raises(RewardModelError, match="distinct non-empty"):
        GroupContext("France", [(Question("k", "Same?", ("Yes", "Yes")), [0.5, 0.5])])
    ctx = GroupContext("France", [(q, [0.504, 0.5])])
    assert ctx.answers[0][1].sum() == pytest.approx(1.0)


def write_files(tmp_path: Path, data, groups=("G0", "G4"), n_questions=4) -> tuple[Path, Path]:
    contexts = [{"group": g, "answers": [{"question": data.questions[i].text, "options": list(data.questions[i].options),
                                          "distribution": data.answers[g][i].tolist()} for i in range(N_CONTEXT)]}
                for g in groups]
    questions = [{"question": q.text, "options": list(q.options)} for q in data.questions[N_CONTEXT:N_CONTEXT + n_questions]]
    (tmp_path / "context.json").write_text(json.dumps(contexts))
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    return tmp_path / "context.json", tmp_path / "questions.json"


def test_score_command_predicts_every_group_on_every_question(run, tmp_path):
    context_file, questions_file = write_files(tmp_path, run["data"])
    result = score_command(run["checkpoint"], context_file, questions_file, cache_dir=run["cache"], device="cpu")
    json.dumps(result)  # JSON-able as it is
    assert list(result["groups"]) == ["G0", "G4"] and result["embedder"] == "minilm"
    assert result["trained_on"]["train_groups"] == ["G0", "G1", "G3", "G4"]
    for scored in result["groups"].values():
        assert scored["context_questions"] == N_CONTEXT and len(scored["predictions"]) == 4
        for entry, q in zip(scored["predictions"], run["data"].questions[N_CONTEXT:]):
            assert entry["options"] == list(q.options) and sum(entry["distribution"]) == pytest.approx(1, abs=1e-5)
            assert entry["most_likely"] == q.options[int(np.argmax(entry["distribution"]))]
    text = format_scores(result)
    assert "G0 (context: 5 questions)" in text and "<- most likely" in text


def test_one_group_object_is_a_context_file_too(run, tmp_path):
    context_file, _ = write_files(tmp_path, run["data"], groups=("G1",))
    context_file.write_text(json.dumps(json.loads(context_file.read_text())[0]))
    [ctx] = load_contexts(context_file)
    assert ctx.name == "G1" and len(ctx.answers) == N_CONTEXT


@pytest.mark.parametrize("edit, message", [
    (lambda c, q: c.write_text("{not json"), "context.json: not valid UTF-8 JSON"),
    (lambda c, q: c.write_text(json.dumps({"group": "X", "answers": [{"question": "Q?", "options": ["a", "b"],
                                                                      "distribution": [1.0]}]})),
     r"context.json: group 'X', answer 0 .*1 values but the question has 2"),
    (lambda c, q: c.write_text(json.dumps([{"group": "X", "answers": [{"question": "Q?", "options": ["a", "b"]}]}])),
     r"context.json: group entry 0 \('X'\), answer 0: missing \"distribution\""),
    (lambda c, q: c.write_text(json.dumps([{"group": "X"}])), r"context.json: group entry 0: expected"),
    (lambda c, q: q.write_text(json.dumps([{"question": "Q?", "options": ["a", "b"]}, {"question": "R?"}])),
     r"questions.json: question 1: \"question\" must be a string and \"options\" a list"),
    (lambda c, q: q.write_text(json.dumps([{"question": "Q?", "options": ["only"]}])),
     r"questions.json: question 0: needs 2 to 26 options"),
    (lambda c, q: q.write_text(json.dumps({"question": "Q?"})), r"questions.json: expected a non-empty list"),
    (lambda c, q: q.unlink(), r"questions.json: no such file"),
])
def test_bad_files_are_clear_errors_naming_file_and_entry(run, tmp_path, edit, message):
    context_file, questions_file = write_files(tmp_path, run["data"])
    edit(context_file, questions_file)
    with pytest.raises(RewardModelError, match=message):
        score_command(run["checkpoint"], context_file, questions_file, cache_dir=run["cache"], device="cpu")


def test_question_keys_default_to_content_and_must_be_unique(tmp_path):
    file = tmp_path / "questions.json"
    file.write_text(json.dumps([{"question": "Q?", "options": ["a", "b"]}, {"question": "Q?", "options": ["a", "c"]}]))
    first, second = load_questions(file)
    assert first.key != second.key and first.key.startswith("q-")
    file.write_text(json.dumps([{"question": "Q?", "options": ["a", "b"], "key": "k"},
                                {"question": "R?", "options": ["a", "b"], "key": "k"}]))
    with pytest.raises(RewardModelError, match=r"keys \['k'\] occur more than once"):
        load_questions(file)


# ----------------------------------------------------------------------------- checkpoints


def rewrite(run, tmp_path, **changes) -> Path:
    state, meta = load_checkpoint(run["checkpoint"])
    meta.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del meta[key]
    path = tmp_path / "edited.safetensors"
    save_checkpoint(path, state, meta)
    return path


def test_checkpoint_for_another_embedder_or_width_is_a_clear_error(run):
    with pytest.raises(RewardModelError, match="trained with embedder 'minilm', not the 'smollm2' asked for"):
        GroupRewardModel.from_checkpoint(run["checkpoint"], embedder="smollm2")
    with pytest.raises(RewardModelError, match="expects 384-d embeddings, not the 576-d asked for"):
        GroupRewardModel.from_checkpoint(run["checkpoint"], embedding_dim=576)
    assert GroupRewardModel.from_checkpoint(run["checkpoint"], embedder="minilm", embedding_dim=384).embedding_dim == 384


@pytest.mark.parametrize("changes, message", [
    ({"prompt_format": "gpo-reference"}, "prompt format 'gpo-reference', but this code embeds with 'gpo-alpaca-v1'"),
    ({"embedder": None}, r"lacks metadata \['embedder'\]"),
    ({"embedding_dim": 576}, "input_dim 770 differs from the width of 'question-option-position' features of its "
                             "576-d embeddings"),
    ({"features": "nope"}, "on features 'nope'; this version knows"),
])
def test_checkpoint_metadata_problems_are_clear_errors(run, tmp_path, changes, message):
    with pytest.raises(RewardModelError, match=message):
        GroupRewardModel.from_checkpoint(rewrite(run, tmp_path, **changes))


def test_weights_that_do_not_fit_the_config_are_a_clear_error(run, tmp_path):
    _, meta = load_checkpoint(run["checkpoint"])
    config = {**meta["model_config"], "d_model": 32}
    with pytest.raises(RewardModelError, match="weights do not fit its model_config"):
        GroupRewardModel.from_checkpoint(rewrite(run, tmp_path, model_config=config))


def test_an_embedder_that_changed_width_is_caught_at_prediction(run, tmp_path, setting):
    """The metadata says 8-d, but 'minilm' gives 384-d vectors: the mismatch must not reach the model.
    (A GPO checkpoint on raw vectors, as checkpoints were before option features: no 'features' key.)"""
    config = ModelConfig(input_dim=8, d_model=8, embed_depth=2, num_layers=1, num_heads=2, dim_feedforward=8)
    _, meta = load_checkpoint(run["checkpoint"])
    path = tmp_path / "narrow.safetensors"
    meta = {k: v for k, v in meta.items() if k != "features"}
    save_checkpoint(path, GPOPredictor(config).state_dict(),
                    {**meta, "model_config": dataclasses.asdict(config), "embedding_dim": 8})
    narrow = GroupRewardModel.from_checkpoint(path, cache_dir=run["cache"], device="cpu")
    with pytest.raises(RewardModelError, match="now gives 384-d vectors, but the checkpoint was trained on 8-d"):
        narrow.predict_groups(setting["contexts"], setting["questions"])


# ----------------------------------------------------------------------------- TRL


def tiny_policy(texts: list[str]):
    return tiny_causal_lm(texts, vocab_size=300)


def test_grpo_trainer_takes_two_steps_with_the_group_reward(model, setting, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl==1.16.0); the reward itself "
                                            "needs no TRL, only this smoke test does")
    from datasets import Dataset

    reward = make_trl_reward(model, setting["contexts"], setting["questions"], aggregate="adaptive")
    prompts = [format_question(q) for q in setting["questions"]]
    dataset = Dataset.from_dict({"prompt": prompts, "question": [q.key for q in setting["questions"]]})
    policy, tok = tiny_policy(prompts + [f"{letter}. " for letter in "ABCD"])
    returned: list[list[float]] = []

    def group_reward(prompts, completions, **kwargs):  # records what the trainer got back
        returned.append(reward(prompts, completions, **kwargs))
        return returned[-1]

    # one-token answers, restricted to the letters A-C, so completions parse (C does not on 2-option
    # questions) and rewards differ between generations: GRPO then has an advantage to learn from
    letters = [i for i in range(len(tok)) if tok.decode([i]).strip() in ("A", "B", "C")]
    others = sorted(set(range(len(tok))) - set(letters))
    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=2, per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=1, learning_rate=1e-2, logging_steps=1,
                          report_to="none", use_cpu=True, save_strategy="no", seed=0, dataloader_num_workers=0,
                          generation_kwargs={"suppress_tokens": others})
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=[group_reward], args=args, train_dataset=dataset,
                              processing_class=tok)
    before = [p.detach().clone() for p in policy.parameters()]
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(returned) >= 1 and all(len(r) == 4 for r in returned)
    assert all(0.0 <= r <= 1.0 for batch in returned for r in batch)
    assert reward.scored == sum(len(r) for r in returned) and reward.unparsable < reward.scored
    assert reward.aggregator.running is not None  # the adaptive weights learnt from the trainer's batches
    logged = [e for e in trainer.state.log_history if "rewards/group_reward/mean" in e]
    assert len(logged) == 2 and all(np.isfinite(e["rewards/group_reward/mean"]) for e in logged)
    assert any("group_reward/G0" in e for e in trainer.state.log_history)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
