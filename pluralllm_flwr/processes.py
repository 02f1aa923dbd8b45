"""Every process a command causes is stopped with it, however Flower and Ray start them and however
the command ends (done, failed, Ctrl-C, SIGTERM, SIGHUP, even SIGKILL).

Flower starts its SuperLink, SuperExec and flwr-simulation detached (sessions of their own, re-parented
to init when their parent goes), and Ray's daemons ignore SIGTERM, so neither the process tree nor a
process group reaches them all. What each of them keeps is the environment it was started with:
`Ownership.env` tags it with a random PLURALLLM_OWNER token, which Flower and Ray pass on to every
process they start. A watchdog process, started first in a session of its own, waits on a pipe whose
only writer is the owner; when the owner closes it (leaving the `with` block) or dies (the kernel
closes it, even after SIGKILL) the watchdog stops every process bearing the token (SIGTERM, then
SIGKILL after a grace period) and removes the owner's scratch folders. The owner waits for it, so
nothing of the run is left, or writes, once the command has returned.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

OWNER_VAR = "PLURALLLM_OWNER"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # turned into KeyboardInterrupt, as Ctrl-C's SIGINT is


class Ownership:
    """Use as a context manager around starting and running the processes; start each with
    `env=owner.env(...)`. Inside, SIGTERM and SIGHUP raise KeyboardInterrupt (see `stop_signals_as_interrupt`)."""

    def __init__(self, *scratch: str | Path, grace: float = 5.0) -> None:
        self.token = secrets.token_hex(12)
        self.scratch = [str(Path(p).resolve()) for p in scratch]
        self.grace = grace
        self._signals = stop_signals_as_interrupt()

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """`env` with this owner's tag: every process started with it, and every process those start."""
        return {**env, OWNER_VAR: self.token}

    def __enter__(self) -> "Ownership":
        read, self._pipe = os.pipe()  # the write end stays here: not inherited by any child (PEP 446)
        try:
            self.watchdog = subprocess.Popen([sys.executable, "-m", __name__, self.token, str(self.grace), *self.scratch],
                                             stdin=read, stdout=subprocess.DEVNULL, start_new_session=True,
                                             env={k: v for k, v in os.environ.items() if k != OWNER_VAR})
        finally:
            os.close(read)
        self._signals.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.close(self._pipe)  # the watchdog stops the owned processes now
            while True:
                try:
                    self.watchdog.wait()
                    break
                except KeyboardInterrupt:  # a second Ctrl-C: the processes are being stopped; wait for it
                    continue
        finally:
            self._signals.__exit__(None, None, None)


@contextlib.contextmanager
def stop_signals_as_interrupt():
    """Inside, SIGTERM and SIGHUP raise KeyboardInterrupt as Ctrl-C does, so the callers' clean-up runs
    when they are killed or their terminal closes. Signal handlers can only be set on the main thread;
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def owned(token: str, var: str = OWNER_VAR) -> list[psutil.Process]:
    """The live processes whose environment bears `token` in `var`."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(var) == token and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def stop_owned(token: str, grace: float) -> None:
    """SIGTERM every process bearing `token`, SIGKILL those left after `grace` seconds; looked up again
    until none is left, since a dying process may start others (Ray restarts its workers)."""
    deadline, asked = time.monotonic() + grace, set()
    while (processes := owned(token)) and time.monotonic() < deadline + 30:
        late = time.monotonic() > deadline
        for p in processes:
            with contextlib.suppress(psutil.Error):
                if late:
                    p.kill()
                elif p.pid not in asked:
                    p.terminate()
                    asked.add(p.pid)
        time.sleep(0.2)


def _watch(token: str, grace: float, scratch: list[str]) -> None:
    """The watchdog: until the owner's pipe closes, nothing; then stop its processes, remove its folders."""
    for sig in (signal.SIGINT, signal.SIGHUP):  # a terminal's signals are for the owner, not for us
        signal.signal(sig, signal.SIG_IGN)
    while os.read(0, 4096):
        pass
    stop_owned(token, grace)
    for folder in scratch:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    _watch(sys.argv[1], float(sys.argv[2]), sys.argv[3:])
