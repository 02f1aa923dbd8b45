"""GRPO for one-letter answers, with the policy's frozen trunk computed once per question.

`pluralllm align` asks the LM for one option letter after a fixed prompt per question. TRL's
`GRPOTrainer` serves any completion, and so runs the whole LM three times a step (generation, the
reference model, the policy): about 6 s a step for SmolLM2-135M on 2 CPU cores, so the hundreds of
steps GRPO needs to bring the LM to a group's answers take hours. Three facts of this task make nearly
all of that work redundant:

- every completion of a prompt is one token drawn from the same next-token distribution, the LM's
  opinion on that question: it is computed once per prompt, not once per completion;
- the reference model's opinions are the base LM's, fixed before training;
- only the last `trainable_layers` blocks learn, so the hidden states entering them are fixed too:
  `OpinionPolicy` computes them once per question and each step runs the learning blocks alone.

`train` is then GRPO itself: per step, `prompts_per_step` questions in a seeded shuffled order, each
with `generations` letters sampled from the policy's opinion, rewarded by `reward.GroupReward`. Its
loss is TRL's GRPO loss for one-token completions, with its default `use_bias_correction_kl=True` (one iteration per
batch, so the importance ratio ρ is 1, with the gradient of log π, and clipping inactive;
`scale_rewards="none"`): the mean over completions of ρ_i·(−A_i + β·k3_i), A_i the reward minus its
prompt's mean, k3_i = π_ref(c_i)/π(c_i) − log(π_ref(c_i)/π(c_i)) − 1. The factor ρ on k3 matters: k3
alone, differentiated at completions sampled from π, has the expected gradient of KL(π_ref ‖ π), the
other direction than the penalty docs/alignment.md derives the reward's optimum for; ρ·k3 has that of
KL(π ‖ π_ref).
The optimiser is TRL's default (AdamW without weight decay, the learning rate decaying linearly to 0,
gradients clipped to norm 1), so `AlignSettings` mean the same for both trainers.

One difference from TRL, deliberately: π here is the opinion itself, the softmax over the question's
own option letters, for sampling, log-probabilities and the KL term alike. TRL samples from the letters
(every other token suppressed) but takes log-probabilities and the KL over the whole vocabulary. So the
objective maximised is exactly docs/alignment.md's E_π[r] − β·KL(π ‖ π_ref) over answer distributions,
whose optimum for the log-ratio reward is the group's predicted distribution, and no letter beyond a
question's options is ever drawn.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from .data import Question
from .reward import GroupReward, format_question

AGREEMENT = 1e-4  # the largest difference from the whole LM's opinions `OpinionPolicy.check` accepts


def letter_opinions(logits: torch.Tensor, options: Sequence[Sequence[int]]) -> tuple[list[np.ndarray], list[float]]:
    """Per row of next-token `logits`, the opinion (the probabilities of its question's option letters
    `options[row]`, renormalised over them) and the share of the next token's probability on them."""
    opinions, mass = [], []
    for row, letters in zip(torch.softmax(logits.double(), -1), options, strict=True):
        on_letters = row[list(letters)]
        mass.append(float(on_letters.sum()))
        opinions.append((on_letters / on_letters.sum()).cpu().numpy())
    return opinions, mass


class OpinionPolicyError(ValueError):
    """The policy's architecture does not let its learning blocks run on their own."""


@contextmanager
def _only_last_blocks(decoder, k: int):
    """The decoder with only its last k blocks, the same modules (so their training is the LM's)."""
    blocks = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(blocks)[-k:])
    try:
        yield decoder
    finally:
        decoder.layers = blocks


class OpinionPolicy:
    """The LM's opinions on a fixed set of questions, differentiable in its last `trainable_layers`
    blocks (0: in every parameter), with the hidden states entering those blocks computed once.

    The decoder (`model.get_decoder()`, a Llama-style stack of `layers` followed by `norm`) is run on
    the cached states with its blocks list cut to the learning ones; `check` verifies on the given
    questions that this gives the whole LM's opinions."""

    def __init__(self, model, tok, questions: Sequence[Question], letters: Sequence[int], trainable_layers: int,
                 batch_size: int = 8) -> None:
        self.model, self.k, self.batch_size = model, trainable_layers, batch_size
        self.options = [list(letters[:len(q.options)]) for q in questions]
        self.ids = [tok(format_question(q), return_tensors="pt")["input_ids"][0] for q in questions]
        self.inputs = self._trunk_states() if self.k else self.ids

    @torch.no_grad()
    def _trunk_states(self) -> list[torch.Tensor]:
        """Per question, the hidden states entering the first learning block, [tokens, hidden]."""
        decoder, states = self.model.get_decoder(), []
        first = decoder.layers[-self.k]
        hook = first.register_forward_pre_hook(
            lambda module, args, kwargs: states.append((args[0] if args else kwargs["hidden_states"])[0].detach()),
            with_kwargs=True)
        try:
            for ids in self.ids:
                decoder(input_ids=ids[None].to(self.model.device))
        finally:
            hook.remove()
        return states

    def _last_logits(self, chunk: Sequence[int]) -> torch.Tensor:
        """The next-token logits after each prompt of `chunk`, [questions, vocabulary]."""
        rows = [self.inputs[i] for i in chunk]
        lengths = torch.tensor([len(r) for r in rows])
        # right padding: the causal mask keeps every real position's states those of the unpadded prompt
        padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(self.model.device)
        mask = (torch.arange(padded.shape[1])[None] < lengths[:, None]).long().to(self.model.device)
        decoder = self.model.get_decoder()
        if self.k:
            with _only_last_blocks(decoder, self.k):
                hidden = decoder(inputs_embeds=padded, attention_mask=mask).last_hidden_state
        else:
            hidden = decoder(input_ids=padded, attention_mask=mask).last_hidden_state
        last = (lengths - 1).to(hidden.device)
        return self.model.get_output_embeddings()(hidden[torch.arange(len(chunk), device=hidden.device), last])

    def log_opinions(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """The log of the LM's opinion on each question of `indices`: log-softmax of its next-token logits
        over the question's option letters; differentiable in the learning parameters."""
        out = []
        for start in range(0, len(indices), self.batch_size):
            chunk = list(indices[start:start + self.batch_size])
            logits = self._last_logits(chunk)
            out += [torch.log_softmax(row[self.options[i]].double(), -1) for row, i in zip(logits, chunk)]
        return out

    @torch.no_grad()
    def opinions(self) -> tuple[list[np.ndarray], float]:
        """The LM's opinion on every question and the mean share of its next token's probability on the
        option letters, as `align.lm_opinions` gives them."""
        opinions, mass = [], []
        for start in range(0, len(self.ids), self.batch_size):
            chunk = list(range(start, min(start + self.batch_size, len(self.ids))))
            o, m = letter_opinions(self._last_logits(chunk), [self.options[i] for i in chunk])
            opinions, mass = opinions + o, mass + m
        return opinions, float(np.mean(mass))

    def check(self, full: Sequence[np.ndarray]) -> None:
        """Refuse a policy whose learning blocks, run on the cached states, do not give `full`, the
        whole LM's opinions (`align.lm_opinions`) on the same questions."""
        worst = max(float(np.abs(a - b).max()) for a, b in zip(self.opinions()[0], full, strict=True))
        if worst > AGREEMENT:
            raise OpinionPolicyError(
                f"{type(self.model).__name__}: its last {self.k} blocks run on the cached hidden states give "
                f"opinions up to {worst:.2g} away from the whole LM's; train it with --trainer trl")


def train(policy: OpinionPolicy, reward: GroupReward, keys: Sequence[str], reference: Sequence[np.ndarray], *,
          steps: int, learning_rate: float, beta: float, generations: int, prompts_per_step: int, seed: int,
          on_step: Callable[[int], None] = lambda step: None) -> None:
    """`steps` GRPO steps on `policy` (see the module docstring); `keys` name its questions for `reward`,
    `reference` is π_ref on each. `on_step(step)` runs after each step (the aligner's measurements)."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1 - done / steps)
    ref = [torch.log(torch.as_tensor(np.clip(r, 1e-12, None), dtype=torch.float64)) for r in reference]
    rng = torch.Generator().manual_seed(seed)
    order: list[int] = []
    policy.model.train()
    for step in range(1, steps + 1):
        while len(order) < prompts_per_step:  # epochs over the questions, each in a fresh seeded order
            order += torch.randperm(len(keys), generator=rng).tolist()
        chosen, order = order[:prompts_per_step], order[prompts_per_step:]
        losses = []
        for i, logp in zip(chosen, policy.log_opinions(chosen)):
            # drawn on the CPU with the seeded generator, whatever the LM's device
            picks = torch.multinomial(logp.detach().exp().cpu(), generations, replacement=True, generator=rng)
            rewards, _ = reward.choice_rewards([keys[i]] * generations, picks.tolist())
            advantages = torch.as_tensor(rewards - rewards.mean(), device=logp.device)
            chosen_logp = logp[picks.to(logp.device)]
            ratio = torch.exp(chosen_logp - chosen_logp.detach())  # 1, with the gradient of log pi
            log_ratio = ref[i][picks].to(logp.device) - chosen_logp
            losses.append(ratio * (-advantages + beta * (log_ratio.exp() - log_ratio - 1)))
        loss = torch.cat(losses).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        on_step(step)
    policy.model.eval()
