"""`pluralllm deploy`: the federation as real Flower processes — one SuperLink, and one SuperNode per
training group that holds nothing but that group's bundle.

`deploy_local` runs them all on 127.0.0.1, each with its own FLWR_HOME and ports, runs the app with
`flwr run`, checks the run's final status and stops every process it caused whatever happens (a
failed run, Ctrl-C, SIGTERM, SIGHUP; after a SIGKILL its watchdog does, `processes.Ownership`).
TLS is on unless `insecure` (meant for loopback only); `make_certificates` creates the demo
certificate authority and the SuperLink's certificate. docs/deployment.md shows the same federation
on separate machines.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil

from .bundle import safe_name, write_bundles
from .config import ConfigError, RunConfig
from .experiment import prepare_experiment
from .forkserver import SOCKET_NAME, launcher_dir
from .processes import Ownership
from .simulation import APP_DIR, FLWR, flwr_env, free_port, run_and_check, run_config_toml

LOOPBACK = "127.0.0.1"
CONNECTION = "pluralllm-local"  # the SuperLink connection name in the CLI's config.toml
CERT_FILES = {"ca": "ca.crt", "ca_key": "ca.key", "cert": "server.pem", "key": "server.key"}
SERVER = "clientapp-server"  # the fork server's process name, folder and log


class DeployError(RuntimeError):
    """A deployment process failed to start or stopped early; the message quotes its log."""


def deployment_defaults(groups: int) -> dict:
    """Run-config values a deployment needs where a simulation's defaults do not fit: a round goes on
    when a majority of the groups' SuperNodes is there (a node that restarts misses a round instead of
    stalling it), and waits at most two minutes for nodes and replies."""
    return {"min_train_nodes": max(1, math.ceil(groups / 2)), "round_timeout": 120.0}


def make_certificates(out_dir: str | Path, hosts: list[str] | tuple[str, ...] = (), days: int = 365) -> dict[str, Path]:
    """A demo certificate authority and a SuperLink certificate valid for 127.0.0.1, localhost and
    `hosts` (names or IP addresses the SuperNodes use to reach the SuperLink). Returns the paths:
    "ca" (ca.crt: every SuperNode and the `flwr` CLI), "cert"/"key" (server.pem/server.key: the
    SuperLink only) and "ca_key" (ca.key: keep offline; it signs certificates)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    paths = {k: out / name for k, name in CERT_FILES.items()}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing:
        raise ConfigError(f"certificate files exist already: {existing}; a new CA would invalidate the ca.crt "
                          "handed out before. Remove them or choose another folder")
    names = list(dict.fromkeys([LOOPBACK, "localhost", *hosts]))
    now = datetime.now(timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "PluralLLM demo CA")])

    def builder(subject: x509.Name, public_key) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
                .not_valid_after(now + timedelta(days=days))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))

    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
                 encipher_only=False, decipher_only=False)
    ca = (builder(ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage), critical=True)
          .sign(ca_key, hashes.SHA384()))
    alt = [x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n) for n in names]
    cert = (builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]), key.public_key())
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **usage),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    out.mkdir(parents=True, exist_ok=True)
    for name, private in (("ca_key", ca_key), ("key", key)):
        paths[name].touch(mode=0o600)
        paths[name].write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1 under `workdir` (FLWR_HOMEs, certificates, logs).

    Use it as a context manager: on leaving — normally, on an error, on Ctrl-C, SIGTERM or SIGHUP
    (turned into KeyboardInterrupt while inside) — the SuperNodes and then the SuperLink are stopped,
    and with them every process they caused (Flower's SuperExec, ServerApp and ClientApp processes),
    as `processes.Ownership` does; with `scratch` the workdir is removed too. `logs` defaults to
    <workdir>/logs."""

    def __init__(self, workdir: str | Path, *, insecure: bool = False, app_dir: Path = APP_DIR,
                 logs: str | Path | None = None, scratch: bool = False) -> None:
        self.workdir = Path(workdir).resolve()
        self.insecure, self.app_dir = insecure, app_dir
        self.port = free_port()
        self.logs = Path(logs).resolve() if logs else self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.certs = None if insecure else make_certificates(self.workdir / "certs")
        self.processes: dict[str, subprocess.Popen] = {}
        self.slugs = {"superlink": "superlink", SERVER: SERVER}  # process name -> its FLWR_HOME's and log's name
        self.launchers: Path | None = None  # bin folder of the fork server's flwr-clientapp, once it runs
        self.cli_home = self.workdir / "home" / "cli"
        self.cli_home.mkdir(parents=True)
        connection = {"address": f"{LOOPBACK}:{self.port}"}
        connection.update({"insecure": True} if insecure else {"root-certificates": str(self.certs["ca"])})
        (self.cli_home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                                   + run_config_toml(connection))
        self.owner = Ownership(*([self.workdir] if scratch else []))

    def __enter__(self) -> "LocalDeployment":
        self.owner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.owner.__exit__(None, None, None)

    def env(self, home: Path) -> dict[str, str]:
        env = flwr_env(home)
        if self.launchers is not None:  # SuperExecs start flwr-clientapp by name: the fork server's launcher
            env["PATH"] = f"{self.launchers}{os.pathsep}{env['PATH']}"
        return self.owner.env(env)

    # ------------------------------------------------------------------ processes
    def start_superlink(self) -> None:
        tls = (["--insecure"] if self.insecure else
               ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]),
                "--ssl-keyfile", str(self.certs["key"])])
        self._start("superlink", [str(FLWR.with_name("flower-superlink")), "--host", LOOPBACK, "--port", str(self.port),
                                  "--disable-runtime-dependency-installation", *tls])

    def start_supernode(self, group: str, bundle: str | Path) -> None:
        """A SuperNode for `group` whose node-config names its bundle (an absolute path) and nothing else."""
        tls = ["--insecure"] if self.insecure else ["--root-certificates", str(self.certs["ca"])]
        self.slugs[group] = f"node-{safe_name(group)}"
        self._start(group, [str(FLWR.with_name("flower-supernode")), "--superlink", f"{LOOPBACK}:{self.port}",
                            "--port", str(free_port()), "--node-config", f"bundle={json.dumps(str(Path(bundle).resolve()))}",
                            *tls])

    def start_clientapp_server(self, timeout: float = 120.0) -> None:
        """The fork server (forkserver.py) that starts every ClientApp process with Flower and torch
        already imported; SuperNodes started after it use it."""
        directory = self.workdir / SERVER
        self._start(SERVER, [sys.executable, "-m", "pluralllm_flwr.forkserver", str(directory)])
        deadline = time.monotonic() + timeout
        while not (directory / SOCKET_NAME).is_socket():
            if self.processes[SERVER].poll() is not None or time.monotonic() > deadline:
                raise DeployError(f"the ClientApp fork server did not start:\n{self.tail(SERVER)}")
            time.sleep(0.2)
        self.launchers = launcher_dir(directory)

    def log_file(self, name: str) -> Path:
        return self.logs / f"{self.slugs[name]}.log"

    def _start(self, name: str, command: list[str]) -> None:
        if name in self.processes and self.processes[name].poll() is None:
            raise DeployError(f"{name} is running already (pid {self.processes[name].pid})")
        home = self.workdir / "home" / self.slugs[name]  # a restarted SuperNode keeps its FLWR_HOME
        home.mkdir(parents=True, exist_ok=True)
        with open(self.log_file(name), "a") as log:  # a restarted process appends to the same log
            self.processes[name] = subprocess.Popen(command, env=self.env(home), cwd=home, stdout=log,
                                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                    start_new_session=True)  # no stray Ctrl-C: stopped in order

    def stop_process(self, name: str, grace: float = 15.0) -> None:
        """SIGTERM one process and those it started; SIGKILL whatever is left after `grace` seconds."""
        proc = self.processes[name]
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for p in (proc, *children):
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _, alive = psutil.wait_procs(children, timeout=grace)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=5)

    def stop(self) -> None:
        """Stop the SuperNodes, then the fork server, then the SuperLink."""
        for name in sorted(self.processes, key=lambda n: {SERVER: 1, "superlink": 2}.get(n, 0)):
            self.stop_process(name)

    # ------------------------------------------------------------------ federation
    def wait_for_nodes(self, count: int, timeout: float = 120.0) -> None:
        """Until `count` SuperNodes are online at the SuperLink; DeployError if a process dies first."""
        deadline = time.monotonic() + timeout
        online = 0
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise DeployError(f"{name} exited with code {proc.returncode}:\n{self.tail(name)}")
            out = subprocess.run([str(FLWR), "supernode", "ls", "--format", "json"], env=self.env(self.cli_home),
                                 cwd=self.cli_home, capture_output=True, text=True, timeout=60)
            with contextlib.suppress(json.JSONDecodeError):
                online = sum(n["status"] == "online" for n in json.loads(out.stdout).get("nodes", []))
            if online >= count:
                return
            time.sleep(2.0)
        raise DeployError(f"only {online} of {count} SuperNodes came online within {timeout:.0f} s; "
                          f"SuperLink log:\n{self.tail('superlink')}")

    def run(self, cfg: RunConfig, timeout: float | None = None, echo=print) -> dict:
        """`flwr run` of the app on this SuperLink; its log goes to `echo` and logs/flwr-run.log.
        Returns the run's `flwr ls` entry; raises FlowerRunError unless it completed."""
        overrides = self.workdir / "run-config.toml"
        overrides.write_text(run_config_toml(cfg.to_mapping()))
        command = [str(FLWR), "run", str(self.app_dir), CONNECTION, "--run-config", str(overrides), "--stream"]
        with open(self.logs / "flwr-run.log", "a") as log:
            def tee(line: str) -> None:
                log.write(line + "\n")
                echo(line)
            return run_and_check(command, self.env(self.cli_home), self.app_dir, timeout, tee)

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_file(name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"



def deploy_local(cfg: RunConfig, groups: int, *, insecure: bool = False, timeout: float | None = None,
                 echo=print, progress: bool = True, warm: bool = True) -> dict:
    """The app as a real federation on 127.0.0.1: bundles for the first `groups` training groups and
    for the held-out groups, one SuperNode per training group, the SuperLink holding the held-out
    bundles (run-config eval-bundles), then `flwr run`. The logs go to <out-dir>/deploy-logs. With
    `warm` (the default) the SuperNodes' ClientApp processes are forked from one process that has
    Flower and torch imported (forkserver.py); without it each imports them, as Flower's own does.

    Returns {"run_id", "status", "out_dir", "logs"}; raises FlowerRunError or DeployError when the run
    did not complete. Every process is stopped, and the scratch folder removed, before it returns."""
    if not cfg.out_dir or not Path(cfg.out_dir).is_absolute():
        raise ConfigError("deploy_local needs an absolute run-config out-dir: the ServerApp writes there")
    split = prepare_experiment(cfg, progress).split  # validates (and embeds) before any process starts
    if not 1 <= groups <= len(split.train):
        raise ConfigError(f"--groups must be between 1 and the {len(split.train)} training groups, got {groups}")
    chosen = split.train[:groups]
    sep = ";" if any("," in g for g in chosen + split.eval) else ","  # "$100,000 or more" needs ";"
    cfg = cfg.replace(train_groups=sep.join(chosen), eval_groups=sep.join(split.eval))
    exp = prepare_experiment(cfg, progress=False)  # the questions common to exactly these groups
    workdir, logs = Path(tempfile.mkdtemp(prefix="pluralllm-deploy-")), Path(cfg.out_dir) / "deploy-logs"
    try:
        with LocalDeployment(workdir, insecure=insecure, logs=logs, scratch=True) as deployment:
            bundles = write_bundles(exp, chosen + exp.split.eval, workdir / "bundles")
            cfg = cfg.replace(eval_bundles=",".join(str(bundles[g]) for g in exp.split.eval))
            deployment.start_superlink()
            if warm:
                deployment.start_clientapp_server()
            for group in chosen:
                deployment.start_supernode(group, bundles[group])
            deployment.wait_for_nodes(len(chosen))
            run = deployment.run(cfg, timeout, echo)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # should the deployment itself fail to start
    return {"run_id": run["run-id"], "status": run["status"], "out_dir": cfg.out_dir, "logs": str(logs)}
