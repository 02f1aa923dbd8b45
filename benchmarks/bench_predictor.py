"""Time the GPO predictor on CPU against a reference-style implementation; prints Markdown tables.

A realistic training batch (8 groups, ~90 context and ~90 target questions of 2-7 options, 4096-d
inputs) goes through (a) our model, (c) our model with the built-in full-attention encoder, and
(b) the way the authors' code computes it: context and targets padded separately, full attention
with masks, softmax and loss in Python loops per question. All three share weights and episodes,
so their losses must agree. Then one group's evaluation (20 context, 300 targets) in one pass vs one
question at a time. Work is counted with torch's FlopCounterMode and compared with the measured
dense-matmul rate of this CPU.

    .venv/bin/python benchmarks/bench_predictor.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, register_flop_formula,
                                      sdpa_backward_flop_count, sdpa_flop_count)

from pluralllm_flwr.data import GroupVectors
from pluralllm_flwr.gpo import GPOPredictor
from pluralllm_flwr.model import ModelConfig
from pluralllm_flwr.training import Batch, EpisodeSizes, batch_loss, collate, predict, train_steps

DIM = 4096


def synthetic_group(name: str, n_questions: int, rng: np.random.Generator) -> GroupVectors:
    sizes = rng.integers(2, 8, n_questions)
    y = np.concatenate([rng.dirichlet(np.ones(n)) for n in sizes]).astype(np.float32)
    x = rng.standard_normal((sizes.sum(), DIM), dtype=np.float32)
    return GroupVectors(name, [f"{name}/q{i}" for i in range(n_questions)], x, y,
                        np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in round-robin so that other work on a shared machine
    slows every variant alike (each runs once first as a warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def count_cpu_attention() -> None:
    """FlopCounterMode knows the GPU attention kernels but not the CPU one that
    F.scaled_dot_product_attention runs here, so it would count attention as free; use torch's
    own attention formulas for it."""
    aten = torch.ops.aten
    forward = aten._scaled_dot_product_flash_attention_for_cpu
    backward = aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward not in flop_registry:
        register_flop_formula(forward)(lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v))
    if backward not in flop_registry:
        register_flop_formula(backward)(
            lambda g, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(g, q, k, v))


def gflop(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


class BuiltinEncoder(nn.Module):
    """nn.TransformerEncoder over all T keys, non-context keys masked out (what the built-in allows);
    the same interface as our `ContextEncoder`."""

    def __init__(self, model: GPOPredictor) -> None:
        super().__init__()
        c = model.config
        layer = nn.TransformerEncoderLayer(c.d_model, c.num_heads, c.dim_feedforward, c.dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
        self.encoder.load_state_dict(model.encoder.state_dict())

    def forward(self, h: Tensor, is_context: Tensor, is_target: Tensor) -> Tensor:
        return self.encoder(h, src_key_padding_mask=~is_context)[is_target]


def reference_loss(model: GPOPredictor, encoder: nn.TransformerEncoder, episodes: list, device: str) -> Tensor:
    """The authors' computation: [x ; y] concatenated, context and targets padded separately, one
    T x T mask, softmax per question in Python, loss masked item by item (reduced as ours: the mean
    over real target tokens, so the numbers can be compared)."""
    pad = nn.utils.rnn.pad_sequence
    xc = pad([torch.from_numpy(c.x) for c, _ in episodes], batch_first=True)
    yc = pad([torch.from_numpy(c.y) for c, _ in episodes], batch_first=True)
    xt = pad([torch.from_numpy(t.x) for _, t in episodes], batch_first=True)
    yt = pad([torch.from_numpy(t.y) for _, t in episodes], batch_first=True)
    xc, yc, xt, yt = xc.to(device), yc.to(device), xt.to(device), yt.to(device)
    n_ctx, n_all = xc.shape[1], xc.shape[1] + xt.shape[1]
    tokens = torch.cat([torch.cat([xc, yc[..., None]], -1), torch.cat([xt, torch.zeros_like(yt)[..., None]], -1)], 1)
    blocked = torch.ones(n_all, n_all, dtype=torch.bool, device=device)
    blocked[:, :n_ctx] = False
    padding = torch.cat([xc.abs().sum(-1) == 0, xt.abs().sum(-1) == 0], 1)
    out = model.predictor(encoder(model.embedder(tokens), mask=blocked, src_key_padding_mask=padding)[:, n_ctx:])
    logits, std = out[..., 0], out[..., 1].exp()
    mean = torch.zeros_like(logits)
    for b, (_, targets) in enumerate(episodes):
        for start, end in zip(targets.offsets[:-1], targets.offsets[1:]):
            mean[b, start:end] = torch.softmax(logits[b, start:end], dim=0)
    log_prob = torch.distributions.Normal(mean, std).log_prob(yt)
    masked = torch.zeros_like(log_prob)
    for b, (_, targets) in enumerate(episodes):
        masked[b, :len(targets.y)] = log_prob[b, :len(targets.y)]
    return -masked.sum() / sum(len(t.y) for _, t in episodes)


def step_fn(loss_fn: Callable[[], Tensor], optimizer: torch.optim.Optimizer) -> Callable[[], float]:
    def step() -> float:
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); on a "
                        "contended machine 1 thread avoids OpenMP threads waiting on each other")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    count_cpu_attention()
    rng = np.random.default_rng(0)
    torch.manual_seed(0)

    groups = [synthetic_group(f"g{i}", 200, rng) for i in range(8)]
    episodes = []
    for g in groups:
        n_ctx, n_tgt = (int(n) for n in rng.integers(85, 96, 2))
        episodes.append((g.subset(range(n_ctx)), g.subset(range(n_ctx, n_ctx + n_tgt))))
    batch: Batch = collate(episodes).to(device)
    tokens = [(len(c.y), len(t.y)) for c, t in episodes]

    model = GPOPredictor(ModelConfig(input_dim=DIM)).to(device)
    builtin = copy.deepcopy(model)
    builtin.encoder = BuiltinEncoder(model).to(device)
    reference = copy.deepcopy(model)
    reference_encoder = BuiltinEncoder(model).encoder.to(device)

    variants = {
        "(a) ours: context-only keys, vectorised softmax/loss": (model, lambda: batch_loss(model, batch)),
        "(c) ours with built-in encoder (all keys, masked)": (builtin, lambda: batch_loss(builtin, batch)),
        "(b) reference-style: padded ctx+tgt, full attention, Python loops":
            (reference, lambda: reference_loss(reference, reference_encoder, episodes, device)),
    }
    losses = {name: loss().item() for name, (_, loss) in variants.items()}
    steps = {name: step_fn(loss, torch.optim.Adam(net.parameters(), lr=0.0))  # lr 0: the weights stay put
             for name, (net, loss) in variants.items()}
    work = {name: gflop(step) for name, step in steps.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    sizes = EpisodeSizes(85, 95, 85, 95)
    full = "(a) plus episode sampling and collate (`train_steps`, steps=1)"
    steps[full] = lambda: train_steps(model, optimizer, groups, 1, sizes, np.random.default_rng(1), device)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    steps["matmul"] = lambda: a @ b
    times = interleaved_medians(steps, args.repeats)
    rate = 2 * n ** 3 / times.pop("matmul") / 1e9

    print(f"## Training step: 8 groups, context/target option tokens per group {tokens}, {DIM}-d inputs\n")
    print(f"Dense fp32 matmul ({n}², timed between the steps): **{rate:.0f} GFLOP/s**; "
          f"torch threads: {torch.get_num_threads()}; device: {device}; medians of {args.repeats} interleaved rounds.\n")
    print("| variant | s/step | GFLOP (fwd+bwd) | GFLOP/s | floor s = GFLOP / matmul rate | floor / time |")
    print("|---|---|---|---|---|---|")
    for name, seconds in times.items():
        if name in work:
            print(f"| {name} | {seconds:.3f} | {work[name]:.1f} | {work[name] / seconds:.0f} | "
                  f"{work[name] / rate:.3f} | {work[name] / rate / seconds:.0%} |")
        else:
            print(f"| {name} | {seconds:.3f} | | | | |")
    ours, builtin_name, loop = variants
    print(f"\nSpeed-up of (a) over (b): **{times[loop] / times[ours]:.2f}x** (target >= 2.5x); "
          f"of (a) over (c), i.e. what restricting keys to the context saves: {times[builtin_name] / times[ours]:.2f}x.")
    print("Losses on the same batch and weights: " + ", ".join(f"{name.split()[0]} {v:.6f}" for name, v in losses.items())
          + f"; max |difference| {max(abs(v - losses[ours]) for v in losses.values()):.2e}.\n")

    eval_group = synthetic_group("eval", 320, rng)
    context, targets = eval_group.subset(range(20)), eval_group.subset(range(20, 320))
    methods = {
        "one forward pass for all targets": lambda: predict(model, context, targets, device),
        "one question at a time": lambda: [predict(model, context, targets.subset([i]), device)[0]
                                           for i in range(targets.num_questions)],
    }
    predictions = {name: fn() for name, fn in methods.items()}
    diff = max(float(np.abs(p - q).max()) for p, q in zip(*predictions.values()))
    times = interleaved_medians(methods, max(1, args.repeats // 2))
    print(f"## Evaluation of one group: 20 context questions, 300 targets ({len(targets.y)} option tokens)\n")
    print(f"| method | seconds (median of {max(1, args.repeats // 2)} interleaved rounds) |")
    print("|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.3f} |")
    one, each = times.values()
    print(f"\nSpeed-up: **{each / one:.1f}x** (target >= 10x); max |difference| of the predictions: {diff:.2e}.")


if __name__ == "__main__":
    main()
