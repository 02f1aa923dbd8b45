"""Cost of the Flower simulation against the same client work done without Flower; prints Markdown.

For each number of clients (groups), synthetic GlobalOpinionQA-format data with that many groups
(plus one held-out group) is trained for R rounds (a) in one Python process — per round, every
group's local steps from the global weights, then the weighted average, with the same episodes as
the ClientApp draws — with torch's threads and with one, (b) on two 1-thread worker processes at
once, and (c) with `pluralllm simulate` (Ray, one virtual SuperNode per group, two client processes
at a time on this 2-core machine). Reported: steady-state seconds per round (the median of rounds
2..R, evaluation excluded), Flower's start-up and teardown (the whole `flwr run` less its training
and evaluation), and the peak extra memory of the machine while it ran. With --repeats N the whole
measurement runs N times per number of clients: the table gives the medians and every repeat's
simulation / ideal, whose run-to-run spread (a few percent here) is as large as the changes it judges.

    .venv/bin/python benchmarks/bench_simulation.py [--clients 8 32 128] [--rounds 6] [--repeats 1]
"""
from __future__ import annotations

import argparse
import multiprocessing
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
from benchmarks.fedavg_in_process import local_training, mean_update  # noqa: E402


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


def in_process_rounds(cfg: RunConfig, rounds: int) -> list[float]:
    """Seconds of each round of the same client work without Flower (benchmarks/fedavg_in_process.py)."""
    exp = prepare_experiment(cfg, progress=False)
    state = exp.build_model().state_dict()
    times = []
    for server_round in range(1, rounds + 1):
        start = time.perf_counter()
        update, _ = mean_update(exp, state, server_round)  # FedAvg: add the mean update
        state = {k: state[k] + update[k] for k in state}
        times.append(time.perf_counter() - start)
    return times


_worker: tuple = ()  # a two-process worker's (experiment, model, initial weights)
_barrier = None


def _start_worker(cfg: RunConfig, barrier) -> None:
    global _worker, _barrier
    torch.set_num_threads(1)  # as each virtual client runs
    exp = prepare_experiment(cfg, progress=False)
    model = exp.build_model()
    _worker = (exp, model, {k: v.clone() for k, v in model.state_dict().items()})
    _barrier = barrier


def _ready(_) -> None:
    _barrier.wait()  # blocks this worker until the other one is set up too


def _train_one(job: tuple[str, int]) -> None:
    exp, model, state = _worker
    group, server_round = job
    local_training(exp, model, state, [group], group, server_round)


def two_process_rounds(cfg: RunConfig, rounds: int) -> list[float]:
    """Seconds of each round of the same groups' trainings on two 1-thread worker processes at once,
    handed out one group at a time as the simulation's actor pool does, without Flower: what two
    processes sharing this machine cost by themselves. (Each worker trains from the initial weights
    every round; a step's cost does not depend on the weights' values.)"""
    groups = prepare_experiment(cfg, progress=False).split.train
    times = []
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(2, initializer=_start_worker, initargs=(cfg, spawn.Barrier(2))) as pool:
        pool.map(_ready, [0, 1], chunksize=1)  # both workers are set up before the first round
        for server_round in range(1, rounds + 1):
            start = time.perf_counter()
            pool.map(_train_one, [(g, server_round) for g in groups], chunksize=1)
            times.append(time.perf_counter() - start)
    return times


def measure(cfg: RunConfig, n: int, rounds: int) -> dict:
    """One repeat: the in-process rounds (torch's threads, then one), two processes, then the simulation."""
    with PeakMemory() as base_mem:
        base = in_process_rounds(cfg, rounds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each virtual client runs; the simulation runs two of them at once
    single = in_process_rounds(cfg, rounds)
    torch.set_num_threads(threads)
    two = two_process_rounds(cfg, rounds)
    start = time.perf_counter()
    with PeakMemory() as sim_mem:
        simulate(cfg, n, echo=lambda line: None)
    wall = time.perf_counter() - start
    history = load_results(cfg.out_dir)["history"]
    sim = np.diff([h["train_seconds"] for h in history])  # rounds 1..R, each from the end of the last
    # Round 1 pays each process's first-call set-up (model, first torch calls) on both sides: left out.
    return {**{k: float(np.median(t[1:])) for k, t in (("base", base), ("single", single), ("two", two), ("sim", sim))},
            "wall": wall, "startup": wall - history[-1]["wall_seconds"],
            "mem_base": base_mem.peak / 2**30, "mem_sim": sim_mem.peak / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--questions", type=int, default=150)
    parser.add_argument("--model", default="gpo", help="predictor (the README's figures: gpo on raw vectors)")
    parser.add_argument("--repeats", type=int, default=1, help="whole measurements per number of clients; the "
                        "table gives their medians and every repeat's simulation / ideal")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-sim-"))
    rows = []
    for n in args.clients:
        groups = [f"G{i:03d}" for i in range(n + 1)]
        data = synthetic_goqa(scratch / f"goqa{n}.csv", groups, n_questions=args.questions)
        # Every round is evaluated (on the server; heldback-fraction 0: no client evaluation messages), so
        # the history times each round, and train_seconds leaves the server's evaluations, and the checkpoint
        # each one writes, out: neither side of the comparison evaluates or saves.
        cfg = RunConfig(data_path=str(data), train_groups=",".join(groups[:-1]), eval_groups=groups[-1],
                        cache_dir=str(scratch / "cache"), num_server_rounds=args.rounds, eval_every=1,
                        heldback_fraction=0.0, eval_draws=1, out_dir=str(scratch / f"run{n}"), model=args.model,
                        features="raw" if args.model == "gpo" else RunConfig.features)
        prepare_experiment(cfg, progress=False)  # embed once, outside every timing
        repeats = [measure(cfg.replace(out_dir=str(scratch / f"run{n}-{r}")), n, args.rounds) for r in range(args.repeats)]
        row = {"clients": n, **{k: float(np.median([m[k] for m in repeats])) for k in repeats[0]},
               "ratios": [m["sim"] / (m["single"] / 2) for m in repeats]}
        rows.append(row)
        print(f"{n} clients done: in-process {row['base']:.2f} s/round ({row['single']:.2f} with 1 thread), two "
              f"processes {row['two']:.2f}, simulation {row['sim']:.2f} s/round", file=sys.stderr, flush=True)
    print(f"\n{args.rounds} rounds (medians of rounds 2..{args.rounds}), {args.questions} questions per group, 6 local "
          f"steps, MiniLM (384-d), torch {torch.__version__}, {psutil.cpu_count()} CPUs. 'Ideal' = the 1-thread "
          "in-process round / 2: the simulation's two 1-thread client processes with no cost beyond training. "
          "'Two processes' = the same trainings on two 1-thread worker processes at once, handed out one group at "
          "a time, without Flower: what sharing this machine costs by itself. A simulated message's cost against "
          "the same training in one 1-thread process is 'simulation / ideal' = 'two processes / ideal' (the "
          "machine) × 'simulation / two processes' (Flower)."
          + (f" Medians of {args.repeats} repeats; 'simulation / ideal' is the median of the repeats' ratios."
             if args.repeats > 1 else "") + "\n")
    print("| clients | in-process s/round (torch threads) | in-process s/round (1 thread) | ideal s/round | "
          "two processes s/round | simulation s/round | simulation / ideal | each repeat | two processes / ideal | "
          "simulation / two processes | `flwr run` wall s | start-up + teardown s | peak extra RAM in-process | "
          "peak extra RAM simulation |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ideal = r["single"] / 2
        print(f"| {r['clients']} | {r['base']:.2f} | {r['single']:.2f} | {ideal:.2f} | {r['two']:.2f} | {r['sim']:.2f} | "
              f"{np.median(r['ratios']):.2f}× | {', '.join(f'{x:.2f}' for x in r['ratios'])} | "
              f"{r['two'] / ideal:.2f}× | {r['sim'] / r['two']:.2f}× | {r['wall']:.1f} | "
              f"{r['startup']:.1f} | {r['mem_base']:.2f} GiB | {r['mem_sim']:.2f} GiB |")
    shutil.rmtree(scratch)  # its data, caches and runs


if __name__ == "__main__":
    main()
