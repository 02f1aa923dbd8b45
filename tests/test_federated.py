"""The Flower side: aggregation, the ClientApp's train/evaluate, FedProx, and a real `flwr run`."""
import csv
import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from pluralllm_flwr import client_app
from pluralllm_flwr.experiment import prepare_experiment
from pluralllm_flwr.results import TIMING_FIELDS, ResultsWriter
from pluralllm_flwr.strategies import UNIT_WEIGHT, NoClientsError, build_strategy


def reply(node: int, content: RecordDict | None = None, error: Error | None = None, kind: str = "train"):
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                    group_id="1", created_at=0.0, ttl=60.0, message_type=kind)
    return make_message(meta, content, error)


def train_reply(node: int, value: float, n: int):
    arrays = ArrayRecord([np.full(2, value, np.float32)])
    metrics = MetricRecord({"train-loss": value, "num-examples": n, UNIT_WEIGHT: 1, "local-steps": 3})
    return reply(node, RecordDict({"arrays": arrays, "metrics": metrics}))


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


def call_client(function, cfg, exp, group, config: dict, node_config=None):
    model = exp.build_model()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"lr": cfg.lr, "local-steps": cfg.local_steps, "server-round": 1,
                                                  "group": group, **config})})
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


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_flwr_run_simulation_end_to_end(tiny_config, tmp_path, strategy):
    from pluralllm_flwr.cli import main

    cfg = tiny_config(strategy=strategy, **{"proximal-mu": 0.1})
    overrides = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                         for k, v in cfg.to_mapping().items())
    assert main(["simulate", "--quiet", "--num-supernodes", "3", "--timeout", "400", "--run-config", overrides]) == 0
    out = tmp_path / "out"
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


@pytest.mark.slow
def test_same_seed_same_metrics_whatever_the_node_layout(tiny_config, tmp_path):
    """Two simulations with one seed, on 4 and on 2 virtual SuperNodes (so replies arrive from other
    processes in another order), give identical per-round metrics."""
    from pluralllm_flwr.results import load_results
    from pluralllm_flwr.simulation import simulate

    histories = []
    for nodes in (4, 2):
        cfg = tiny_config(**{"out-dir": str(tmp_path / f"n{nodes}"), "num-server-rounds": 2})
        simulate(cfg, nodes, timeout=400, echo=lambda line: None)
        histories.append([{k: v for k, v in e.items() if k not in TIMING_FIELDS}
                          for e in load_results(cfg.out_dir)["history"]])
    assert histories[0] == histories[1]
