"""Checks that need a CUDA GPU (`make gpu-check`); skipped cleanly without one."""
import numpy as np
import pytest
import torch

from pluralllm_flwr.data import GroupVectors
from pluralllm_flwr.gpo import GPOPredictor
from pluralllm_flwr.model import ModelConfig
from pluralllm_flwr.training import EpisodeSizes, predict, train_steps

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


def group(name: str, n: int = 40, dim: int = 32, seed: int = 0) -> GroupVectors:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 5, n)
    y = np.concatenate([rng.dirichlet(np.ones(k)) for k in sizes]).astype(np.float32)
    return GroupVectors(name, [f"q{i}" for i in range(n)], rng.standard_normal((sizes.sum(), dim), dtype=np.float32),
                        y, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def test_training_step_on_cuda_matches_cpu():
    groups = [group("a"), group("b", seed=1)]
    losses = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = GPOPredictor(ModelConfig(input_dim=32, d_model=32, num_layers=2)).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses[device] = train_steps(model, opt, groups, 3, EpisodeSizes(5, 10, 5, 10), np.random.default_rng(0), device)
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=1e-3, atol=1e-4)


def test_predict_on_cuda_returns_distributions():
    g = group("a")
    model = GPOPredictor(ModelConfig(input_dim=32, d_model=32, num_layers=2)).to("cuda")
    out = predict(model, g.subset(range(10)), g.subset(range(10, 40)), "cuda")
    assert len(out) == 30 and all(abs(p.sum() - 1) < 1e-5 for p in out)


def test_the_one_token_grpo_runs_on_cuda_and_reads_the_lms_opinions_there():
    from pluralllm_flwr import grpo
    from pluralllm_flwr.align import _freeze_all_but_last, letter_tokens, lm_opinions
    from pluralllm_flwr.data import Question
    from pluralllm_flwr.reward import GroupAggregator, GroupReward, format_question

    from .conftest import tiny_causal_lm

    questions = [Question("a", "Short?", ("Yes", "No")), Question("b", "A longer question, is it?", ("X", "Y", "Z"))]
    model, tok = tiny_causal_lm([format_question(q) + " A" for q in questions] + [" A", " B", " C"], 300)
    letters = letter_tokens(tok, 3)
    on_cpu, _ = lm_opinions(model.eval(), tok, questions, letters)
    model.to("cuda")
    _freeze_all_but_last(model, 1)
    policy = grpo.OpinionPolicy(model, tok, questions, letters, trainable_layers=1)
    policy.check(on_cpu)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    keys = [q.key for q in questions]
    reward = GroupReward(dict(zip(keys, questions)), {"G": {k: np.full(len(q.options), 1 / len(q.options))
                                                           for k, q in zip(keys, questions)}},
                         GroupAggregator(["G"]), reference=dict(zip(keys, on_cpu)), beta=0.1)
    grpo.train(policy, reward, keys, on_cpu, steps=3, learning_rate=1e-2, beta=0.1, generations=4,
               prompts_per_step=2, seed=0)
    after = [p for p in model.parameters() if p.requires_grad]
    assert all(p.device.type == "cuda" for p in after) and any(not torch.equal(a, b) for a, b in zip(after, before))
