"""grpo.py: the LM's opinions from its learning blocks on cached states, and GRPO's fixed point."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pluralllm_flwr import grpo
from pluralllm_flwr.align import _freeze_all_but_last, letter_tokens, lm_opinions
from pluralllm_flwr.data import Question
from pluralllm_flwr.metrics import alignment
from pluralllm_flwr.reward import GroupAggregator, GroupReward, format_question

from .conftest import tiny_causal_lm

QUESTIONS = [Question("a", "Short?", ("Yes", "No")),
             Question("b", "A much longer question that pads the other one, does it?", ("A lot", "Some", "None")),
             Question("c", "Middling length question here?", ("Agree", "Disagree", "Unsure", "Other"))]


@pytest.fixture(scope="module")
def lm():
    model, tok = tiny_causal_lm([format_question(q) + " A" for q in QUESTIONS] + [" A", " B", " C", " D"], 300)
    return model.eval(), tok, letter_tokens(tok, 4)


@pytest.mark.parametrize("layers", [1, 2, 0])
def test_the_learning_blocks_on_cached_states_give_the_whole_lms_opinions(lm, layers):
    model, tok, letters = lm
    full, full_mass = lm_opinions(model, tok, QUESTIONS, letters)
    policy = grpo.OpinionPolicy(model, tok, QUESTIONS, letters, trainable_layers=layers, batch_size=2)
    cached, mass = policy.opinions()
    for a, b in zip(cached, full, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert mass == pytest.approx(full_mass, abs=1e-6)
    policy.check(full)


def test_only_the_learning_blocks_get_gradients(lm):
    model, tok, letters = lm
    _freeze_all_but_last(model, 1)
    try:
        policy = grpo.OpinionPolicy(model, tok, QUESTIONS, letters, trainable_layers=1)
        sum(lp[0] for lp in policy.log_opinions([0, 1, 2])).backward()
        touched = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert touched and all(name.startswith(("model.layers.1.", "model.norm")) for name in touched)
    finally:
        model.requires_grad_(True)
        model.zero_grad(set_to_none=True)


def test_cached_states_that_do_not_give_the_lms_opinions_are_refused(lm):
    model, tok, letters = lm
    full, _ = lm_opinions(model, tok, QUESTIONS, letters)
    policy = grpo.OpinionPolicy(model, tok, QUESTIONS, letters, trainable_layers=1)
    policy.inputs = [x + 1.0 for x in policy.inputs]  # as if the blocks ran on other states than the LM's
    with pytest.raises(grpo.OpinionPolicyError, match="--trainer trl"):
        policy.check(full)


class Logits:
    """A policy that is its answer distributions' logits: GRPO can reach any distribution."""

    def __init__(self, distributions):
        self.model = torch.nn.Module()
        self.model.logits = torch.nn.Parameter(torch.log(torch.tensor(distributions, dtype=torch.float64)))

    def log_opinions(self, indices):
        return [torch.log_softmax(self.model.logits[i], -1) for i in indices]


def test_grpo_with_the_log_ratio_reward_reaches_the_groups_distribution():
    """Its fixed point is the KL optimum, p_g. Without the importance ratio on the KL term (its expected
    gradient then that of KL(pi_ref ‖ pi)) the same run ends at [0.234 0.148 0.618] and [0.182 0.024 0.795],
    0.87 aligned to the targets."""
    reference = [[0.7, 0.2, 0.1], [0.9, 0.05, 0.05]]
    targets = [np.array([0.2, 0.3, 0.5]), np.array([0.1, 0.1, 0.8])]
    questions = [Question(f"q{i}", f"Question {i}?", ("x", "y", "z")) for i in range(2)]
    keys = [q.key for q in questions]
    runs = []
    for _ in range(2):
        reward = GroupReward(dict(zip(keys, questions)), {"G": dict(zip(keys, targets))}, GroupAggregator(["G"]),
                             reference={k: np.array(r) for k, r in zip(keys, reference)}, beta=0.1)
        policy = Logits(reference)
        steps = []
        grpo.train(policy, reward, keys, [np.array(r) for r in reference], steps=3000, learning_rate=0.03, beta=0.1,
                   generations=64, prompts_per_step=2, seed=0, on_step=steps.append)
        assert steps == list(range(1, 3001))
        runs.append(torch.softmax(policy.model.logits.detach(), -1).numpy())
    assert all(alignment(pi, p) > 0.98 for pi, p in zip(runs[0], targets))  # the biased KL: 0.87
    np.testing.assert_array_equal(runs[0], runs[1])  # the seed fixes every draw
