"""The Flower side: aggregation, the ClientApp's train/evaluate, FedProx, and a real `flwr run`."""
import csv
import json
import re
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.supercore.task_identity import TaskIdentity

from pluralllm_flwr import client_app
from pluralllm_flwr.experiment import prepare_experiment
from pluralllm_flwr.config import ConfigError, RunConfig, read_batch
from pluralllm_flwr.grid import (LOCAL_PULL_INTERVAL, REMOTE_PULL_INTERVAL, RUN_CONFIG, PromptGrid, RunGrid,
                                 prompt_grid)
from pluralllm_flwr.results import ResultsWriter

from pluralllm_flwr.strategies import CONTROL, CORRECTION, UNIT_WEIGHT, NoClientsError, build_strategy

from .conftest import without_time


def reply(node: int, content: RecordDict | None = None, error: Error | None = None, kind: str = "train", to: str = "x"):
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=to,
                    group_id="1", created_at=0.0, ttl=60.0, message_type=kind)
    return make_message(meta, content, error)


def train_reply(node: int, value: float, n: int):
    arrays = ArrayRecord([np.full(2, value, np.float32)])
    metrics = MetricRecord({"train-loss": value, "num-examples": n, UNIT_WEIGHT: 1, "local-steps": 3})
    return reply(node, RecordDict({"arrays": arrays, "metrics": metrics}))


class FakeGrid:
    """Nodes that answer the hosted-groups query; `hosting` (node id -> groups) may change."""

    def __init__(self, hosting: dict[int, list[str]]):
        self.hosting, self.asked = hosting, []

    def get_node_ids(self):
        return list(self.hosting)

    def send_and_receive(self, messages, timeout=None):
        """Each node's groups, or its error (an `Error` in place of its groups)."""
        self.asked += [m.metadata.dst_node_id for m in messages]
        answers = [(m.metadata.dst_node_id, self.hosting[m.metadata.dst_node_id]) for m in messages]
        return [reply(n, error=a, kind="query") if isinstance(a, Error) else
                reply(n, RecordDict({"hosted": ConfigRecord({"groups": a})}), kind="query") for n, a in answers]


def strategy_for(cfg, tmp_path):
    exp = prepare_experiment(cfg, progress=False)
    strategy = build_strategy(cfg)
    strategy.setup(cfg, exp, ResultsWriter(tmp_path / "r", "t", cfg, exp.split.train, exp.split.eval, {}), "cpu")
    return strategy


@pytest.mark.parametrize("weighting, expected", [("num-examples", 2.5), ("uniform", 2.0)])
def test_aggregation_on_known_arrays(tiny_config, tmp_path, weighting, expected):
    strategy = strategy_for(tiny_config(weighting=weighting), tmp_path)
    arrays, metrics = strategy.aggregate_train(1, [train_reply(1, 1.0, 1), train_reply(2, 3.0, 3)])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [expected, expected])
    assert strategy.gradient_steps == 6
    assert strategy.rounds[1] == {"clients": 2, "failures": 0, "failed_groups": [], "train_loss": expected}


def test_failed_client_is_skipped_and_counted_and_all_failed_stops(tiny_config, tmp_path):
    strategy = strategy_for(tiny_config(), tmp_path)
    failed = reply(3, error=Error(code=0, reason="Traceback ...\nValueError: bundle missing"))
    arrays, _ = strategy.aggregate_train(1, [train_reply(1, 1.0, 1), failed])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [1.0, 1.0])
    assert strategy.rounds[1]["failures"] == 1
    with pytest.raises(NoClientsError, match="round 2: no client succeeded.*ValueError: bundle missing"):
        strategy.aggregate_train(2, [failed])


def test_fedavgm_steps_on_the_averaged_update_with_momentum(tiny_config, tmp_path):
    strategy = strategy_for(tiny_config(strategy="fedavgm", **{"server-lr": 2.0, "server-momentum": 0.5}), tmp_path)
    strategy.current_arrays = ArrayRecord([np.zeros(2, np.float32)])  # as configure_train sets it
    arrays, _ = strategy.aggregate_train(1, [train_reply(1, 1.0, 1), train_reply(2, 1.0, 1)])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [2.0, 2.0])  # 0 + 2 * (1 - 0)
    arrays, _ = strategy.aggregate_train(2, [train_reply(1, 3.0, 1), train_reply(2, 3.0, 1)])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [5.0, 5.0])  # 2 + 2 * (0.5 * 1 + 1)


def test_lr_schedule_scales_the_clients_lr_and_an_adaptive_server_step(tiny_config, tmp_path, monkeypatch):
    from pluralllm_flwr.training import lr_factor

    for key in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)
    cfg = tiny_config(strategy="fedadam", **{"server-lr": 0.01, "num-server-rounds": 4})
    strategy = strategy_for(cfg, tmp_path)
    messages = strategy.configure_train(3, ArrayRecord(strategy.model.state_dict()), ConfigRecord({"lr": cfg.lr}),
                                        FakeGrid({5: ["G0", "G1", "G3", "G4"]}))
    factor = lr_factor(2, 4, "cosine", 0)
    assert 0 < factor < 1
    assert strategy.eta == pytest.approx(0.01 * factor)
    assert len(messages) == 4 and all(m.content["config"]["lr"] == pytest.approx(cfg.lr * factor) for m in messages)


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi"])
def test_adaptive_server_step_is_normalised(tiny_config, tmp_path, strategy):
    """The server moves each weight toward the average by about server-lr, however small the update
    (which is what lets the groups' small common update through)."""
    moves = []
    for update in (1.0, 10.0):  # both well above tau (1e-3), which damps smaller ones
        s = strategy_for(tiny_config(strategy=strategy, **{"server-lr": 0.01}), tmp_path)
        s.current_arrays = {k: v.numpy() for k, v in ArrayRecord([np.zeros(2, np.float32)]).items()}
        arrays, _ = s.aggregate_train(1, [train_reply(1, update, 1), train_reply(2, update, 1)])
        moves.append(float(arrays.to_numpy_ndarrays()[0][0]))
    assert 0 < moves[0] <= 0.011 and moves[0] == pytest.approx(moves[1], rel=0.02)


@pytest.mark.parametrize("q", [0.0, 1.0])
def test_qfedavg_weights_groups_by_their_loss_to_the_power_q(tiny_config, tmp_path, q):
    """q-FFL's step w - Σ F^q·L(w - w_k) / Σ (q·F^(q-1)·‖L(w - w_k)‖² + L·F^q), from the paper, against
    Flower's; q = 0 is the uniform mean whatever the groups' sizes. Here train-loss = the value sent."""
    lr = 0.5
    s = strategy_for(tiny_config(strategy="qfedavg", lr=lr, **{"qfedavg-q": q}), tmp_path)
    s.current_arrays = ArrayRecord([np.zeros(2, np.float32)])  # as configure_train sets it
    arrays, _ = s.aggregate_train(1, [train_reply(1, 1.0, 1), train_reply(2, 3.0, 3)])
    L, deltas, hs = 1 / lr, [], []
    for value in (1.0, 3.0):  # loss F_k = value, local weights = value, global = 0
        grad = L * (0.0 - np.full(2, value))
        deltas.append(value ** q * grad)
        hs.append(q * value ** (q - 1) * float(grad @ grad) + L * value ** q)
    expected = 0.0 - sum(deltas) / sum(hs)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], expected, rtol=1e-6)
    if q == 0:
        np.testing.assert_allclose(expected, [2.0, 2.0])


def test_server_tau_sets_the_smallest_update_an_adaptive_server_step_normalises(tiny_config, tmp_path):
    """An update far below tau barely moves the weights; with server-tau below it, it moves them by about server-lr
    (one SGD step's update is this small: the gradient itself)."""
    moves = []
    for tau in (1e-3, 1e-9):
        s = strategy_for(tiny_config(strategy="fedadam", **{"server-lr": 0.01, "server-tau": tau}), tmp_path)
        s.current_arrays = {k: v.numpy() for k, v in ArrayRecord([np.zeros(2, np.float32)]).items()}
        arrays, _ = s.aggregate_train(1, [train_reply(1, 1e-5, 1), train_reply(2, 1e-5, 1)])
        moves.append(float(arrays.to_numpy_ndarrays()[0][0]))
    assert moves[1] == pytest.approx(0.01 * np.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2), rel=0.02)  # Flower's eta_norm
    assert 0 < moves[0] < 0.05 * moves[1]


def test_scaffold_server_averages_the_controls_and_sends_each_group_its_correction(tiny_config, tmp_path, monkeypatch):
    for key in ("_task_id", "_run_id", "_node_id"):  # what a running ServerApp has set when it builds messages
        monkeypatch.setattr(TaskIdentity, key, 1)
    strategy = strategy_for(tiny_config(strategy="scaffold"), tmp_path)
    names, arrays = list(strategy.control), ArrayRecord(strategy.model.state_dict())

    def with_control(node: int, value: float, n: int):
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"train-loss": 1.0, "num-examples": n,
                                                                         UNIT_WEIGHT: 1, "local-steps": 3}),
                              CONTROL: ArrayRecord({k: Array(np.full(v.shape, value, np.float32))
                                                    for k, v in strategy.control.items()})})
        return reply(node, content, to=f"m{node}")

    strategy.sent = [(reply(1, RecordDict()), "G0"), (reply(2, RecordDict()), "G1")]  # as configure_train records them (ids m1, m2)
    strategy.aggregate_train(1, [with_control(1, 1.0, 1), with_control(2, 4.0, 3)])
    np.testing.assert_allclose(strategy.control[names[0]], 3.25)  # (1·1 + 3·4) / 4
    grid = FakeGrid({5: ["G0", "G1", "G3", "G4"]})
    corrections = {m.content["config"]["group"]: m.content[CORRECTION][names[0]].numpy()
                   for m in strategy.configure_train(2, arrays, ConfigRecord(), grid)}
    np.testing.assert_allclose(corrections["G0"], 2.25)  # c − c_G0
    np.testing.assert_allclose(corrections["G1"], -0.75)
    np.testing.assert_allclose(corrections["G3"], 3.25)  # no control yet: c − 0


def test_scaffold_client_reports_its_gradient_and_applies_the_correction(tiny_config):
    """One local step: a correction equal to minus the reported gradient cancels the step exactly."""
    cfg = tiny_config(strategy="scaffold", **{"local-steps": 1})
    exp = prepare_experiment(cfg, progress=False)
    names = [n for n, _ in exp.build_model().named_parameters()]
    zero = ArrayRecord({n: Array(np.zeros(p.shape, np.float32)) for n, p in exp.build_model().named_parameters()})
    model, out = call_client(client_app.train, cfg, exp, "G0", {}, records={CORRECTION: zero})
    gradient = out.content[CONTROL]
    assert set(gradient) == set(names) and any(np.abs(gradient[n].numpy()).max() > 0 for n in names)
    moved = out.content["arrays"].to_torch_state_dict()
    start = model.state_dict()
    assert any(not np.allclose(moved[n], start[n]) for n in names)
    cancel = ArrayRecord({n: Array(-gradient[n].numpy()) for n in names})
    model, out = call_client(client_app.train, cfg, exp, "G0", {}, records={CORRECTION: cancel})
    kept, start = out.content["arrays"].to_torch_state_dict(), model.state_dict()
    assert all(np.allclose(kept[n], start[n], atol=1e-6) for n in names)


def call_client(function, cfg, exp, group, config: dict, node_config=None, records: dict | None = None):
    model = exp.build_model()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"lr": cfg.lr, "local-steps": cfg.local_steps, "server-round": 1,
                                                  "group": group, **config}), **(records or {})})
    message = reply(0, content, kind="train")
    context = Context(run_id=1, node_id=7, node_config=node_config or {"partition-id": 0, "num-partitions": 1},
                      state=RecordDict(), run_config=cfg.to_mapping())
    return model, function(message, context)


def drift(cfg, exp, mu: float) -> float:
    start, out = call_client(client_app.train, cfg, exp, "G0", {"proximal-mu": mu} if mu else {})
    new = out.content["arrays"].to_torch_state_dict()
    return float(sum(((new[k] - v) ** 2).sum() for k, v in start.state_dict().items()))


def test_fedprox_term_keeps_the_client_near_the_global_model(tiny_config):
    cfg = tiny_config(strategy="fedprox", **{"local-steps": 8})
    exp = prepare_experiment(cfg, progress=False)
    assert drift(cfg, exp, 50.0) < 0.5 * drift(cfg, exp, 0.0)


def test_client_replies_carry_only_arrays_and_scalar_metrics(tiny_config):
    cfg = tiny_config()
    exp = prepare_experiment(cfg, progress=False)
    model, out = call_client(client_app.train, cfg, exp, "G1", {})
    assert set(out.content.keys()) == {"arrays", "metrics"}
    assert set(out.content["arrays"].keys()) == set(model.state_dict())
    metrics = dict(out.content["metrics"])
    assert metrics["num-examples"] == len(exp.question_ids("G1", "train"))
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    _, evaluated = call_client(client_app.evaluate, cfg, exp, "G1", {})
    assert set(evaluated.content.keys()) == {"metrics"}
    assert 0 < evaluated.content["metrics"]["heldback-alignment"] <= 1


def test_the_client_trains_the_run_its_message_names(tiny_config):
    """In a batch (several runs in one Flower run) the node's run-config is not the message's run:
    the ClientApp uses the run-config the ServerApp stamped on the message (grid.RunGrid)."""
    cfg = tiny_config()
    exp = prepare_experiment(cfg, progress=False)
    other = cfg.replace(seed=5)
    _, plain = call_client(client_app.app, cfg, exp, "G0", {})  # through the app, so its mods run
    _, stamped = call_client(client_app.app, cfg, exp, "G0", {},
                             records={RUN_CONFIG: ConfigRecord(other.to_mapping())})
    _, direct = call_client(client_app.app, other, exp, "G0", {})
    trained = [m.content["arrays"].to_torch_state_dict() for m in (plain, stamped, direct)]
    assert all(torch.equal(trained[1][k], trained[2][k]) for k in trained[1])  # the stamped run's seed
    assert not all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


def test_run_grid_stamps_every_message_it_sends(monkeypatch):
    for key in ("_task_id", "_run_id", "_node_id"):  # what a running ServerApp has set when it builds messages
        monkeypatch.setattr(TaskIdentity, key, 1)

    class Recorder(FakeGrid):
        def push_messages(self, messages):
            self.pushed = list(messages)
            return []
    inner = Recorder({5: ["G0"]})
    grid = RunGrid(inner, {"seed": 3, "dataset": "opinionqa"})
    message = Message(RecordDict({"config": ConfigRecord({"group": "G0"})}), dst_node_id=5, message_type="query")
    grid.send_and_receive([message])
    grid.push_messages([Message(RecordDict(), dst_node_id=5, message_type="train")])
    assert dict(message.content[RUN_CONFIG]) == {"seed": 3, "dataset": "opinionqa"}
    assert dict(inner.pushed[0].content[RUN_CONFIG])["seed"] == 3
    assert list(grid.get_node_ids()) == [5]  # the rest is the wrapped grid's


def test_a_bad_batch_is_refused_naming_the_run(tmp_path):
    path = tmp_path / "batch.json"
    cases = [("not json", "cannot read a JSON list"), ("[]", "non-empty JSON list"),
             (json.dumps([{"out-dir": "/a"}, {"out-dir": "/b", "lr": -1}]), "run 1: run-config 'lr' must be positive"),
             (json.dumps([{"seed": 1}]), "run 0: needs its own 'out-dir'"),
             (json.dumps([{"out-dir": "/a"}, {"out-dir": "/a"}]), "same out-dir")]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            read_batch(path)
    with pytest.raises(ConfigError, match="absolute path"):
        RunConfig(batch="batch.json")


STRATEGIES_E2E = ("fedavg", "fedprox", "scaffold")


@pytest.mark.slow
def test_a_batch_in_one_flower_run_equals_separate_runs_whatever_the_node_layout(tiny_config, tmp_path):
    """FedAvg, FedProx and SCAFFOLD as one batch in one Flower simulation on 4 virtual SuperNodes:
    each run writes the whole results contract. SCAFFOLD (the batch's last run) again, alone through
    `pluralllm simulate` on 2 nodes (so replies come from other processes in another order), gives
    identical per-round metrics: a batch changes no number, and neither does the node layout."""
    from pluralllm_flwr.cli import main
    from pluralllm_flwr.results import load_results
    from pluralllm_flwr.simulation import simulate_batch

    cfgs = [tiny_config(strategy=s, **{"proximal-mu": 0.1, "out-dir": str(tmp_path / s)}) for s in STRATEGIES_E2E]
    lines = []
    simulate_batch(cfgs, 4, timeout=600, echo=lines.append)
    assert sum("PluralLLM batch: run" in line for line in lines) == 3
    for strategy in STRATEGIES_E2E:
        out = tmp_path / strategy
        results = json.loads((out / "results.json").read_text())
        assert [e["round"] for e in results["history"]] == [0, 1, 2, 3]
        assert results["method"] == strategy and results["train_groups"] == ["G0", "G1", "G3", "G4"]
        assert results["history"][-1]["clients"] == 4 and results["history"][-1]["gradient_steps"] == 3 * 4 * 3
        assert results["history"][-1]["alignment"] != results["history"][0]["alignment"]  # the model was trained
        assert results["final"] == results["history"][-1]
        with open(out / "history.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 4 and "group:G2" in rows[0] and "fairness_jain" in rows[0]
        assert (out / "best.safetensors").is_file() and (out / "last.safetensors").is_file()
    methods = {json.loads((tmp_path / s / "results.json").read_text())["history"][-1]["alignment"] for s in STRATEGIES_E2E}
    assert len(methods) == 3  # each run trained its own strategy, not the Flower run's default

    alone = cfgs[-1].replace(out_dir=str(tmp_path / "alone"))
    overrides = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                         for k, v in alone.to_mapping().items())
    assert main(["simulate", "--quiet", "--num-supernodes", "2", "--timeout", "400", "--run-config", overrides]) == 0
    histories = [without_time(load_results(path)["history"]) for path in (cfgs[-1].out_dir, alone.out_dir)]
    assert histories[0] == histories[1]


class SlowLink:
    """A grid whose reply to message i is ready `delays[i]` seconds after the push."""

    def __init__(self, delays):
        self.delays, self.pulls = delays, 0

    def push_messages(self, messages):
        self.pushed = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        ready = [i for i in ids if time.monotonic() - self.pushed >= self.delays[int(i[1:])]]
        return [reply(int(i[1:]), RecordDict(), to=i) for i in ready]


def test_prompt_grid_returns_once_the_last_reply_arrives_and_keeps_the_timeout():
    messages = [reply(i, RecordDict()) for i in range(3)]
    link = SlowLink([0.1, 0.3, 0.5])
    start = time.monotonic()
    replies = PromptGrid(link, interval=0.05).send_and_receive(messages, timeout=10)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert 0.5 <= time.monotonic() - start < 1.5  # Flower's HttpGrid would sleep 3 s between pulls
    start = time.monotonic()
    late = PromptGrid(SlowLink([0.0, 60.0]), interval=0.05).send_and_receive(messages[:2], timeout=0.4)
    assert [r.metadata.reply_to_message_id for r in late] == ["m0"] and time.monotonic() - start < 1.5


def test_prompt_grid_pulls_a_simulations_in_process_state_more_often_than_a_superlink():
    from flwr.superlink.grid import InMemoryGrid

    assert prompt_grid(InMemoryGrid.__new__(InMemoryGrid)).interval == LOCAL_PULL_INTERVAL < REMOTE_PULL_INTERVAL
    assert prompt_grid(FakeGrid({5: ["G0"]})).interval == REMOTE_PULL_INTERVAL


def test_a_process_reusing_its_model_trains_exactly_as_a_fresh_one(tiny_config):
    """The ClientApp builds its predictor once per process (client_app._model) and loads each message's
    weights into it: replies stay byte-identical to those of a freshly built model, whatever ran before."""
    cfg = tiny_config()
    exp = prepare_experiment(cfg, progress=False)
    client_app._model.cache_clear()
    _, first = call_client(client_app.app, cfg, exp, "G0", {})
    call_client(client_app.app, cfg, exp, "G1", {"server-round": 2})
    _, again = call_client(client_app.app, cfg, exp, "G0", {})
    client_app._model.cache_clear()
    _, fresh = call_client(client_app.app, cfg, exp, "G0", {})
    arrays = [m.content["arrays"] for m in (first, again, fresh)]
    for key in arrays[0]:
        assert arrays[0][key].data == arrays[1][key].data == arrays[2][key].data


def test_a_reward_request_names_the_nodes_that_could_not_say_what_they_host(monkeypatch):
    from pluralllm_flwr.reward import RewardModelError
    from pluralllm_flwr.reward_queries import _find_hosts

    for key in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)
    grid = FakeGrid({1: ["G0"], 3: Error(code=0, reason="BundleError: G3.bundle.safetensors is damaged")})
    assert _find_hosts(grid, ["G0"], wait=0) == {"G0": 1}
    with pytest.raises(RewardModelError, match=r"no node hosts \['G3'\].*3: 'BundleError: G3.bundle"):
        _find_hosts(grid, ["G0", "G3"], wait=0)
