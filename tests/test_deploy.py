"""Real SuperNodes per group: bundles, the deployment server's evaluation, TLS certificates, host
discovery, and `pluralllm deploy local` end to end (with a node killed and restarted mid-run)."""
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors import safe_open
from safetensors.numpy import save_file

from pluralllm_flwr import client_app
from pluralllm_flwr.bundle import BundleError, read_bundle, write_bundles
from pluralllm_flwr.cli import main
from pluralllm_flwr.config import ConfigError, RunConfig
from pluralllm_flwr.data import GroupSplit
from pluralllm_flwr.deploy import LocalDeployment, make_certificates
from pluralllm_flwr.experiment import bundle_experiment, prepare_experiment
from pluralllm_flwr.results import LAST_CHECKPOINT, TIMING_FIELDS, load_checkpoint, load_results
from pluralllm_flwr.strategies import NoClientsError

from .conftest import without_time
from .test_federated import FakeGrid, call_client, reply, strategy_for, train_reply


@pytest.fixture
def run(tiny_config, tmp_path):
    """The tiny run, its prepared experiment and a bundle of every group."""
    cfg = tiny_config()
    exp = prepare_experiment(cfg, progress=False)
    return cfg, exp, write_bundles(exp, exp.split.train + exp.split.eval, tmp_path / "bundles")


def run_config_arg(cfg, leave_out=()) -> str:
    """cfg as a `-c` argument, without the keys in leave_out (so that their defaults apply)."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in cfg.to_mapping().items() if k not in leave_out)


def node_context(cfg, node_config):
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=cfg.to_mapping())


# ----------------------------------------------------------------------------- bundles


def test_a_bundle_gives_exactly_the_simulation_paths_data_and_training(run):
    cfg, exp, bundles = run
    for group in exp.split.train:
        node = bundle_experiment(cfg, [read_bundle(bundles[group])], GroupSplit([group], []))
        assert node.model_config == exp.model_config  # input_dim from the bundle's embedding size
        for part in ("train", "heldback"):
            ours, theirs = node.vectors(group, part), exp.vectors(group, part)
            assert ours.keys == theirs.keys and len(ours.keys) > 0
            for field in ("x", "y", "offsets"):
                np.testing.assert_array_equal(getattr(ours, field), getattr(theirs, field))
    # the ClientApp trained from the bundle returns the very weights the simulation path returns
    torch.set_num_threads(1)  # as the simulation path sets it: the same float summation order
    _, deployed = call_client(client_app.train, cfg, exp, "G1", {}, node_config={"bundle": str(bundles["G1"])})
    _, simulated = call_client(client_app.train, cfg, exp, "G1", {})
    for a, b in zip(deployed.content["arrays"].to_numpy_ndarrays(), simulated.content["arrays"].to_numpy_ndarrays()):
        np.testing.assert_array_equal(a, b)
    assert dict(deployed.content["metrics"]) == dict(simulated.content["metrics"])


TRAIN_MESSAGE_IN_A_NEW_PROCESS = """
import json, sys
from flwr.app import ArrayRecord, ConfigRecord, Context, Metadata, RecordDict
from flwr.app.message.message import make_message
from pluralllm_flwr import client_app

mapping, bundle = json.loads(sys.argv[1]), sys.argv[2]
cfg = client_app.RunConfig.from_mapping(mapping)
model = client_app._bundle_experiment(cfg, bundle).build_model()
content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(
    {"lr": cfg.lr, "local-steps": 2, "server-round": 1, "group": "G1"})})
meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                created_at=0.0, ttl=60.0, message_type="train")
context = Context(run_id=1, node_id=7, node_config={"bundle": bundle}, state=RecordDict(), run_config=mapping)
reply = client_app.train(make_message(meta, content), context)
assert reply.content["metrics"]["train-loss"] > 0
print(json.dumps([m for m in ("pandas", "scipy", "torch._dynamo", "transformers") if m in sys.modules]))
"""


def test_a_deployed_train_message_imports_only_what_it_needs(run):
    """Every deployed message is a new process: pandas, scipy, torch._dynamo (which building a
    torch.optim optimiser imports) and transformers would cost it seconds."""
    cfg, _, bundles = run
    out = subprocess.run([sys.executable, "-c", TRAIN_MESSAGE_IN_A_NEW_PROCESS, json.dumps(cfg.to_mapping()),
                          str(bundles["G1"])], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "s from process start" in out.stdout  # the node's timing line
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_node_given_group_As_bundle_cannot_read_Bs_answers(run):
    cfg, exp, bundles = run
    raw = bundles["G0"].read_bytes()
    def answers(group):  # the group's distribution of each question, as stored (float32 bytes)
        vectors = exp.vectors(group)
        return [d.tobytes() for d in np.split(vectors.y, vectors.offsets[1:-1])]
    assert all(d in raw for d in answers("G0"))  # the search finds answers where they are
    assert not any(d in raw for d in answers("G1"))
    with safe_open(str(bundles["G0"]), "np") as f:
        assert set(f.keys()) == {"x", "y", "offsets"} and "G1" not in json.dumps(f.metadata())
    context = node_context(cfg, {"bundle": str(bundles["G0"])})
    assert client_app._setup(cfg, context)[1] == ["G0"]
    assert list(client_app._setup(cfg, context)[0].data.answers) == ["G0"]
    with pytest.raises(ValueError, match=r"this node hosts \['G0'\], not 'G1'"):
        call_client(client_app.train, cfg, exp, "G1", {}, node_config={"bundle": str(bundles["G0"])})


def test_server_evaluation_from_held_out_bundles_equals_the_full_dataset(run):
    cfg, exp, bundles = run
    server = prepare_experiment(cfg.replace(eval_bundles=str(bundles["G2"])), progress=False)
    assert server.split == exp.split and list(server.data.answers) == ["G2"]
    model = exp.build_model()
    untimed = lambda entry: {k: v for k, v in entry.items() if k not in TIMING_FIELDS}  # noqa: E731
    assert untimed(server.evaluate(model, "cpu")) == untimed(exp.evaluate(model, "cpu"))
    ours, full = server.baselines(), exp.baselines()
    assert ours["uniform"] == full["uniform"]
    assert full["train_mean"]["alignment"] is not None
    assert ours["train_mean"]["alignment"] is None and "training groups' answers" in ours["train_mean"]["unavailable"]


def test_broken_bundles_fail_with_a_clear_message(run, tmp_path):
    cfg, exp, bundles = run
    good = bundles["G0"].read_bytes()
    cases = {"missing.bundle.safetensors": None, "garbage.bundle.safetensors": b"not a bundle at all",
             "truncated.bundle.safetensors": good[: len(good) // 2],
             "flipped.bundle.safetensors": good[:-10] + bytes([good[-10] ^ 1]) + good[-9:]}
    messages = {"missing": "does not exist", "garbage": "damaged or not a safetensors file",
                "truncated": "damaged", "flipped": "do not match the checksum"}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(BundleError, match=messages[name.split(".")[0]]):
            read_bundle(tmp_path / name)
    save_file({"x": np.zeros((2, 2), np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(BundleError, match="not a PluralLLM bundle"):
        read_bundle(tmp_path / "plain.safetensors")
    with pytest.raises(BundleError, match="embedded with 'minilm', but the run-config says .*embedder='smollm2'"):
        client_app._setup(cfg.replace(embedder="smollm2"), node_context(cfg, {"bundle": str(bundles["G0"])}))
    with pytest.raises(BundleError, match="must be an absolute path"):
        client_app._setup(cfg, node_context(cfg, {"bundle": "bundles/G0.bundle.safetensors"}))
    with pytest.raises(BundleError, match=f"{tmp_path / 'missing.bundle.safetensors'} does not exist"):
        client_app.hosted_groups(reply(0, RecordDict({"config": ConfigRecord({})}), kind="query"),
                                 node_context(cfg, {"bundle": str(tmp_path / "missing.bundle.safetensors")}))


def test_eval_bundles_run_config_is_checked(run):
    cfg, exp, bundles = run
    with pytest.raises(ConfigError, match="absolute paths"):
        cfg.replace(eval_bundles="bundles/G2.bundle.safetensors")
    with pytest.raises(ConfigError, match="training group"):
        prepare_experiment(cfg.replace(eval_bundles=f"{bundles['G2']},{bundles['G0']}", eval_groups=""))
    with pytest.raises(ConfigError, match="'auto' needs the whole dataset"):
        prepare_experiment(cfg.replace(eval_bundles=str(bundles["G2"]), train_groups="auto", eval_groups="auto"))
    server = RunConfig(dataset="opinionqa", eval_bundles=str(bundles["G2"]))  # no data-path needed
    assert server.bundle_paths == [str(bundles["G2"])]
    with pytest.raises(ConfigError, match="eval-bundles' is for deployments"):
        client_app._setup(cfg.replace(eval_bundles=str(bundles["G2"])), node_context(cfg, {"partition-id": 0,
                                                                                           "num-partitions": 1}))


def test_bundle_command(tiny_config, tmp_path, capsys):
    cfg = tiny_config()
    overrides = run_config_arg(cfg)
    assert main(["bundle", "-c", overrides, "--group", "G0", "--group", "G2", "--out-dir", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"eval-bundles='{tmp_path / 'b' / 'G2.bundle.safetensors'}'" in out and "bundle='<its path>'" in out
    assert read_bundle(tmp_path / "b" / "G0.bundle.safetensors").group == "G0"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["G0.bundle.safetensors", "G2.bundle.safetensors"]
    assert main(["bundle", "-c", overrides, "--group", "Atlantis", "--out-dir", str(tmp_path / "b")]) == 2
    assert "not in this run" in capsys.readouterr().err


# ----------------------------------------------------------------------------- TLS


def test_certificates_give_a_verified_tls_connection_to_the_superlink(tmp_path):
    paths = make_certificates(tmp_path / "certs", hosts=["superlink.example.org", "10.1.2.3"])
    other = make_certificates(tmp_path / "other")
    assert oct(paths["key"].stat().st_mode & 0o777) == "0o600"
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths["cert"], paths["key"])
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve():
            for _ in range(3):
                conn, _ = listener.accept()
                try:
                    with server_ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"ok")
                except (ssl.SSLError, OSError):
                    pass
        threading.Thread(target=serve, daemon=True).start()

        def connect(ca, name):
            ctx = ssl.create_default_context(cafile=str(ca))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname=name) as tls:
                    return tls.recv(2)
        assert connect(paths["ca"], "127.0.0.1") == b"ok"
        assert connect(paths["ca"], "superlink.example.org") == b"ok"
        with pytest.raises(ssl.SSLCertVerificationError):
            connect(other["ca"], "127.0.0.1")  # a certificate from another CA is refused
    with pytest.raises(ConfigError, match="exist already"):
        make_certificates(tmp_path / "certs")


# ----------------------------------------------------------------------------- host discovery


@pytest.mark.timeout(60)
def test_rounds_never_wait_forever_and_a_returning_node_is_asked_again(tiny_config, tmp_path, monkeypatch):
    for key in ("_task_id", "_run_id", "_node_id"):  # what a running ServerApp has set when it builds messages
        monkeypatch.setattr(TaskIdentity, key, 1)
    strategy = strategy_for(tiny_config(**{"min-train-nodes": 1, "round-timeout": 1.0}), tmp_path)
    arrays = ArrayRecord(strategy.model.state_dict())
    began = time.monotonic()
    with pytest.raises(NoClientsError, match="only 0 of the 1 required"):
        strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid({}))  # Flower alone would wait for nodes forever
    assert time.monotonic() - began < 10
    grid = FakeGrid({5: ["G0"]})
    assert [m.metadata.dst_node_id for m in strategy.configure_train(1, arrays, ConfigRecord(), grid)] == [5]
    grid.hosting = {}  # the node leaves ...
    with pytest.raises(NoClientsError):
        strategy.discover_hosts(grid, wait=0.5)
    grid.hosting = {5: ["G0"]}  # ... and returns with the same id (as with SuperNode authentication)
    assert [m.metadata.dst_node_id for m in strategy.configure_train(2, arrays, ConfigRecord(), grid)] == [5]
    assert grid.asked == [5, 5]


def test_a_node_that_cannot_say_what_it_hosts_counts_as_a_failed_client(tiny_config, tmp_path, monkeypatch):
    """A SuperNode whose bundle is damaged answers the hosts query with an error: it never trains, and
    every round counts it in client_failures (not only in rounds_with_fewer_clients)."""
    for key in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)
    strategy = strategy_for(tiny_config(**{"min-train-nodes": 1}), tmp_path)
    grid = FakeGrid({1: ["G0"], 3: Error(code=0, reason="BundleError: G3.bundle.safetensors is damaged")})
    strategy.discover_hosts(grid, wait=0)
    assert strategy.hosts == {"G0": 1} and strategy.broken == {3}
    strategy.aggregate_train(1, [train_reply(1, 1.0, 1)])
    assert (strategy.rounds[1]["clients"], strategy.rounds[1]["failures"]) == (1, 1)
    grid.hosting = {1: ["G0"]}  # the broken node leaves: no longer a failure
    strategy.discover_hosts(grid, wait=0)
    strategy.aggregate_train(2, [train_reply(1, 1.0, 1)])
    assert strategy.rounds[2]["failures"] == 0


# ----------------------------------------------------------------------------- processes


class Descendants:
    """Every process started below this one while inside: children, and the processes Flower detaches
    from their parent but starts with `--parent-pid <a process seen here>` (the SuperExec); `left()`
    lists those still running afterwards."""

    def __enter__(self):
        self.seen, self.running = {}, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        me = psutil.Process()
        while self.running:
            for p in me.children(recursive=True) + [p for p in psutil.process_iter() if self._adopted(p)]:
                if p.pid not in self.seen:
                    try:
                        self.seen[p.pid] = (p, " ".join(p.cmdline()[:2]))
                    except psutil.NoSuchProcess:
                        pass
            time.sleep(0.2)

    def _adopted(self, p: psutil.Process) -> bool:
        try:
            command = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False
        if "--parent-pid" not in command[:-1]:
            return False
        parent = command[command.index("--parent-pid") + 1]
        return parent.isdigit() and int(parent) in self.seen

    def commands(self) -> str:
        return " ".join(command for _, command in self.seen.values())

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    def left(self, grace: float = 10.0) -> list[str]:
        deadline = time.monotonic() + grace
        while True:
            alive = []
            for p, command in self.seen.values():
                try:
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{p.pid} {command}")
                except psutil.NoSuchProcess:
                    pass
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)


@pytest.mark.slow
def test_sigterm_stops_every_process_of_a_deployment(run, tmp_path):
    cfg, exp, bundles = run
    handler = signal.getsignal(signal.SIGTERM)
    names = ("flower-superlink", "flower-supernode", "flower-superexec")
    with Descendants() as tree:
        with pytest.raises(KeyboardInterrupt):
            with LocalDeployment(tmp_path / "dep", insecure=True) as deployment:
                deployment.start_superlink()
                deployment.start_supernode("G0", bundles["G0"])
                deployment.wait_for_nodes(1, timeout=90)
                deadline = time.monotonic() + 30  # on a loaded machine the SuperExec may start late
                while not all(name in tree.commands() for name in names) and time.monotonic() < deadline:
                    time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` or a CI runner would
                time.sleep(30)
    assert all(name in tree.commands() for name in names)
    assert tree.left() == []
    assert signal.getsignal(signal.SIGTERM) == handler  # put back


@pytest.mark.slow
def test_deploy_local_end_to_end_over_tls(tiny_config, tmp_path, capsys):
    """The CI deployment: `pluralllm deploy local` with 2 SuperNodes for 2 rounds over 127.0.0.1, TLS on,
    with warm ClientApp starts (the default); the same with `--cold-clientapps` (Flower's own process
    per message) gives byte-identical results and checkpoint."""
    cfg = tiny_config(**{"num-server-rounds": 2, "eval-every": 2})
    overrides = run_config_arg(cfg, leave_out=("min-train-nodes", "round-timeout"))  # the deployment's defaults
    cold = tmp_path / "cold"
    with Descendants() as tree:
        assert main(["deploy", "local", "--groups", "2", "--quiet", "--timeout", "300", "-c", overrides]) == 0
        assert main(["deploy", "local", "--groups", "2", "--quiet", "--timeout", "300", "--cold-clientapps", "-c",
                     run_config_arg(cfg.replace(out_dir=str(cold)), leave_out=("min-train-nodes", "round-timeout"))]) == 0
    assert tree.left() == []
    out = tmp_path / "out"
    results = load_results(out)
    assert results["train_groups"] == ["G0", "G1"] and results["eval_groups"] == ["G2"]
    assert results["config"]["min-train-nodes"] == 1 and results["config"]["round-timeout"] == 120.0
    assert [e["round"] for e in results["history"]] == [0, 2]
    assert results["history"][0]["train_seconds"] < 1  # round 0: nobody trained (waiting for nodes is not training)
    final = results["final"]
    assert final["clients"] == 2 and final["client_failures"] == 0 and final["rounds_with_fewer_clients"] == []
    assert final["heldback_alignment"] is not None and final["gradient_steps"] == 2 * 2 * cfg.local_steps
    assert results["baselines"]["train_mean"]["alignment"] is None
    assert sorted(p.name for p in (out / "deploy-logs").iterdir()) == [
        "clientapp-server.log", "flwr-run.log", "node-G0.log", "node-G1.log", "superlink.log"]
    assert "clientapp-server.log" not in [p.name for p in (cold / "deploy-logs").iterdir()]
    assert without_time(load_results(cold)["history"]) == without_time(results["history"])
    weights = [load_checkpoint(run / LAST_CHECKPOINT)[0] for run in (out, cold)]
    assert {k: v.numpy().tobytes() for k, v in weights[0].items()} == {k: v.numpy().tobytes() for k, v in weights[1].items()}
    assert "--insecure" not in (out / "deploy-logs" / "superlink.log").read_text()
    assert "train-mean, nearest group, context mixture unavailable" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0 and "unavailable" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_killed_and_restarted_supernode_and_a_corrupt_bundle_do_not_stop_the_run(run, tmp_path):
    """Nodes for G0, G1 and G3, where G3's bundle is corrupt; G1 is stopped while it trains in round 1
    and started again. The run completes, and the results say what happened in each round."""
    cfg, exp, bundles = run
    bundles["G3"].write_bytes(b"\x00" * 64)
    cfg = cfg.replace(num_server_rounds=2, heldback_fraction=0.0, min_train_nodes=2, round_timeout=90.0,
                      train_groups="G0,G1,G3", eval_bundles=str(bundles["G2"]))
    lines = []
    with Descendants() as tree:
        with LocalDeployment(tmp_path / "dep", insecure=True) as deployment:
            deployment.start_superlink()
            for group in ("G0", "G1", "G3"):
                deployment.start_supernode(group, bundles[group])
            deployment.wait_for_nodes(3, timeout=90)

            def restart_when_training():
                log = deployment.log_file("G1")
                while "Receiving: train" not in log.read_text():
                    time.sleep(0.2)
                deployment.stop_process("G1")
                deployment.start_supernode("G1", bundles["G1"])
            threading.Thread(target=restart_when_training, daemon=True).start()
            deployment.run(cfg, timeout=300, echo=lines.append)
    assert tree.left() == []
    history = load_results(cfg.out_dir)["history"]
    # G3's node fails every round (its bundle is damaged); G1's in round 1
    assert [(e["round"], e["clients"], e["client_failures"]) for e in history] == [(0, 0, 0), (1, 1, 2), (2, 2, 1)]
    assert history[-1]["rounds_with_fewer_clients"] == [1, 2]  # G3 never took part; G1 missed round 1
    assert any("could not say which groups it hosts" in line and "G3.bundle.safetensors is damaged" in line
               for line in lines)
