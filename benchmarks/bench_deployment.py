"""Seconds per federated round with Flower's real processes, and where they go; prints Markdown.

Runs `deploy_local` (a SuperLink and one SuperNode per group on 127.0.0.1, TLS on) with 3 groups for
R rounds, held-out evaluation at round R only, so rounds 2..R-1 are steady: one train message per
node. Then the same run as a simulation (3 virtual SuperNodes, Ray), and the same client work in
one process with one thread (the floor: no Flower at all).

The deployment runs twice: with warm ClientApp starts (the default: a fork server with Flower and
torch imported forks each message's process, forkserver.py) and with `--cold-clientapps` (Flower's
own: every message's process imports them). Where a deployed round goes comes from the processes
that serve messages (one per message) seen by a 10 Hz process sampler (start, exit, CPU seconds),
and from the line each deployed ClientApp logs per message (client_app._log_stages: process start
to message, set-up, training; a forked process starts at its fork). A round is timed from its first
process's start to the next round's. The simulation's rounds are timed by the
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
from pluralllm_flwr import forkserver  # noqa: E402
from pluralllm_flwr.deploy import SERVER, deploy_local  # noqa: E402
from pluralllm_flwr.experiment import prepare_experiment  # noqa: E402
from pluralllm_flwr.simulation import simulate  # noqa: E402
from tests.conftest import synthetic_goqa  # noqa: E402

GROUPS = 3
ROUND_LINE = re.compile(r"\[ROUND (\d+)/\d+\]")
FORKSERVER, LAUNCHER = forkserver.__name__, str(forkserver.launcher_dir(SERVER) / forkserver.LAUNCHER)  # as in a cmdline
STAGE_LINE = re.compile(r"\[pluralllm\] train .* \(pid (\d+)\): ([\d.]+) s from process start, ([\d.]+) s set-up, "
                        r"([\d.]+) s train")


class ProcessSampler:
    """Every process that serves a message while it runs: pid -> [start, last seen, CPU seconds, kind].
    Kinds: "cold" (Flower's own `flwr-clientapp`), "forked" (a child of the fork server) and "launcher"
    (the fork server's small `flwr-clientapp`, which waits for its forked child)."""

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
                    kind = message_process_kind(p)
                    if kind is None:
                        continue
                    cpu = sum(p.cpu_times()[:2])
                except (psutil.Error, OSError):
                    continue
                entry = self.seen.setdefault(p.info["pid"], [p.info["create_time"], 0.0, 0.0, kind])
                entry[1:3] = [time.time(), cpu]
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    def of_kind(self, *kinds: str) -> list[tuple[float, int, float, float]]:
        """(start, pid, last seen, CPU seconds) of the processes of these kinds, by start."""
        return sorted((start, pid, end, cpu) for pid, (start, end, cpu, kind) in self.seen.items() if kind in kinds)


def message_process_kind(p: psutil.Process) -> str | None:
    command = " ".join(p.info["cmdline"] or ())
    if LAUNCHER in command:
        return "launcher"
    if "flwr-clientapp" in command:
        return "cold"
    lineage = [" ".join(q.cmdline()) for q in p.parents()[:2]] if FORKSERVER in command else []
    # a child of the fork server itself, not a short-lived fork of such a child
    return "forked" if len(lineage) == 2 and FORKSERVER in lineage[0] and FORKSERVER not in lineage[1] else None


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


def deployed(cfg: RunConfig, rounds: int, warm: bool) -> dict:
    """One `deploy local` run, timed: seconds per steady round and where they go."""
    steady = range(2, rounds)
    with ProcessSampler() as sampler:
        deploy_local(cfg, GROUPS, echo=lambda line: None, progress=False, warm=warm)
    logs = Path(cfg.out_dir, "deploy-logs").glob("node-*.log")
    stages = {int(m[1]): tuple(map(float, m.groups()[1:]))  # pid -> (to the message, set-up, training)
              for log in logs for m in STAGE_LINE.finditer(log.read_text(errors="replace"))}
    # one process per message, in order: the host query, rounds 1..R (train), the evaluation of round R
    procs = sampler.of_kind("forked" if warm else "cold")
    if len(procs) != GROUPS * (rounds + 2):
        raise SystemExit(f"saw {len(procs)} ClientApp processes, expected {GROUPS * (rounds + 2)}: a message "
                         f"failed or the sampler missed one; see {cfg.out_dir}/deploy-logs")
    by_round = {k: procs[GROUPS * k:GROUPS * (k + 1)] for k in range(rounds + 2)}
    done = {pid: start + sum(stages[pid]) for k in steady for start, pid, _, _ in by_round[k]}  # handler returned
    mine = [stages[pid] for k in steady for _, pid, _, _ in by_round[k]]
    launchers = sampler.of_kind("launcher")
    return {
        "round": median(by_round[k + 1][0][0] - by_round[k][0][0] for k in steady),  # first start to the next
        "between": median(by_round[k + 1][0][0] - max(done[pid] for _, pid, _, _ in by_round[k]) for k in steady),
        "spread": median(start - by_round[k][0][0] for k in steady for start, *_ in by_round[k]),
        **{name: median(s[i] for s in mine) for i, name in enumerate(("start-up", "set-up", "training"))},
        "linger": median(end - done[pid] for k in steady for _, pid, end, _ in by_round[k]),
        "cpu": median(cpu for k in steady for *_, cpu in by_round[k]),
        "launcher cpu": median(cpu for *_, cpu in launchers) if launchers else float("nan"),
    }


def bench(args: argparse.Namespace, scratch: Path) -> None:
    cfg = configure(args, scratch)
    prepare_experiment(cfg, progress=False)  # embed once, outside every timing
    steady = range(2, args.rounds)
    warm = deployed(cfg.replace(out_dir=str(scratch / "warm")), args.rounds, warm=True)
    cold = deployed(cfg.replace(out_dir=str(scratch / "cold")), args.rounds, warm=False)

    stamped_sim: list[tuple[float, str]] = []
    simulate(cfg.replace(out_dir=str(scratch / "simulate")), GROUPS,
             echo=lambda line: stamped_sim.append((time.time(), line)))
    sim_starts = round_starts(stamped_sim)
    sim_wall = median(sim_starts[k + 1] - sim_starts[k] for k in steady)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    floor = median(in_process_rounds(cfg, args.rounds)[1:])  # round 1 pays the first-call set-up
    torch.set_num_threads(threads)

    data = f"OpinionQA, {args.questions} questions" if args.data else f"synthetic, {args.questions} questions"
    print(f"\n{GROUPS} groups, {data}, model {cfg.model}, {cfg.local_steps} local steps; rounds 2..{args.rounds - 1} "
          f"(steady: one train message per node), medians; torch {torch.__version__}, {psutil.cpu_count()} CPUs\n")
    print("| | seconds per round |\n|---|---|")
    print(f"| deployment (`deploy local`, {GROUPS} SuperNodes, TLS), warm ClientApp starts (the default) "
          f"| {warm['round']:.2f} |")
    print(f"| deployment, `--cold-clientapps` (Flower's own: every process imports Flower and torch) "
          f"| {cold['round']:.2f} |")
    print(f"| simulation (`simulate`, {GROUPS} virtual SuperNodes) | {sim_wall:.2f} |")
    print(f"| the same client work in one process, 1 thread | {floor:.2f} |")
    print("\nOne steady deployed round (medians over rounds and messages):\n")
    print("| stage | warm | cold |\n|---|---|---|")
    rows = [("between rounds: the last reply ready to the next round's first ClientApp process (the reply sent to "
             "the SuperLink, the ServerApp's pull and aggregation, the next message sent, the SuperNode's 0-3 s "
             "idle poll, the SuperExec's poll)", "between", 2),
            ("the round's other messages start later by (the nodes poll independently)", "spread", 2),
            ("process start to message in hand (cold: interpreter, Flower, torch, the app; warm: from the fork, "
             "the app's own modules)", "start-up", 2),
            ("data and model set-up (bundle, model, weights)", "set-up", 3),
            ("training", "training", 3),
            ("the process lives on after its reply is ready (sending it, exit; overlaps the next round)", "linger", 2),
            ("CPU seconds per ClientApp process", "cpu", 2)]
    for label, key, digits in rows:
        print(f"| {label} | {warm[key]:.{digits}f} | {cold[key]:.{digits}f} |")
    print(f"\nWarm: each message's launcher (the `flwr-clientapp` the SuperExec starts, handing over to the fork "
          f"server) uses {warm['launcher cpu']:.2f} CPU-s. The {GROUPS} messages of a round share "
          f"{psutil.cpu_count()} cores.")


if __name__ == "__main__":
    main()
