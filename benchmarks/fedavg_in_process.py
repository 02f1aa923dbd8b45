"""Federated training without Flower: the ClientApp's local training and the strategy's server step in
one process, for fast probes of what makes a federation learn each group (docs/conditioning.md).

Each round every training group trains from the global weights exactly as its ClientApp would (the same
episode streams, `ClientOptimizer`, lr schedule, FedProx term and same-questions sampler); the server
then takes the weighted mean of the groups' updates and steps as run-config `strategy` says: `fedavg`
and `fedprox` add it, `fedavgm` (momentum 0) adds server-lr times it, `fedadam` takes Flower's FedAdam
step on it (beta_1 0.9, beta_2 0.99, server-tau). `--pooled` instead trains one client that holds every
training group, the same episodes per round, to separate "one group per client" from the rest. Every
`--eval-every` rounds it prints the held-out alignment, the conditioning gain and alignment with 5 and
50 context questions (3 draws). A Flower simulation gives the same training, plus Flower's cost per
message; this is for comparing settings, not for timing.

The settings start from FedAvg's (12 local Adam steps of 4 episodes each: FEDAVG_FEDERATION) and -c
changes them; docs/conditioning.md spells out the demo's federation as such a -c.

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
from pluralllm_flwr.config import FEDAVG_FEDERATION, RunConfig, parse_overrides  # noqa: E402
from pluralllm_flwr.data import seeded_rng  # noqa: E402
from pluralllm_flwr.experiment import Experiment, prepare_experiment  # noqa: E402
from pluralllm_flwr.training import ClientOptimizer, lr_factor, train_steps  # noqa: E402

IN_PROCESS = ("fedavg", "fedprox", "fedavgm", "fedadam")


def mean_update(exp: Experiment, global_state: dict, server_round: int, *, pooled: bool = False
                ) -> tuple[dict, list[float]]:
    """Every training group's local training from the global weights, as its ClientApp does it: the
    weighted mean of their updates and their step losses. `pooled`: one client holding every training
    group instead (the episodes are the same in kind, drawn from one stream)."""
    cfg = exp.cfg
    model = exp.build_model()
    groups = exp.split.train
    sizes = np.array([exp.vectors(g, "train").num_questions for g in groups], np.float64)
    weights = sizes / sizes.sum() if cfg.weighting == "num-examples" else np.full(len(groups), 1 / len(groups))
    clients = [(1.0, groups, "pooled")] if pooled else [(w, [g], g) for w, g in zip(weights, groups)]
    update = {k: torch.zeros_like(v) for k, v in global_state.items()}
    losses: list[float] = []
    for weight, members, stream in clients:
        losses += local_training(exp, model, global_state, members, stream, server_round)
        for key, value in model.state_dict().items():
            update[key] += weight * (value - global_state[key])
    return update, losses


def local_training(exp: Experiment, model: torch.nn.Module, global_state: dict, members: list[str], stream: str,
                   server_round: int) -> list[float]:
    """One client's round, as its ClientApp trains it (at the round's lr of the schedule, with the same
    episode stream, FedProx term and same-questions sampler): `model` ends with the client's weights;
    returns its step losses."""
    cfg = exp.cfg
    lr = cfg.lr * lr_factor(server_round - 1, cfg.num_server_rounds, cfg.lr_schedule, cfg.warmup_steps)
    mu = cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0
    model.load_state_dict(global_state)
    shared = seeded_rng(cfg.seed, "questions", server_round) if cfg.episode_sampler == "same-questions" else None
    anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
    return train_steps(model, ClientOptimizer(model.parameters(), cfg.client_optimizer, lr),
                       [exp.vectors(g, "train") for g in members], cfg.local_steps, exp.sizes,
                       seeded_rng(cfg.seed, "train", stream, server_round), "cpu",
                       proximal_mu=mu, anchor=anchor, same_questions=shared, episodes_per_step=cfg.episodes_per_step)


class Server:
    """The strategy's step on the mean update, for the strategies that need no per-client state:
    FedAvg/FedProx (add it), FedAvgM with momentum 0 (add server-lr times it) and Flower's FedAdam rule
    (flwr.serverapp.strategy.FedAdam.aggregate_train, its eta scaled by the lr schedule as PluralMixin does)."""

    def __init__(self, cfg: RunConfig) -> None:
        if cfg.strategy not in IN_PROCESS or (cfg.strategy == "fedavgm" and cfg.server_momentum):
            raise SystemExit(f"in process: strategy must be one of {IN_PROCESS} (fedavgm without momentum), "
                             f"got {cfg.strategy!r}")
        self.cfg, self.m, self.v = cfg, {}, {}

    def step(self, state: dict, update: dict, server_round: int) -> dict:
        c = self.cfg
        if c.strategy != "fedadam":
            scale = c.server_lr if c.strategy == "fedavgm" else 1.0
            return {k: state[k] + scale * update[k] for k in state}
        beta_1, beta_2 = 0.9, 0.99
        eta = c.server_lr * lr_factor(server_round - 1, c.num_server_rounds, c.lr_schedule, c.warmup_steps)
        eta_norm = eta * np.sqrt(1 - beta_2 ** (server_round + 1.0)) / (1 - beta_1 ** (server_round + 1.0))
        out = {}
        for k, x in state.items():
            self.m[k] = beta_1 * self.m.get(k, 0) + (1 - beta_1) * update[k]
            self.v[k] = beta_2 * self.v.get(k, 0) + (1 - beta_2) * update[k] ** 2
            out[k] = x + eta_norm * self.m[k] / (self.v[k].sqrt() + c.server_tau)
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="OpinionQA's human_resp folder")
    p.add_argument("--rounds", type=int, default=100, help="rounds (the lr schedule spans them)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--pooled", action="store_true", help="one client holding every training group (a diagnostic)")
    p.add_argument("--run-config", "-c", default="", help="run-config overrides (strategy, client optimiser, lr, "
                   "local steps...) on FEDAVG_FEDERATION")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: as one virtual client)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    federation = {k: v for k, v in FEDAVG_FEDERATION.items() if k != "eval-every"}  # --eval-every here
    cfg = RunConfig.from_mapping({"dataset": "opinionqa", "data-path": str(Path(args.data).resolve()),
                                  "num-server-rounds": args.rounds, **federation, "eval-draws": 3,
                                  "eval-context-sizes": "5,50", **parse_overrides([args.run_config])})
    server = Server(cfg)
    exp = prepare_experiment(cfg, progress=True)
    state = exp.build_model().state_dict()
    started = time.perf_counter()
    print("| round | seconds | train loss | alignment | conditioning gain | 5 context | 50 context |\n|---|---|---|---|---|---|---|")
    for server_round in range(1, args.rounds + 1):
        update, losses = mean_update(exp, state, server_round, pooled=args.pooled)
        state = server.step(state, update, server_round)
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
