"""Seconds per federated round with Flower's real processes, and where they go; prints Markdown.

Runs `deploy_local` (a SuperLink and one SuperNode per group on 127.0.0.1, TLS on) with 3 groups for
R rounds, held-out evaluation at round R only, so rounds 2..R-1 are steady: one train message per
node. Then the same run as a simulation (3 virtual SuperNodes, Ray), and the same client work in
one process with one thread (the floor: no Flower at all).

Where a deployed round goes comes from the `flwr-clientapp` processes (one per message) seen by a
10 Hz process sampler (start, exit, CPU seconds), and from the line each deployed ClientApp logs per
message (client_app._log_stages: process start to message, set-up, training). A round is timed
from its first process's start to the next round's. The simulation's rounds are timed by the
arrival of its streamed `[ROUND k/R]` log lines (Flower streams logs every 0.5 s).

    .venv/bin/python benchmarks/bench_deployment.py [--data /abs/human_resp] [--rounds 10]

Without --data it runs on synthetic GlobalOpinionQA-format data (tests/conftest.py); with it, on
OpinionQA (--questions of them, as in issue 15's measurements).
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_simulation import in_process_rounds  # noqa: E402
from pluralllm_flwr.config import RunConfig  # noqa: E402
from pluralllm_flwr.deploy import deploy_local  # noqa: E402
from pluralllm_flwr.experiment import prepare_experiment  # noqa: E402
from pluralllm_flwr.simulation import simulate  # noqa: E402
from tests.conftest import synthetic_goqa  # noqa: E402

GROUPS = 3
ROUND_LINE = re.compile(r"\[ROUND (\d+)/\d+\]")
STAGE_LINE = re.compile(r"\[pluralllm\] train .* \(pid (\d+)\): ([\d.]+) s from process start, ([\d.]+) s set-up, "
                        r"([\d.]+) s train")


class ProcessSampler:
    """Every `flwr-clientapp` process while it runs: pid -> [start, last seen, CPU seconds]."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.seen, self.running = interval, {}, True
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
                try:
                    if not any("flwr-clientapp" in part for part in p.info["cmdline"] or ()):
                        continue
                    cpu = sum(p.cpu_times()[:2])
                except (psutil.Error, OSError):
                    continue
                entry = self.seen.setdefault(p.info["pid"], [p.info["create_time"], 0.0, 0.0])
                entry[1:] = [time.time(), cpu]
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def round_starts(stamped: list[tuple[float, str]]) -> dict[int, float]:
    starts = {}
    for t, line in stamped:
        if m := ROUND_LINE.search(line):
            starts.setdefault(int(m.group(1)), t)
    return starts


def configure(args, scratch: Path) -> RunConfig:
    common = dict(num_server_rounds=args.rounds, eval_every=args.rounds, eval_draws=1, cache_dir=str(scratch / "cache"))
    if args.data:
        return RunConfig(dataset="opinionqa", data_path=args.data, max_questions=args.questions, **common)
    groups = [f"G{i}" for i in range(GROUPS + 1)]
    data = synthetic_goqa(scratch / "goqa.csv", groups, n_questions=args.questions)
    return RunConfig(data_path=str(data), train_groups=",".join(groups[:-1]), eval_groups=groups[-1], **common)


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="OpinionQA human_resp folder (absolute); default: synthetic data")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--questions", type=int, default=60)
    args = parser.parse_args()
    if args.rounds < 4:
        parser.error("--rounds must be at least 4: rounds 2..R-1 are the steady ones")
    scratch = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    try:
        bench(args, scratch)
    except BaseException:
        print(f"bench_deployment: its data, runs and logs are kept in {scratch}", file=sys.stderr)
        raise
    shutil.rmtree(scratch)


def bench(args: argparse.Namespace, scratch: Path) -> None:
    cfg = configure(args, scratch)
    prepare_experiment(cfg, progress=False)  # embed once, outside every timing
    steady = range(2, args.rounds)

    deployed = cfg.replace(out_dir=str(scratch / "deploy"))
    with ProcessSampler() as sampler:
        deploy_local(deployed, GROUPS, echo=lambda line: None, progress=False)
    logs = Path(deployed.out_dir, "deploy-logs").glob("node-*.log")
    stages = {int(m[1]): tuple(map(float, m.groups()[1:]))  # pid -> (to the message, set-up, training)
              for log in logs for m in STAGE_LINE.finditer(log.read_text(errors="replace"))}
    # one process per message, in order: the host query, rounds 1..R (train), the evaluation of round R
    procs = sorted((start, pid, end, cpu) for pid, (start, end, cpu) in sampler.seen.items())
    if len(procs) != GROUPS * (args.rounds + 2):
        raise SystemExit(f"saw {len(procs)} flwr-clientapp processes, expected {GROUPS * (args.rounds + 2)}: a message "
                         f"failed or the sampler missed one; see {deployed.out_dir}/deploy-logs")
    rounds = {k: procs[GROUPS * k:GROUPS * (k + 1)] for k in range(args.rounds + 2)}
    done = {pid: start + sum(stages[pid]) for k in steady for start, pid, _, _ in rounds[k]}  # handler returned
    walls = [rounds[k + 1][0][0] - rounds[k][0][0] for k in steady]  # first process start to the next one
    between = [rounds[k + 1][0][0] - max(done[pid] for _, pid, _, _ in rounds[k]) for k in steady]
    spread = [start - rounds[k][0][0] for k in steady for start, *_ in rounds[k]]
    mine = [stages[pid] for k in steady for _, pid, _, _ in rounds[k]]
    imports, set_up, training = (median(s[i] for s in mine) for i in range(3))
    linger = median(end - done[pid] for k in steady for _, pid, end, _ in rounds[k])
    cpus = [cpu for k in steady for *_, cpu in rounds[k]]

    stamped_sim: list[tuple[float, str]] = []
    simulate(cfg.replace(out_dir=str(scratch / "simulate")), GROUPS,
             echo=lambda line: stamped_sim.append((time.time(), line)))
    sim_starts = round_starts(stamped_sim)
    sim_wall = median(sim_starts[k + 1] - sim_starts[k] for k in steady)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    floor = median(in_process_rounds(cfg, args.rounds)[1:])
    torch.set_num_threads(threads)

    data = f"OpinionQA, {args.questions} questions" if args.data else f"synthetic, {args.questions} questions"
    print(f"\n{GROUPS} groups, {data}, model {cfg.model}, {cfg.local_steps} local steps; rounds 2..{args.rounds - 1} "
          f"(steady: one train message per node), medians; torch {torch.__version__}, {psutil.cpu_count()} CPUs\n")
    print("| | seconds per round |\n|---|---|")
    print(f"| deployment (`deploy local`, {GROUPS} SuperNodes, TLS) | {median(walls):.2f} |")
    print(f"| simulation (`simulate`, {GROUPS} virtual SuperNodes) | {sim_wall:.2f} |")
    print(f"| the same client work in one process, 1 thread | {floor:.2f} |")
    print("\nOne steady deployed round (medians over rounds and messages):\n")
    print("| stage | seconds |\n|---|---|")
    print(f"| between rounds: the last reply ready to the next round's first process start (the reply sent to "
          f"the SuperLink, the ServerApp's pull and aggregation, the next message sent, the SuperNode's 0-3 s idle "
          f"poll, the SuperExec's poll) | {median(between):.2f} |")
    print(f"| the round's other messages start later by (the nodes poll independently) | {median(spread):.2f} |")
    print(f"| process start-up and imports (interpreter, Flower, torch, the app; until the message is in hand) "
          f"| {imports:.2f} |")
    print(f"| data and model set-up (bundle, model, weights) | {set_up:.3f} |")
    print(f"| training | {training:.3f} |")
    print(f"\nA `flwr-clientapp` process lives on {linger:.2f} s after its reply is ready (sending it, interpreter "
          f"exit), overlapping the next round.")
    print(f"\nCPU seconds per `flwr-clientapp` process: {median(cpus):.2f} (the {GROUPS} of a round share "
          f"{psutil.cpu_count()} cores)")


if __name__ == "__main__":
    main()
