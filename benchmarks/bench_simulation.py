"""Cost of the Flower simulation against the same client work done in one process; prints Markdown.

For each number of clients (groups), synthetic GlobalOpinionQA-format data with that many groups
(plus one held-out group) is trained for R rounds (a) in one Python process — per round, every
group's local steps from the global weights, then the weighted average, with the same episodes as
the ClientApp draws — and (b) with `pluralllm simulate` (Ray, one virtual SuperNode per group, two
client processes at a time on this 2-core machine). Reported: steady-state seconds per round
(rounds after the first, evaluation excluded), the start-up cost (the whole `flwr run` minus R
steady rounds), and the peak extra memory of the machine while it ran.

    .venv/bin/python benchmarks/bench_simulation.py [--clients 8 32 128] [--rounds 6]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pluralllm_flwr.config import RunConfig  # noqa: E402
from pluralllm_flwr.experiment import prepare_experiment  # noqa: E402
from pluralllm_flwr.results import load_results  # noqa: E402
from pluralllm_flwr.simulation import simulate  # noqa: E402
from tests.conftest import synthetic_goqa  # noqa: E402
from benchmarks.fedavg_in_process import mean_update  # noqa: E402


class PeakMemory:
    """Peak of (used memory − used memory at start) of the whole machine, sampled every 0.2 s."""

    def __enter__(self):
        self.start = psutil.virtual_memory().used
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, psutil.virtual_memory().used - self.start)
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def in_process_rounds(cfg: RunConfig, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of each round of the same client work without Flower (benchmarks/fedavg_in_process.py),
    and of the same rounds on two ideal workers that take the groups' trainings in turn, as the
    simulation's two client processes do: a synchronous round waits for the later one to finish."""
    exp = prepare_experiment(cfg, progress=False)
    state = exp.build_model().state_dict()
    times, two_workers = [], []
    for server_round in range(1, rounds + 1):
        start, clients = time.perf_counter(), []
        update, _ = mean_update(exp, state, server_round, client_seconds=clients)  # FedAvg: add the mean update
        state = {k: state[k] + update[k] for k in state}
        times.append(time.perf_counter() - start)
        free = [0.0, 0.0]  # when each worker is next free
        for seconds in clients:
            free[free.index(min(free))] += seconds
        two_workers.append(max(free))
    return times, two_workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--questions", type=int, default=150)
    parser.add_argument("--model", default="gpo", help="predictor (the README's figures: gpo on raw vectors)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-sim-"))
    rows = []
    for n in args.clients:
        groups = [f"G{i:03d}" for i in range(n + 1)]
        data = synthetic_goqa(scratch / f"goqa{n}.csv", groups, n_questions=args.questions)
        cfg = RunConfig(data_path=str(data), train_groups=",".join(groups[:-1]), eval_groups=groups[-1],
                        cache_dir=str(scratch / "cache"), num_server_rounds=args.rounds, eval_every=args.rounds,
                        eval_draws=1, out_dir=str(scratch / f"run{n}"), model=args.model,
                        features="raw" if args.model == "gpo" else RunConfig.features)
        prepare_experiment(cfg, progress=False)  # embed once, outside both timings
        with PeakMemory() as base_mem:
            base, _ = in_process_rounds(cfg, args.rounds)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as each virtual client runs; the simulation runs two of them at once
        single, packed = in_process_rounds(cfg, args.rounds)
        torch.set_num_threads(threads)
        start = time.perf_counter()
        with PeakMemory() as sim_mem:
            simulate(cfg, n, echo=lambda line: None)
        wall = time.perf_counter() - start
        history = load_results(cfg.out_dir)["history"]
        # Round 0 is evaluated after the nodes answered the host query (Ray actors are up by then), so
        # rounds 1..R between the two evaluation points are steady state (plus one tiny evaluation).
        per_round_sim = (history[-1]["wall_seconds"] - history[0]["wall_seconds"]) / args.rounds
        steady_base, steady_single, steady_packed = (float(np.median(t[1:])) for t in (base, single, packed))
        rows.append((n, steady_base, steady_single, steady_packed, per_round_sim, wall, wall - args.rounds * per_round_sim,
                     base_mem.peak / 2**30, sim_mem.peak / 2**30))
        print(f"{n} clients done: in-process {steady_base:.2f} s/round ({steady_single:.2f} with 1 thread), "
              f"simulation {per_round_sim:.2f} s/round",
              file=sys.stderr, flush=True)
    print(f"\n{args.rounds} rounds, {args.questions} questions per group, 6 local steps, MiniLM (384-d), "
          f"torch {torch.__version__}, {psutil.cpu_count()} CPUs. 'Ideal' = the 1-thread in-process time / 2: "
          "the two 1-thread client processes of the simulation with no overhead at all; 'two workers' = the "
          "same groups' 1-thread trainings taken in turn by two workers, so a round also waits for the later "
          "one (what a synchronous round costs without Flower).\n")
    print("| clients | in-process s/round (torch threads) | in-process s/round (1 thread) | two workers s/round | "
          "simulation s/round | simulation vs ideal | simulation vs two workers | `flwr run` wall s | "
          "start-up + teardown s | peak extra RAM in-process | peak extra RAM simulation |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, base, single, packed, sim, wall, startup, mem_base, mem_sim in rows:
        print(f"| {n} | {base:.2f} | {single:.2f} | {packed:.2f} | {sim:.2f} | {100 * (sim / (single / 2) - 1):+.0f}% | "
              f"{100 * (sim / packed - 1):+.0f}% | {wall:.1f} | {startup:.1f} | {mem_base:.2f} GiB | {mem_sim:.2f} GiB |")
    shutil.rmtree(scratch)  # its data, caches and runs


if __name__ == "__main__":
    main()
