"""The fault suite: signals to real `pluralllm simulate` and `pluralllm deploy local` processes. After
the command stops — Ctrl-C, SIGTERM, SIGHUP or SIGKILL — no process of its run is left within 10 s,
results.json does not change, the scratch folders are gone, and a resume ends with the numbers of an
uninterrupted run."""
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from pluralllm_flwr.processes import Ownership, owned
from pluralllm_flwr.results import load_results

from .conftest import without_time
from .test_deploy import run_config_arg

PLURALLLM = Path(sys.executable).with_name("pluralllm")
MARK = "PLURALLLM_TEST_MARK"  # the test's own tag, independent of the one processes.Ownership sets


def marked(mark: str) -> list[psutil.Process]:
    """Every process the command caused, however detached (Flower and Ray pass their environment on)."""
    return owned(mark, MARK)


def left_after(mark: str, seconds: float = 10.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while (alive := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [f"{p.pid} {' '.join(p.cmdline()[:3])}" for p in alive if p.is_running()]


def from_a_terminal() -> None:
    """A child's SIGINT at its default, as in a command typed at a terminal, also where this test run was
    itself started in the background (a shell without job control makes its children ignore SIGINT, so
    Python would install no Ctrl-C handler and these tests would test nothing)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Command:
    """`pluralllm ARGS` in a session of its own (so a group signal is a terminal's Ctrl-C), marked."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.mark, self.log = uuid.uuid4().hex, log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([str(PLURALLLM), *args], env={**os.environ, MARK: self.mark}, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=from_a_terminal)

    def homes(self) -> set[str]:
        """The FLWR_HOME folders of the run's processes (its scratch folders)."""
        found = set()
        for p in marked(self.mark):
            try:
                found.add(p.environ()["FLWR_HOME"])
            except (psutil.Error, KeyError):
                pass
        return found

    def wait_for_round(self, out_dir: Path, round_: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if load_results(out_dir)["final"]["round"] >= round_:
                    return
            except (OSError, ValueError, TypeError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"round {round_} not reached in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int, out_dir: Path) -> tuple[int, list[str], bytes]:
        """Send `sig` (SIGINT to the whole session, as a terminal does); the exit code, the processes left
        10 s later, and results.json as it was when the command exited."""
        os.killpg(self.proc.pid, sig) if sig == signal.SIGINT else os.kill(self.proc.pid, sig)
        code = self.proc.wait(timeout=60)
        at_exit = (out_dir / "results.json").read_bytes()
        return code, left_after(self.mark), at_exit


def metrics(out_dir) -> list[dict]:
    return without_time(load_results(out_dir)["history"])


# ----------------------------------------------------------------------------- the mechanism


OWNER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from pluralllm_flwr.processes import Ownership, owned
    # a grandchild as Ray's daemons are: own session, deaf to SIGTERM
    DAEMON = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    with Ownership(sys.argv[1], grace=1.0) as owner:
        subprocess.Popen([sys.executable, "-c", DAEMON], env=owner.env(dict(os.environ)), start_new_session=True)
        print("ready", flush=True)
        time.sleep(600)
""")


def owner_children(pid: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 10
    while len(children := psutil.Process(pid).children()) < 2 and time.monotonic() < deadline:  # + watchdog
        time.sleep(0.1)
    return children


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_an_owners_processes_and_scratch_go_with_it_however_it_stops(tmp_path, sig):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    mark = uuid.uuid4().hex
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(scratch)], env={**os.environ, MARK: mark},
                             stdout=subprocess.PIPE, text=True, preexec_fn=from_a_terminal)
    assert owner.stdout.readline() == "ready\n"
    daemons = [p for p in owner_children(owner.pid) if "pluralllm_flwr.processes" not in p.cmdline()]
    assert len(daemons) == 1 and os.getsid(daemons[0].pid) != os.getsid(owner.pid)  # out of its process group
    owner.send_signal(sig)
    owner.wait(timeout=30)
    assert left_after(mark) == []
    assert not scratch.exists()


def test_leaving_the_block_stops_the_processes_before_returning(tmp_path):
    mark = uuid.uuid4().hex
    with Ownership(grace=1.0) as owner:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                 env=owner.env({**os.environ, MARK: mark}), start_new_session=True)
    assert child.poll() == -signal.SIGTERM  # stopped already, not soon
    assert marked(mark) == []


# ----------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_ctrl_c_stops_a_simulation_and_a_resume_ends_as_an_uninterrupted_run(tiny_config, tmp_path):
    from pluralllm_flwr.simulation import simulate

    whole = tiny_config(**{"out-dir": str(tmp_path / "whole"), "num-server-rounds": 4, "lr-schedule": "constant"})
    simulate(whole, 2, echo=lambda line: None)
    part = whole.replace(out_dir=str(tmp_path / "part"), num_server_rounds=3)
    out = Path(part.out_dir)
    run = Command(["simulate", "--num-supernodes", "2", "-c", run_config_arg(part)], tmp_path / "run.log")
    run.wait_for_round(out, 1)
    homes = run.homes()
    code, left, at_exit = run.stop(signal.SIGINT, out)
    assert code == 130 and "pluralllm: interrupted" in run.log.read_text()
    assert left == []
    assert (out / "results.json").read_bytes() == at_exit
    assert homes and not any(Path(h).exists() for h in homes)
    stopped_at = load_results(out)["final"]["round"]
    assert 1 <= stopped_at < 3
    # the interrupted run extended to 4 rounds (a constant learning rate allows it) from its last checkpoint
    resumed = Command(["simulate", "--quiet", "--num-supernodes", "2", "-c",
                       run_config_arg(part.replace(num_server_rounds=4, resume=True))], tmp_path / "resume.log")
    assert resumed.proc.wait(timeout=400) == 0, resumed.log.read_text()[-3000:]
    assert metrics(out) == metrics(whole.out_dir)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL])  # SIGTERM/SIGHUP take Ctrl-C's path (tested above and in the mechanism's tests)
def test_a_signalled_simulation_leaves_nothing_running(tiny_config, tmp_path, sig):
    cfg = tiny_config(**{"num-server-rounds": 50})
    out = Path(cfg.out_dir)
    run = Command(["simulate", "--num-supernodes", "2", "-c", run_config_arg(cfg)], tmp_path / "run.log")
    run.wait_for_round(out, 1)
    assert any("ClientAppActor" in " ".join(p.cmdline()) or "raylet" in " ".join(p.cmdline())
               for p in marked(run.mark))  # Ray is running: the processes that were left before
    homes = run.homes()
    code, left, at_exit = run.stop(sig, out)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    assert left == []
    if sig != signal.SIGKILL:  # a SIGKILLed command cannot wait: its watchdog stops the run within seconds
        assert (out / "results.json").read_bytes() == at_exit
    assert homes and not any(Path(h).exists() for h in homes)


@pytest.mark.slow
def test_a_killed_deploy_local_leaves_nothing_running(tiny_config, tmp_path):
    cfg = tiny_config(**{"num-server-rounds": 50})
    out = Path(cfg.out_dir)
    run = Command(["deploy", "local", "--groups", "2", "--insecure", "-c",
                   run_config_arg(cfg, leave_out=("min-train-nodes", "round-timeout"))], tmp_path / "run.log")
    run.wait_for_round(out, 1)
    homes = run.homes()
    assert len(homes) >= 3  # the SuperLink's, two SuperNodes', the CLI's
    code, left, _ = run.stop(signal.SIGKILL, out)
    assert code == -signal.SIGKILL and left == []
    assert not any(Path(h).exists() for h in homes)
