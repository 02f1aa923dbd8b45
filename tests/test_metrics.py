import math
import warnings

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from pluralllm_flwr.metrics import (OrdinalW1, alignment, alignment_w1, fairness, mean_excluding_nan,
                                    rounds_to_target, train_mean_baseline,
                                    uniform_prediction)


def test_alignment_of_identical_distributions_is_one():
    assert alignment([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == pytest.approx(1.0, abs=1e-12)


def test_alignment_hand_computed_pair():
    # m = [0.75, 0.25]; KL(p||m) = ln(4/3); KL(q||m) = (ln(2/3) + ln 2)/2; distance = sqrt(mean of both)
    js = (math.log(4 / 3) + 0.5 * (math.log(2 / 3) + math.log(2))) / 2
    assert alignment([1.0, 0.0], [0.5, 0.5]) == pytest.approx(1 - math.sqrt(js), abs=1e-12)


def test_alignment_of_disjoint_distributions_uses_natural_log():
    assert alignment([1, 0], [0, 1]) == pytest.approx(1 - math.sqrt(math.log(2)), abs=1e-12)


def test_alignment_normalises_inputs_that_do_not_sum_to_one():
    assert alignment([2.0, 2.0], [0.5, 0.5]) == pytest.approx(1.0, abs=1e-12)


def test_undefined_alignment_is_nan_not_perfect():
    assert math.isnan(alignment([0.0, 0.0], [0.5, 0.5]))
    assert math.isnan(alignment([np.nan, 1.0], [0.5, 0.5]))
    assert math.isnan(alignment_w1([0.0, 0.0], [0.5, 0.5], [0, 1]))


def test_near_identical_pairs_score_one_where_scipy_returns_nan():
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(50):
        p = rng.dirichlet(np.ones(5))
        pairs.append((p, np.abs(p + rng.normal(0, 1e-10, 5))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert any(math.isnan(jensenshannon(p, q)) for p, q in pairs), "no pair hits scipy's rounding NaN"
    assert all(1 - 1e-4 < alignment(p, q) <= 1.0 for p, q in pairs)


def test_alignment_rejects_mismatched_or_negative_inputs():
    with pytest.raises(ValueError, match="equal length"):
        alignment([0.5, 0.5], [1 / 3] * 3)
    with pytest.raises(ValueError, match="non-negative"):
        alignment([1.5, -0.5], [0.5, 0.5])


@pytest.mark.parametrize("p, q, expected", [
    ([1, 0, 0, 0], [0, 0, 0, 1], 0.0),               # W1 = 3 = max
    ([1, 0, 0, 0], [0, 1, 0, 0], 1 - 1 / 3),         # one step of three
    ([0.5, 0, 0, 0.5], [0, 0.5, 0.5, 0], 1 - 1 / 3),  # half the mass moves 1 step each way
    ([0.1, 0.2, 0.7, 0.0], [0.1, 0.2, 0.7, 0.0], 1.0),
])
def test_alignment_w1_hand_computed(p, q, expected):
    assert alignment_w1(p, q, [1, 2, 3, 4]) == pytest.approx(expected, abs=1e-12)


def test_alignment_w1_uses_ordinal_positions_not_indices():
    # positions 0, 1, 10: moving all mass from the middle to the top costs 9 of 10
    assert alignment_w1([0, 1, 0], [0, 0, 1], [0, 1, 10]) == pytest.approx(0.1, abs=1e-12)


def test_ordinal_w1_metric_scores_ordinal_questions_and_nan_for_the_rest():
    w1 = OrdinalW1({"q": [1, 2, 3]})
    assert w1("q", [1, 0, 0], [0, 0, 1]) == pytest.approx(0.0)
    assert math.isnan(w1("other", [1, 0], [0, 1]))
    np.testing.assert_allclose(w1.many(["q", "other", "q"], [[1, 0, 0], [1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1], [0, 0, 1]]),
                               [0.0, math.nan, 1.0])


def test_mean_excluding_nan_counts_nans():
    assert mean_excluding_nan([1.0, math.nan, 0.5]) == (0.75, 1)
    mean, n = mean_excluding_nan([math.nan])
    assert math.isnan(mean) and n == 1


def test_fairness_equal_scores():
    f = fairness({"a": 0.8, "b": 0.8, "c": 0.8})
    assert f["jain"] == pytest.approx(1.0) and f["cov"] == pytest.approx(0.0) and f["worst"] == 0.8


def test_fairness_hand_computed():
    f = fairness({"a": 0.5, "b": 1.0})
    assert f["jain"] == pytest.approx(2.25 / (2 * 1.25))   # (Σx)² / (n Σx²) = 0.9
    assert f["cov"] == pytest.approx(0.25 / 0.75)          # population std / mean
    assert (f["worst"], f["worst_group"]) == (0.5, "a")


def test_fairness_excludes_and_counts_nan_groups():
    f = fairness({"a": 0.5, "b": math.nan, "c": 1.0})
    assert f["jain"] == pytest.approx(0.9) and f["nan_excluded"] == 1 and f["n_groups"] == 2
    with pytest.raises(ValueError, match="at least one group"):
        fairness({"b": math.nan})


def test_rounds_to_target():
    history = [{"round": 10, "alignment": 0.70}, {"round": 20}, {"round": 30, "alignment": math.nan},
               {"round": 40, "alignment": 0.81}, {"round": 50, "alignment": 0.85}]
    assert rounds_to_target(history, 0.8) == 40
    assert rounds_to_target(history, 0.7) == 10
    assert rounds_to_target(history, 0.9) is None
    assert rounds_to_target([{"epoch": 3, "score": 0.5}], 0.5, key="score", x="epoch") == 3


def test_uniform_prediction():
    np.testing.assert_allclose(uniform_prediction(4), [0.25] * 4)
    with pytest.raises(ValueError):
        uniform_prediction(0)


def test_train_mean_baseline():
    train = [{"a": np.array([1.0, 0.0]), "b": np.array([2.0, 2.0]), "z": np.array([1.0])},
             {"a": np.array([0.0, 1.0]), "b": np.array([0.0, 0.0])}]  # all-zero answer: skipped
    base = train_mean_baseline(train, {"a": 2, "b": 2, "c": 3})
    np.testing.assert_allclose(base.predictions["a"], [0.5, 0.5])
    np.testing.assert_allclose(base.predictions["b"], [0.5, 0.5])      # normalised, zero answer ignored
    np.testing.assert_allclose(base.predictions["c"], [1 / 3] * 3)     # nobody answered: uniform
    assert base.coverage == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="'a'"):
        train_mean_baseline([{"a": np.array([1.0, 0.0, 0.0])}], {"a": 2})


def test_baselines_pool_pairs_over_draws_and_count_nan():
    from pluralllm_flwr.data import GroupVectors
    from pluralllm_flwr.evaluation import HeldOutGroup, evaluate_baselines

    offsets = np.array([0, 2, 4, 6])
    y = np.array([0.5, 0.5, 0.5, 0.5, 0.0, 0.0], np.float32)  # q3: an all-zero answer
    g = GroupVectors("g1", ["q1", "q2", "q3"], np.zeros((6, 1), np.float32), y, offsets)
    held = [HeldOutGroup("g1", g, None, 0, [np.array([0]), np.array([1])])]
    train = [{"q1": np.array([1.0, 0.0]), "q2": np.array([1.0, 0.0]), "q3": np.array([1.0, 0.0])}]
    base = evaluate_baselines(held, train, train_mean_baseline(train, {k: 2 for k in train[0]}), {k: 2 for k in train[0]})
    a = alignment([1, 0], [0.5, 0.5])
    assert base["uniform"]["alignment"] == pytest.approx(1.0)  # q2 and q1 (one draw each); q3 is NaN, skipped
    assert base["train_mean"]["alignment"] == pytest.approx(a) and base["train_mean"]["coverage"] == 1.0
    assert base["nearest_group"]["alignment"] == pytest.approx(a)
