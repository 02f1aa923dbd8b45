"""Group conditioning: option features, the predictor architectures, the conditioning-gain
diagnostic, the context baselines, unseen questions, the same-questions sampler and the schedule."""
import math

import numpy as np
import pytest
import torch

from pluralllm_flwr import config as config_module
from pluralllm_flwr.bundle import BundleError, read_bundle, write_bundles
from pluralllm_flwr.centralized import train_centralized
from pluralllm_flwr.data import GroupSplit, GroupVectors
from pluralllm_flwr.embeddings import EmbeddingTable
from pluralllm_flwr.evaluation import HeldOutGroup, evaluate_model
from pluralllm_flwr.experiment import bundle_experiment, prepare_experiment
from pluralllm_flwr.features import FEATURES, feature_dim, option_features, separation
from pluralllm_flwr.metrics import (alignment, alignment_w1, alignments, alignments_w1, context_mixture_prediction,
                                    js_metric, nearest_group_prediction)
from pluralllm_flwr.model import ModelConfig, Prediction, Predictor
from pluralllm_flwr.predictors import ARCHITECTURES, build_predictor
from pluralllm_flwr.strategies import STRATEGIES
from pluralllm_flwr.report import write_report
from pluralllm_flwr.results import load_results
from pluralllm_flwr.training import (ClientOptimizer, EpisodeSizes, collate, draw_contexts, lr_factor, predict,
                                     sample_same_questions, train_steps)

torch.set_num_threads(1)


def table(seed=0, n_questions=12, dim=6) -> EmbeddingTable:
    rng = np.random.default_rng(seed)
    counts = rng.integers(2, 6, n_questions)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return EmbeddingTable("test", dim, "test", [f"q{i}" for i in range(n_questions)],
                          rng.normal(size=(offsets[-1], dim)).astype(np.float32), offsets)


# ----------------------------------------------------------------------------- features


def test_features_of_a_question_depend_on_that_question_alone():
    """A node holding some questions computes exactly the rows the whole table gives them."""
    full = table()
    keep = [1, 4, 5, 9]
    rows = np.concatenate([np.arange(full.offsets[i], full.offsets[i + 1]) for i in keep])
    part = EmbeddingTable("test", full.dim, "test", [full.keys[i] for i in keep], full.vectors[rows],
                          np.concatenate([[0], np.cumsum(np.diff(full.offsets)[keep])]).astype(np.int64))
    for name in FEATURES:
        a, b = option_features(full, name), option_features(part, name)
        assert a.dim == b.dim == feature_dim(full.dim, name) and a.features == name
        np.testing.assert_array_equal(a.vectors[rows], b.vectors)


def test_question_option_features_split_the_question_from_the_option():
    t = table()
    f = option_features(t, "question-option-position")
    d = t.dim
    for i in range(len(t.keys)):
        block = f.vectors[t.offsets[i]:t.offsets[i + 1]]
        assert np.allclose(block[:, :d], block[0, :d])                 # one question vector per question
        assert np.allclose(block[:, d:2 * d].sum(0), 0, atol=1e-5)      # residuals sum to 0 within it
        assert math.isclose(float(np.sqrt((block[:, d:2 * d] ** 2).mean())), 1.0, rel_tol=1e-4)
        n = len(block)
        np.testing.assert_allclose(block[:, -2], np.arange(n) / (n - 1))
        np.testing.assert_allclose(block[:, -1], 1 / n)
    with pytest.raises(ValueError, match="already holds"):
        option_features(f, "question-option")


def test_separation_sees_near_identical_options():
    t = table()
    shared = np.repeat(np.random.default_rng(1).normal(size=(len(t.keys), t.dim)) * 10, np.diff(t.offsets), 0)
    near = EmbeddingTable("test", t.dim, "test", t.keys, (shared + 0.1 * t.vectors).astype(np.float32), t.offsets)
    raw, feats = separation(near), separation(option_features(near, "question-option"))
    assert raw["within_question_cosine"] > 0.99 and raw["within_question_variance_share"] < 0.01
    assert feats["within_question_cosine"] < 0.6 and feats["within_question_variance_share"] > 0.3


def test_run_config_choices_match_the_registries():
    assert config_module.MODELS == tuple(ARCHITECTURES)
    assert config_module.FEATURES == FEATURES
    assert config_module.STRATEGIES == tuple(STRATEGIES)
    assert config_module.CLIENT_OPTIMIZERS == ClientOptimizer.KINDS


# ----------------------------------------------------------------------------- predictors


def episode_batch(seed=0):
    t = table(seed)
    rng = np.random.default_rng(seed)
    y = np.concatenate([rng.dirichlet(np.ones(n)) for n in np.diff(t.offsets)]).astype(np.float32)
    g = GroupVectors("g", t.keys, t.vectors, y, t.offsets)
    return g, collate([(g.subset(range(4)), g.subset(range(4, 12))), (g.subset(range(6, 9)), g.subset(range(3)))])


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_predicts_distributions_and_trains(architecture):
    g, batch = episode_batch()
    model = build_predictor(ModelConfig(input_dim=6, architecture=architecture, d_model=16, embed_depth=2,
                                        num_layers=1, num_heads=2, dim_feedforward=16), seed=0)
    pred = model(batch.x, batch.y_in, batch.is_context, batch.is_target, batch.segment)
    assert isinstance(pred, Prediction)
    assert (pred.mean[~batch.is_target] == 0).all()
    sums = torch.zeros(int(batch.segment.max()) + 1).index_add(0, batch.segment[batch.is_target],
                                                               pred.mean[batch.is_target])
    targets = torch.unique(batch.segment[batch.is_target])
    torch.testing.assert_close(sums[targets], torch.ones(len(targets)))
    # targets attend to the context only: predicting them together equals predicting each alone
    together = predict(model, g.subset(range(4)), g.subset(range(4, 12)), "cpu")
    alone = [predict(model, g.subset(range(4)), g.subset([i]), "cpu")[0] for i in range(4, 12)]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, atol=1e-5)
    before = model.loss(pred, batch.y_true, batch.is_target).item()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = train_steps(model, optimizer, [g], 30, EpisodeSizes(2, 5, 2, 5), np.random.default_rng(0), "cpu")
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < before


def test_unknown_architecture_is_an_error():
    with pytest.raises(ValueError, match="unknown predictor architecture 'nope'"):
        build_predictor(ModelConfig(input_dim=4, architecture="nope"))


# ----------------------------------------------------------------------------- the gain diagnostic


class ContextBlind(Predictor):
    """Uniform on every question, whatever the context says."""

    def __init__(self):
        super().__init__()
        self.config = ModelConfig(input_dim=1)

    def forward(self, x, y_in, is_context, is_target, segment):
        seg = segment.clamp_min(0)
        counts = torch.zeros(int(seg.max()) + 1).index_add(0, seg[is_target], torch.ones(int(is_target.sum())))
        return Prediction(torch.where(is_target, 1.0 / counts[seg].clamp_min(1), 0.0))


class ContextReader(ContextBlind):
    """Predicts every target from the context's mean lean: p ∝ exp(lean · position), where lean is
    estimated from how much weight the context put on late options (x holds the position)."""

    def forward(self, x, y_in, is_context, is_target, segment):
        position = x[..., 0]
        lean = ((y_in * position * is_context).sum(1) / is_context.sum(1).clamp_min(1) * 8.0)[:, None]
        logits = (lean * position).masked_fill(~is_target, -1e9)
        out = torch.zeros_like(position)
        for s in torch.unique(segment[is_target]):
            m = segment == s
            out[m] = torch.softmax(logits[m], 0)
        return Prediction(out * is_target)


def leaning_groups(leans, n_questions=30):
    """Groups whose answers lean towards late (lean > 0) or early options; x = the option's position."""
    counts = np.full(n_questions, 4)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    position = np.tile(np.linspace(-1, 1, 4), n_questions)
    x = position[:, None].astype(np.float32)
    out = []
    for i, lean in enumerate(leans):
        logits = lean * position.reshape(n_questions, 4)
        y = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).ravel().astype(np.float32)
        out.append(GroupVectors(f"g{i}", [f"q{j}" for j in range(n_questions)], x, y, offsets))
    return out


def heldout(groups, context_size=5, draws=3):
    return [HeldOutGroup(g.group, g, None, i, draw_contexts(g.num_questions, context_size, draws, i))
            for i, g in enumerate(groups)]


def test_gain_is_zero_for_a_model_that_ignores_the_context_and_positive_for_one_that_reads_it():
    groups = heldout(leaning_groups([-2.0, 0.0, 2.0]))
    metrics = {"alignment": js_metric}
    blind = evaluate_model(ContextBlind(), groups, metrics, "cpu", context_sizes=(1, 5))
    assert blind["conditioning"]["applies"] and blind["conditioning_gain"] == 0.0
    reader = evaluate_model(ContextReader(), groups, metrics, "cpu", context_sizes=(1, 5, 29))
    assert reader["conditioning_gain"] > 0.02, reader["conditioning"]
    assert set(reader["context_curve"]) == {"1", "5", "29"}
    assert reader["context_curve"]["5"] == reader["alignment"]  # the main draws are the size-5 draws


def test_unseen_questions_have_their_own_gain_zero_when_blind_positive_when_read():
    """The reward-model case: the context from seen questions, the targets unseen by training."""
    groups = [HeldOutGroup(g.group, g.subset(range(20)), g.subset(range(20, 30)), i,
                           draw_contexts(20, 5, 3, i)) for i, g in enumerate(leaning_groups([-2.0, 0.0, 2.0]))]
    metrics = {"alignment": js_metric}
    blind = evaluate_model(ContextBlind(), groups, metrics, "cpu", context_sizes=(5,))["unseen"]
    assert blind["conditioning_gain"] == 0.0 and blind["n_questions"] == 30
    reader = evaluate_model(ContextReader(), groups, metrics, "cpu", context_sizes=(5,))["unseen"]
    assert reader["conditioning_gain"] > 0.02 and reader["alignment"] > reader["no_context"], reader
    alone = evaluate_model(ContextReader(), groups[:1], metrics, "cpu", context_sizes=(5,))["unseen"]
    assert alone["conditioning_gain"] is None and alone["alignment"] == pytest.approx(reader_alone(groups[:1]))


def reader_alone(groups):
    """The unseen alignment of ContextReader computed without evaluate_model (pooled over draws)."""
    g = groups[0]
    per_question = np.mean([alignments(predict(ContextReader(), g.seen.subset(c), g.unseen, "cpu"), g.unseen_truth)
                            for c in g.contexts], 0)
    return float(per_question.mean())


def test_gain_does_not_apply_without_another_group_on_the_same_questions():
    a, b = leaning_groups([-1.0, 1.0])
    b = b.subset(range(3))  # answered too little to share a context
    groups = [HeldOutGroup("g0", a, None, 0, draw_contexts(a.num_questions, 5, 2, 0)),
              HeldOutGroup("g1", b, None, 1, draw_contexts(3, 2, 2, 1))]
    entry = evaluate_model(ContextBlind(), groups, {"alignment": js_metric}, "cpu", context_sizes=(1,))
    cond = entry["conditioning"]
    assert cond["applies"] and cond["groups_without_partner"] == ["g0"]  # g1's 2 context questions are in g0
    alone = evaluate_model(ContextBlind(), groups[:1], {"alignment": js_metric}, "cpu", context_sizes=(1,))
    assert alone["conditioning_gain"] is None and not alone["conditioning"]["applies"]
    assert "at least two held-out groups" in alone["conditioning"]["reason"]


# ----------------------------------------------------------------------------- baselines and metrics


def test_batched_scores_equal_the_pairwise_ones():
    rng = np.random.default_rng(0)
    pairs = [(rng.dirichlet(np.ones(n)), rng.dirichlet(np.ones(n))) for n in rng.integers(2, 7, 200)]
    pairs += [(np.array([0.5, 0.5]), np.array([0.5, 0.5])), (np.zeros(3), np.ones(3) / 3)]
    got = alignments([p for p, _ in pairs], [q for _, q in pairs])
    want = [alignment(p, q) for p, q in pairs]
    np.testing.assert_allclose(got, want, atol=1e-12)
    ordinal = [rng.permutation(len(p)).astype(float) for p, _ in pairs]
    got = alignments_w1([p for p, _ in pairs], [q for _, q in pairs], ordinal)
    np.testing.assert_allclose(got, [alignment_w1(p, q, o) for (p, q), o in zip(pairs, ordinal)], atol=1e-12)


def test_context_baselines_recover_a_mixture_and_the_nearest_group():
    rng = np.random.default_rng(0)
    keys = [f"q{i}" for i in range(40)]
    train = [{k: rng.dirichlet(np.ones(4)) for k in keys} for _ in range(4)]
    mixed = {k: 0.7 * train[1][k] + 0.3 * train[3][k] for k in keys}
    context, targets = {k: mixed[k] for k in keys[:10]}, keys[10:]
    predicted = context_mixture_prediction(train, context, targets)
    for k in targets:
        np.testing.assert_allclose(predicted[k], mixed[k], atol=1e-6)
    near = nearest_group_prediction(train, {k: train[2][k] for k in keys[:10]}, targets)
    assert all(np.array_equal(near[k], train[2][k]) for k in targets)


def test_run_baselines_are_scored_on_the_models_draws_and_unavailable_on_a_deployment_server(tiny_config, tmp_path):
    cfg = tiny_config()
    exp = prepare_experiment(cfg, progress=False)
    base = exp.baselines()
    assert set(base) == {"uniform", "train_mean", "nearest_group", "context_mixture"}
    assert all(0 < b["alignment"] <= 1 and set(b["per_group"]) == set(exp.split.eval) for b in base.values())
    bundles = write_bundles(exp, exp.split.eval, tmp_path / "b")
    server = prepare_experiment(cfg.replace(eval_bundles=",".join(str(p) for p in bundles.values()),
                                            train_groups=",".join(exp.split.train)), progress=False)
    remote = server.baselines()
    assert remote["uniform"] == base["uniform"]
    for name in ("train_mean", "nearest_group", "context_mixture"):
        assert remote[name]["alignment"] is None and "SuperNodes" in remote[name]["unavailable"]


# ----------------------------------------------------------------------------- unseen questions, bundles


def test_unseen_questions_are_never_trained_on_and_scored_apart(tiny_config, tmp_path):
    cfg = tiny_config(**{"heldout-questions": 0.25})
    exp = prepare_experiment(cfg, progress=False)
    unseen = {exp.data.questions[i].key for i in exp.unseen_questions}
    assert len(unseen) == 10
    for g in exp.split.train:
        for part in ("train", "heldback"):
            assert not unseen & set(exp.vectors(g, part).keys)
    for g in exp.heldout:
        assert set(g.unseen.keys) == unseen and not unseen & set(g.seen.keys)
    writer = train_centralized(cfg, exp, progress=False)
    final = load_results(writer.out_dir)["final"]
    assert 0 < final["unseen"]["alignment"] <= 1 and final["unseen"]["n_questions"] == 10
    assert 0 < load_results(writer.out_dir)["baselines"]["uniform"]["unseen"] <= 1
    report = write_report([writer.out_dir], tmp_path / "report").read_text()
    assert "| with the group's context | with an uninformative context | conditioning gain | questions |" in report
    # a SuperNode's bundle carries the run's features and unseen questions, and computes the same vectors
    bundles = write_bundles(exp, exp.split.train + exp.split.eval, tmp_path / "b")
    for g in exp.split.train:
        node = bundle_experiment(cfg, [read_bundle(bundles[g])], GroupSplit([g], []))
        for part in ("train", "heldback", "unseen"):
            np.testing.assert_array_equal(node.vectors(g, part).x, exp.vectors(g, part).x)
            assert node.vectors(g, part).keys == exp.vectors(g, part).keys
    with pytest.raises(BundleError, match="features='question-option-position'"):
        bundle_experiment(cfg.replace(features="raw"), [read_bundle(bundles[exp.split.train[0]])],
                          GroupSplit([exp.split.train[0]], []))


# ----------------------------------------------------------------------------- sampler and schedule


def test_same_questions_sampler_gives_every_group_the_same_questions():
    t = table(n_questions=30)
    y = np.concatenate([np.ones(n) / n for n in np.diff(t.offsets)]).astype(np.float32)
    full = GroupVectors("a", t.keys, t.vectors, y, t.offsets)
    groups = [full, full.subset(range(0, 30, 2)), full.subset(range(30))]
    episodes = sample_same_questions(groups, EpisodeSizes(3, 6, 3, 6), np.random.default_rng(0))
    (c0, t0), (c1, t1), (c2, t2) = episodes
    assert c0.keys == c2.keys and t0.keys == t2.keys
    order = [k for k in c0.keys + t0.keys if k in set(groups[1].keys)]
    assert (c1.keys + t1.keys)[:len(order)] == order[:len(c1.keys + t1.keys)]
    # separate nodes drawing from equal streams pick the same questions
    again = sample_same_questions([full], EpisodeSizes(3, 6, 3, 6), np.random.default_rng(0))
    assert again[0][0].keys == c0.keys


def test_learning_rate_schedule_warms_up_decays_and_never_climbs_back():
    assert [lr_factor(s, 10, "constant", 2) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, 12, "cosine", 2) for s in range(20)]
    assert cosine[:2] == [0.5, 1.0] and cosine[2] == 1.0
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:])) and cosine[12:] == [0.0] * 8


# ----------------------------------------------------------------------------- learning to condition


@pytest.mark.slow
def test_default_model_learns_to_condition_on_groups_that_differ(tiny_config):
    """Synthetic groups lean by different amounts towards one end of every question: the default
    model, trained centrally, must fit a held-out group better from its own context than from
    another held-out group's answers."""
    cfg = tiny_config(**{"train-groups": "G0,G2,G4", "eval-groups": "G1,G3", "num-server-rounds": 150,
                         "eval-every": 150, "lr": 0.003, "d-model": 32})
    assert cfg.model == config_module.RunConfig.model
    writer = train_centralized(cfg, progress=False)
    final = load_results(writer.out_dir)["final"]
    assert final["conditioning_gain"] > 0.01, final["conditioning"]

