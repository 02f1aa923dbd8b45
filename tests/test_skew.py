"""The non-IID stress test's transform (skew.py) and run-config `skew`."""
import numpy as np
import pytest

from pluralllm_flwr.bundle import BundleError, read_bundle, write_bundles
from pluralllm_flwr.config import ConfigError, RunConfig
from pluralllm_flwr.data import GroupSplit, PreferenceData, Question
from pluralllm_flwr.experiment import bundle_experiment, prepare_experiment
from pluralllm_flwr.skew import apply_skew, preference


def survey(n_questions: int = 6) -> PreferenceData:
    rng = np.random.default_rng(1)
    questions = [Question(f"q{i}", f"question {i}?", tuple(f"o{k}" for k in range(2 + i % 3)))
                 for i in range(n_questions)]
    answers = {g: {i: rng.dirichlet(np.ones(len(q.options))) for i, q in enumerate(questions)} for g in ("A", "B", "C")}
    return PreferenceData("globalopinionqa", questions, answers)


def test_no_skew_is_the_data_itself_and_skewed_answers_stay_distributions():
    data = survey()
    assert apply_skew(data, 0.0, seed=0) is data
    for strength in (0.25, 1.0):
        skewed = apply_skew(data, strength, seed=0)
        for g, by_question in skewed.answers.items():
            for q, dist in by_question.items():
                assert dist.shape == data.answers[g][q].shape and (dist >= 0).all()
                assert dist.sum() == pytest.approx(1.0, abs=1e-6)
    # the original is left as it was
    assert apply_skew(data, 0.5, seed=0).answers["A"][0] is not data.answers["A"][0]


def test_full_skew_is_each_groups_own_preference_on_every_question():
    data = survey()
    skewed = apply_skew(data, 1.0, seed=3)
    for g in data.groups:
        for q, question in enumerate(data.questions):
            np.testing.assert_allclose(skewed.answers[g][q], preference(3, g, len(question.options)), atol=1e-6)
    # groups differ from each other, the same seed gives the same preference, another seed another
    assert not np.allclose(preference(3, "A", 4), preference(3, "B", 4))
    np.testing.assert_array_equal(preference(3, "A", 4), preference(3, "A", 4))
    assert not np.allclose(preference(3, "A", 4), preference(4, "A", 4))
    # a question with fewer options keeps the same positions' order of preference
    assert np.argsort(preference(3, "A", 3)).tolist() == np.argsort(preference(3, "A", 4)[:3]).tolist()


def test_half_skew_is_halfway_and_moves_groups_apart():
    data = survey()
    half, full = apply_skew(data, 0.5, seed=0), apply_skew(data, 1.0, seed=0)
    np.testing.assert_allclose(half.answers["B"][2], 0.5 * data.answers["B"][2] + 0.5 * full.answers["B"][2], atol=1e-6)


def test_skew_must_be_a_strength_between_0_and_1():
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"'skew' must be in \[0, 1\]"):
            RunConfig(skew=bad)


def test_a_skewed_run_trains_on_skewed_answers_and_its_bundles_say_so(tiny_config, tmp_path):
    plain = prepare_experiment(tiny_config(), progress=False)
    cfg = tiny_config(skew=0.5)
    exp = prepare_experiment(cfg, progress=False)
    g = exp.split.train[0]
    assert exp.vectors(g, "train").keys == plain.vectors(g, "train").keys
    assert not np.allclose(exp.vectors(g, "train").y, plain.vectors(g, "train").y)
    # a SuperNode reading its bundle gets the same skewed answers; a bundle of another skew is refused
    bundles = write_bundles(exp, [g], tmp_path / "b")
    node = bundle_experiment(cfg, [read_bundle(bundles[g])], GroupSplit([g], []))
    np.testing.assert_array_equal(node.vectors(g, "train").y, exp.vectors(g, "train").y)
    with pytest.raises(BundleError, match="skew=0.5.*skew=0.0"):
        bundle_experiment(cfg.replace(skew=0.0), [read_bundle(bundles[g])], GroupSplit([g], []))
