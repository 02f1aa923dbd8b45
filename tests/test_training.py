import math

import numpy as np
import pytest
import torch

from pluralllm_flwr.data import GroupVectors
from pluralllm_flwr.evaluation import HeldOutGroup, evaluate_baselines, evaluate_model
from pluralllm_flwr.metrics import js_metric, train_mean_baseline
from pluralllm_flwr.gpo import GPOPredictor
from pluralllm_flwr.model import ModelConfig
from pluralllm_flwr.training import (ClientOptimizer, EpisodeSizes, collate, draw_contexts, group_distributions, predict,
                                     sample_episode, train_steps)

torch.set_num_threads(1)
DIM = 8
SMALL = ModelConfig(input_dim=DIM, d_model=32, embed_depth=2, num_layers=2, num_heads=2, dim_feedforward=32)


def question_bank(seed, n_questions=60):
    """Shared questions: 2-5 options each, one random embedding per option."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 6, n_questions)
    x = rng.normal(size=(sizes.sum(), DIM)).astype(np.float32)
    return x, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def linear_group(name, bank, w):
    """A group whose distribution for each question is softmax(option embedding · w)."""
    x, offsets = bank
    logits = x.astype(np.float64) @ w
    y = np.concatenate([np.exp(l - l.max()) / np.exp(l - l.max()).sum() for l in np.split(logits, offsets[1:-1])])
    return GroupVectors(name, [f"q{i}" for i in range(len(offsets) - 1)], x, y.astype(np.float32), offsets)


def random_group(name="g", n_questions=60, seed=0):
    return linear_group(name, question_bank(seed, n_questions), np.random.default_rng(seed + 1).normal(size=DIM))


def evaluate_group(model, group, context_size=20, draws=2, seed=0):
    """The held-out evaluation of one group (evaluation.evaluate_model), JS alignment only."""
    held = [HeldOutGroup(group.group, group, None, seed, draw_contexts(group.num_questions, context_size, draws, seed))]
    return evaluate_model(model, held, {"alignment": js_metric}, "cpu", context_sizes=(context_size,))


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return GPOPredictor(SMALL)


def test_episode_sizes_are_drawn_within_bounds_and_capped():
    group = random_group(n_questions=40)
    rng = np.random.default_rng(0)
    sizes = EpisodeSizes(min_context=5, max_context=30, min_target=5, max_target=30)
    seen_context = set()
    for _ in range(200):
        context, targets = sample_episode(group, sizes, rng)
        assert 5 <= context.num_questions <= 30 and 1 <= targets.num_questions <= min(30, 40 - context.num_questions)
        assert targets.num_questions >= min(5, 40 - context.num_questions)
        assert not set(context.keys) & set(targets.keys)
        seen_context.add(context.num_questions)
    assert min(seen_context) == 5 and max(seen_context) == 30


def test_episode_of_a_small_group_leaves_one_target():
    group = random_group(n_questions=11)
    context, targets = sample_episode(group, EpisodeSizes(10, 100, 10, 100), np.random.default_rng(0))
    assert (context.num_questions, targets.num_questions) == (10, 1)


def test_too_small_group_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'Tiny' has 10 questions"):
        sample_episode(random_group("Tiny", n_questions=10), EpisodeSizes(), np.random.default_rng(0))


def test_collate_layout_and_masks():
    g1, g2 = random_group("a", 30, seed=1), random_group("b", 30, seed=2)
    episodes = [(g1.subset([0, 1, 2]), g1.subset([3, 4])), (g2.subset([5]), g2.subset([6, 7, 8, 9]))]
    batch = collate(episodes)
    lengths = [(len(c.y), len(t.y)) for c, t in episodes]
    T = max(c + t for c, t in lengths)
    assert batch.x.shape == (2, T, DIM) and batch.y_in.shape == batch.segment.shape == (2, T)
    for b, ((context, targets), (nc, nt)) in enumerate(zip(episodes, lengths)):
        np.testing.assert_array_equal(batch.x[b, :nc + nt].numpy(), np.concatenate([context.x, targets.x]))
        np.testing.assert_array_equal(batch.y_true[b, :nc + nt].numpy(), np.concatenate([context.y, targets.y]))
        np.testing.assert_array_equal(batch.y_in[b, :nc].numpy(), context.y)
        assert (batch.y_in[b, nc:] == 0).all() and (batch.x[b, nc + nt:] == 0).all()
        assert batch.is_context[b, :nc].all() and not batch.is_context[b, nc:].any()
        assert batch.is_target[b, nc:nc + nt].all() and not batch.is_target[b, :nc].any()
        assert not batch.is_target[b, nc + nt:].any() and (batch.segment[b, nc + nt:] == -1).all()
        sizes = np.concatenate([np.diff(context.offsets), np.diff(targets.offsets)])
        np.testing.assert_array_equal(torch.unique_consecutive(batch.segment[b, :nc + nt], return_counts=True)[1], sizes)
    real = batch.segment[batch.segment >= 0]
    assert len(real.unique()) == sum(c.num_questions + t.num_questions for c, t in episodes)


def test_batched_predict_equals_one_question_at_a_time():
    group = random_group(n_questions=60, seed=3)
    context, targets = group.subset(range(20)), group.subset(range(20, 60))
    model = fresh_model()
    together = predict(model, context, targets, "cpu")
    alone = [predict(model, context, targets.subset([i]), "cpu")[0] for i in range(targets.num_questions)]
    assert len(together) == targets.num_questions
    assert [len(p) for p in together] == list(np.diff(targets.offsets))
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        assert a.sum() == pytest.approx(1.0, abs=1e-5)


def test_predict_restores_training_mode():
    group = random_group()
    model = fresh_model()
    model.train()
    predict(model, group.subset(range(5)), group.subset([5]), "cpu")
    assert model.training


def test_same_seed_gives_the_same_losses_and_scores():
    groups = [random_group(f"g{i}", seed=i) for i in range(3)]

    def run(seed):
        model = fresh_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses = train_steps(model, optimizer, groups, 3, EpisodeSizes(5, 20, 5, 20), np.random.default_rng(seed), "cpu")
        return losses, evaluate_group(model, groups[0], context_size=10, draws=2, seed=seed)

    (losses_a, eval_a), (losses_b, eval_b), (losses_c, _) = run(0), run(0), run(1)
    assert len(losses_a) == 3 and losses_a == losses_b and losses_a != losses_c
    assert eval_a == eval_b


def test_each_step_is_one_batch_with_an_episode_from_every_group(monkeypatch):
    import pluralllm_flwr.training as training
    groups = [random_group(f"g{i}", seed=i) for i in range(3)]
    seen = []

    def recording_collate(episodes):
        seen.append(sorted(context.group for context, _ in episodes))
        return collate(episodes)

    monkeypatch.setattr(training, "collate", recording_collate)
    model = fresh_model()
    losses = train_steps(model, torch.optim.Adam(model.parameters()), groups, 4, EpisodeSizes(5, 20, 5, 20),
                         np.random.default_rng(0), "cpu")
    assert len(losses) == 4 and seen == [["g0", "g1", "g2"]] * 4


def test_proximal_term_holds_weights_near_the_anchor():
    groups = [random_group(f"g{i}", seed=i) for i in range(2)]

    def drift(mu):
        model = fresh_model()
        anchor = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        train_steps(model, optimizer, groups, 10, EpisodeSizes(5, 20, 5, 20), np.random.default_rng(0), "cpu",
                    proximal_mu=mu, anchor=anchor)
        return sum(((p - a) ** 2).sum().item() for p, a in zip(model.parameters(), anchor))

    assert drift(10.0) < 0.7 * drift(0.0)


@pytest.mark.parametrize("kind, reference", [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_client_optimizer_is_bit_identical_to_torch_optim(kind, reference):
    groups = [random_group(f"g{i}", seed=i) for i in range(2)]
    trained = []
    for make in (lambda m: ClientOptimizer(m.parameters(), kind, 0.01), lambda m: reference(m.parameters(), lr=0.01)):
        model = fresh_model()
        losses = train_steps(model, make(model), groups, 6, EpisodeSizes(5, 20, 5, 20), np.random.default_rng(0), "cpu")
        trained.append((losses, [p.detach().clone() for p in model.parameters()]))
    (ours, ours_w), (theirs, theirs_w) = trained
    assert ours == theirs
    assert all(torch.equal(a, b) for a, b in zip(ours_w, theirs_w))
    assert not all(torch.equal(a, b) for a, b in zip(ours_w, fresh_model().parameters()))  # it did train
    with pytest.raises(ValueError, match="client optimizer must be one of"):
        ClientOptimizer(fresh_model().parameters(), "adamw", 0.01)


def test_proximal_without_a_matching_anchor_is_an_error():
    model = fresh_model()
    optimizer = torch.optim.Adam(model.parameters())
    args = (model, optimizer, [random_group()], 1, EpisodeSizes(5, 20, 5, 20), np.random.default_rng(0), "cpu")
    with pytest.raises(ValueError, match="anchor"):
        train_steps(*args, proximal_mu=0.1)
    with pytest.raises(ValueError, match="anchor"):
        train_steps(*args, proximal_mu=0.1, anchor=[torch.zeros(1)])


def test_context_draws_are_seeded_and_distinct():
    a, b, c = (draw_contexts(40, 10, 3, seed) for seed in (7, 7, 8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert len({tuple(sorted(ctx)) for ctx in a}) == 3 and all(len(set(ctx)) == 10 for ctx in a)


def test_evaluation_scores_lie_within_the_per_group_range_and_repeat():
    group = random_group(n_questions=40)
    model = fresh_model()
    a, b = evaluate_group(model, group, 10, 3, seed=7), evaluate_group(model, group, 10, 3, seed=7)
    assert a == b and a["nan_excluded"] == 0 and 0 < a["alignment"] < 1
    assert a["per_group"] == {"g": a["alignment"]}


def test_evaluation_excludes_and_counts_nan_scores():
    group = random_group(n_questions=30)
    group.y[group.offsets[0]:group.offsets[1]] = 0.0   # question q0: an all-zero answer
    result = evaluate_group(fresh_model(), group, context_size=5, draws=4, seed=0)
    times_target = sum(0 not in ctx for ctx in draw_contexts(30, 5, 4, 0))
    assert times_target > 0 and result["nan_excluded"] == times_target
    assert not math.isnan(result["alignment"])


def test_training_beats_uniform_and_train_mean_baselines_on_held_out_groups():
    """Groups differ systematically: group g answers softmax(x · w_g), w_g = A·z_g with a 2-d
    latent z_g. Only a few-shot learner that reads the context can tell the held-out groups apart."""
    bank = question_bank(0)
    rng = np.random.default_rng(1)
    A = rng.normal(size=(DIM, 2))
    train = [linear_group(f"t{i}", bank, A @ rng.normal(size=2)) for i in range(32)]
    held_out = [linear_group(f"h{i}", bank, A @ rng.normal(size=2)) for i in range(6)]
    model = fresh_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        picked = rng.choice(len(train), 8, replace=False)
        train_steps(model, optimizer, [train[i] for i in picked], 1, EpisodeSizes(5, 30, 5, 30), rng, "cpu")
    held = [HeldOutGroup(g.group, g, None, i, draw_contexts(g.num_questions, 20, 2, i)) for i, g in enumerate(held_out)]
    learned = evaluate_model(model, held, {"alignment": js_metric}, "cpu", context_sizes=(20,))["alignment"]
    train = [group_distributions(g) for g in train]
    n_options = {k: len(v) for k, v in train[0].items()}
    mean_baseline = train_mean_baseline(train, n_options)
    assert mean_baseline.coverage == 1.0
    base = evaluate_baselines(held, train, mean_baseline, n_options)
    train_mean, uniform = base["train_mean"]["alignment"], base["uniform"]["alignment"]
    assert learned > max(train_mean, uniform) + 0.1, (learned, train_mean, uniform)
