"""`pluralllm simulate`: `flwr run` made safe to script.

flwr 1.42's `flwr run --stream` exits 0 even when the run failed, leaves the local SuperLink it
started running, reuses any SuperLink already on its port, and (by default) would `uv sync` the
project's dependencies into a fresh venv. This wrapper runs each simulation hermetically — its own
FLWR_HOME and ports, runtime dependency installation off — streams the log, reads the run's final
status, and always stops the SuperLink it started.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .config import RunConfig

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: pyproject.toml beside the package


class SimulationError(RuntimeError):
    """The run did not finish as completed; the message holds Flower's status details."""


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
    """Run the Flower app in Ray simulation with `num_supernodes` virtual SuperNodes.

    Returns {"run_id", "status", "out_dir"}; raises SimulationError when the run did not complete."""
    flwr = Path(sys.executable).with_name("flwr")
    home = Path(tempfile.mkdtemp(prefix="pluralllm-flwr-"))
    overrides = home / "run-config.toml"
    overrides.write_text(run_config_toml(cfg.to_mapping()))
    resources = f"num-supernodes={num_supernodes} client-resources-num-cpus=1"
    if torch.cuda.is_available():
        resources += f" client-resources-num-gpus={1 / min(num_supernodes, 4)}"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()), "PYTHONUNBUFFERED": "1",
           "PATH": f"{flwr.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # flwr starts flower-superlink by name
    command = [str(flwr), "run", str(app_dir), "--run-config", str(overrides),
               "--federation-config", resources, "--stream"]
    try:
        with subprocess.Popen(command, env=env, cwd=app_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1) as proc:
            deadline = None if timeout is None else time.monotonic() + timeout
            for line in proc.stdout:
                echo(line.rstrip("\n"))
                if deadline is not None and time.monotonic() > deadline:
                    proc.terminate()
                    raise SimulationError(f"simulation exceeded its {timeout:.0f} s time limit and was stopped")
        run = _last_run(flwr, env, app_dir)
        if run is None:
            raise SimulationError(f"`flwr run` exited with code {proc.returncode} and no run was recorded")
        if run["status"] != "finished:completed":
            raise SimulationError(f"run {run['run-id']} ended as {run['status']}: {run.get('status-details', '')}")
        return {"run_id": run["run-id"], "status": run["status"], "out_dir": cfg.out_dir}
    finally:
        _stop_superlink(home)


def _last_run(flwr: Path, env: dict, app_dir: Path) -> dict | None:
    out = subprocess.run([str(flwr), "ls", "--format", "json"], env=env, cwd=app_dir, capture_output=True,
                         text=True, timeout=120)
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        return None
    return max(runs, key=lambda r: int(r["run-id"])) if runs else None


def _stop_superlink(home: Path, grace: float = 15.0) -> None:
    """Stop the SuperLink `flwr run` left running for this FLWR_HOME (its superexec follows), then
    remove the scratch FLWR_HOME."""
    found = subprocess.run(["pgrep", "-f", f"flower-superlink.*{home}"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _signal(p, 0)]
        time.sleep(0.2)
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    shutil.rmtree(home, ignore_errors=True)


def _signal(pid: int, sig: int) -> bool:
    """Send a signal; False when the process is gone."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
