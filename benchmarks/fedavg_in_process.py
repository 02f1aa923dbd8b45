"""FedAvg without Flower: the ClientApp's local training and the strategy's weighted average in one
process, for fast probes of what makes a federation learn each group (docs/conditioning.md).

Each round every training group trains from the global weights exactly as its ClientApp would (the same
episode streams, `ClientOptimizer`, lr schedule, FedProx term and same-questions sampler), and the
global model moves by `--server-lr` times the weighted mean of the groups' updates (1 = FedAvg). Every
`--eval-every` rounds it prints the held-out alignment, the conditioning gain and alignment with 5 and
50 context questions (3 draws). A Flower simulation gives the same training, plus Flower's cost per
message; this is for comparing settings, not for timing.

    python benchmarks/fedavg_in_process.py --data ../shared/data/opinionqa/human_resp --rounds 100 \\
        -c "episode-sampler='same-questions'"
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pluralllm_flwr.config import DEMO_FEDERATION, RunConfig, parse_overrides  # noqa: E402
from pluralllm_flwr.data import seeded_rng  # noqa: E402
from pluralllm_flwr.experiment import Experiment, prepare_experiment  # noqa: E402
from pluralllm_flwr.training import ClientOptimizer, lr_factor, train_steps  # noqa: E402


def fedavg_round(exp: Experiment, global_state: dict, server_round: int, *, server_lr: float = 1.0,
                 proximal_mu: float = 0.0, client_seconds: list[float] | None = None) -> tuple[dict, list[float]]:
    """One FedAvg round of every training group, as the ClientApps and the strategy do it: the new
    global weights and the groups' step losses; each group's training seconds go to `client_seconds`."""
    cfg = exp.cfg
    model = exp.build_model()
    lr = cfg.lr * lr_factor(server_round - 1, cfg.num_server_rounds, cfg.lr_schedule, cfg.warmup_steps)
    groups = exp.split.train
    sizes = np.array([exp.vectors(g, "train").num_questions for g in groups], np.float64)
    weights = sizes / sizes.sum() if cfg.weighting == "num-examples" else np.full(len(groups), 1 / len(groups))
    update = {k: torch.zeros_like(v) for k, v in global_state.items()}
    losses: list[float] = []
    for weight, group in zip(weights, groups):
        started = time.perf_counter()
        model.load_state_dict(global_state)
        shared = seeded_rng(cfg.seed, "questions", server_round) if cfg.episode_sampler == "same-questions" else None
        anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
        losses += train_steps(model, ClientOptimizer(model.parameters(), cfg.client_optimizer, lr),
                              [exp.vectors(group, "train")], cfg.local_steps, exp.sizes,
                              seeded_rng(cfg.seed, "train", group, server_round), "cpu",
                              proximal_mu=proximal_mu, anchor=anchor, same_questions=shared,
                              episodes_per_step=cfg.episodes_per_step)
        if client_seconds is not None:
            client_seconds.append(time.perf_counter() - started)
        for key, value in model.state_dict().items():
            update[key] += weight * (value - global_state[key])
    return {k: global_state[k] + server_lr * update[k] for k in global_state}, losses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="OpinionQA's human_resp folder")
    p.add_argument("--rounds", type=int, default=100, help="rounds (the lr schedule spans them)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--server-lr", type=float, default=1.0, help="step on the mean update (1 = FedAvg)")
    p.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx's mu (0 = FedAvg)")
    p.add_argument("--run-config", "-c", default="", help="run-config overrides (client optimiser, lr, local steps...)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: as one virtual client)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    federation = {k: v for k, v in DEMO_FEDERATION.items() if k != "eval-every"}
    cfg = RunConfig.from_mapping({"dataset": "opinionqa", "data-path": str(Path(args.data).resolve()),
                                  "num-server-rounds": args.rounds, **federation, "eval-draws": 3,
                                  "eval-context-sizes": "5,50", **parse_overrides([args.run_config])})
    exp = prepare_experiment(cfg, progress=True)
    state = exp.build_model().state_dict()
    started = time.perf_counter()
    print("| round | seconds | train loss | alignment | conditioning gain | 5 context | 50 context |\n|---|---|---|---|---|---|---|")
    for server_round in range(1, args.rounds + 1):
        state, losses = fedavg_round(exp, state, server_round, server_lr=args.server_lr, proximal_mu=args.proximal_mu)
        if server_round % args.eval_every == 0 or server_round == args.rounds:
            model = exp.build_model()
            model.load_state_dict(state)
            e = exp.evaluate(model, "cpu")
            curve = e["context_curve"]
            print(f"| {server_round} | {time.perf_counter() - started:.0f} | {np.mean(losses):.4f} | {e['alignment']:.4f} | "
                  f"{e['conditioning_gain']:+.4f} | {curve['5']:.4f} | {curve['50']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
