"""`pluralllm simulate`: `flwr run` made safe to script.

flwr 1.42's `flwr run --stream` exits 0 even when the run failed, leaves the local SuperLink it
started running, reuses any SuperLink already on its port, and (by default) would `uv sync` the
project's dependencies into a fresh venv. This wrapper runs each simulation hermetically — its own
FLWR_HOME and ports, runtime dependency installation off — streams the log, reads the run's final
status, and always stops every process it caused (`processes.py`). `deploy.py` runs real
deployments with the same helpers (`flwr_env`, `run_and_check`, `free_port`).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from .config import ConfigError, RunConfig, read_batch
from .processes import Ownership

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: pyproject.toml beside the package
FLWR = Path(sys.executable).with_name("flwr")  # the venv's Flower CLI


class FlowerRunError(RuntimeError):
    """A Flower run did not finish as completed; the message holds Flower's status details."""


def run_config_toml(values: dict) -> str:
    """A run-config override file; TOML quoting done by json for strings (a TOML basic string)."""
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f"{key} = {json.dumps(value)}")
        else:
            lines.append(f"{key} = {value!r}")
    return "\n".join(lines) + "\n"


def simulate(cfg: RunConfig, num_supernodes: int, *, timeout: float | None = None, app_dir: Path = APP_DIR,
             echo=print) -> dict:
    """Run the Flower app in Ray simulation with `num_supernodes` virtual SuperNodes. Every process it
    causes (SuperLink, SuperExec, flwr-simulation, Ray) is stopped, and the scratch FLWR_HOME removed,
    before it returns or raises, also on Ctrl-C, SIGTERM and SIGHUP (`processes.Ownership`; after a
    SIGKILL its watchdog does the same within seconds).

    Returns {"run_id", "status", "out_dir"}; raises FlowerRunError when the run did not complete."""
    run = _flwr_simulation(lambda home: cfg.to_mapping(), num_supernodes, timeout, app_dir, echo)
    return {**run, "out_dir": cfg.out_dir}


def simulate_batch(cfgs: list[RunConfig], num_supernodes: int, *, timeout: float | None = None,
                   app_dir: Path = APP_DIR, echo=print) -> dict:
    """Run several federated runs in turn in one Flower simulation (run-config `batch`), so Flower and
    Ray start once, not once per run; each run writes its own out-dir, as `simulate` would, with the
    same numbers. Returns {"run_id", "status", "out_dirs"}; raises FlowerRunError when it failed (the
    runs finished before the failure are complete)."""
    def batch_file(home: Path) -> dict:
        path = home / "batch.json"
        path.write_text(json.dumps([c.to_mapping() for c in cfgs]))
        read_batch(path)  # a bad entry fails here, before Flower starts
        return {"batch": str(path)}
    run = _flwr_simulation(batch_file, num_supernodes, timeout, app_dir, echo)
    return {**run, "out_dirs": [c.out_dir for c in cfgs]}


def _flwr_simulation(run_config, num_supernodes: int, timeout: float | None, app_dir: Path, echo) -> dict:
    """`flwr run` of the app in a scratch FLWR_HOME with `run_config(home)` as its run-config."""
    if num_supernodes < 1:
        raise ConfigError(f"the number of virtual SuperNodes must be at least 1, got {num_supernodes}")
    home = Path(tempfile.mkdtemp(prefix="pluralllm-flwr-"))
    with Ownership(home) as owner:
        overrides = home / "run-config.toml"
        overrides.write_text(run_config_toml(run_config(home)))
        resources = f"num-supernodes={num_supernodes} client-resources-num-cpus=1"
        if torch.cuda.is_available():
            resources += f" client-resources-num-gpus={1 / min(num_supernodes, 4)}"
        env = owner.env(flwr_env(home, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
                                 FLWR_LOCAL_CONTROL_API_PORT=str(free_port())))
        command = [str(FLWR), "run", str(app_dir), "--run-config", str(overrides), "--federation-config", resources,
                   "--stream"]
        run = run_and_check(command, env, app_dir, timeout, echo)
    return {"run_id": run["run-id"], "status": run["status"]}


def progress_only(line: str) -> None:
    """An `echo` that keeps PluralLLM's own progress lines and errors, not Flower's INFO log."""
    if line.startswith(("[round", "PluralLLM", "baselines", "done:")) or "ERROR" in line or "Error" in line:
        print(line, flush=True)


QUICK_FLOWER = {  # defaults a user's own environment overrides; docs/deployment.md says what each buys
    # how often a SuperExec looks for app processes to start: Flower's 1 s adds 0.5 s per message on
    # average; 0.1 s would cost a third of a core while idle on this 2-core machine
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.5",
    "FLWR_TELEMETRY_ENABLED": "0",  # else every Flower process waits up to 4 s at exit to report its event
}


def flwr_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a hermetic Flower command: its own FLWR_HOME, no runtime `uv sync`,
    unbuffered output, the venv's bin first on PATH (Flower starts its executables by name), and
    `QUICK_FLOWER` unless the user's environment sets those variables."""
    return {**QUICK_FLOWER, **os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1", "PATH": f"{FLWR.parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def run_and_check(command: list[str], env: dict, app_dir: Path, timeout: float | None, echo) -> dict:
    """Run `flwr run ... --stream`, echo its log, stop it after `timeout` seconds, then read the run's
    final status from the SuperLink (`--stream` exits 0 even for failed runs). Returns the run's
    `flwr ls` entry; raises FlowerRunError unless it finished as completed."""
    with subprocess.Popen(command, env=env, cwd=app_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        expired = threading.Event()

        def stop() -> None:
            expired.set()
            proc.terminate()
        timer = threading.Timer(timeout, stop) if timeout is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            for line in proc.stdout:
                echo(line.rstrip("\n"))
        except BaseException:  # interrupted: do not leave `flwr run` streaming on its own
            proc.terminate()
            raise
        finally:
            if timer is not None:
                timer.cancel()
    if expired.is_set():
        raise FlowerRunError(f"the run exceeded its {timeout:.0f} s time limit and was stopped")
    run = _last_run(env, app_dir)
    if run is None:
        raise FlowerRunError(f"`flwr run` exited with code {proc.returncode} and no run was recorded")
    if run["status"] != "finished:completed":
        raise FlowerRunError(f"run {run['run-id']} ended as {run['status']}: {run.get('status-details', '')}")
    return run


def _last_run(env: dict, app_dir: Path) -> dict | None:
    out = subprocess.run([str(FLWR), "ls", "--format", "json"], env=env, cwd=app_dir, capture_output=True,
                         text=True, timeout=120)
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        return None
    return max(runs, key=lambda r: int(r["run-id"])) if runs else None


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
