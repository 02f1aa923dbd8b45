"""Differential privacy (Flower's fixed-clipping wrappers + RDP accounting) and resuming a run."""
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from pluralllm_flwr import client_app
from pluralllm_flwr.config import ConfigError, RunConfig
from pluralllm_flwr.experiment import prepare_experiment
from pluralllm_flwr.grid import RUN_CONFIG
from pluralllm_flwr.results import LAST_CHECKPOINT, ResultsWriter, load_results
from pluralllm_flwr.simulation import simulate
from pluralllm_flwr.strategies import build_strategy, with_privacy

from .test_federated import reply, strategy_for, train_reply

DP = {"dp": "client", "weighting": "uniform", "dp-clip": 0.5, "dp-noise": 0.8}


@pytest.mark.parametrize("changes, message", [
    ({"dp": "client"}, "needs weighting='uniform'"),
    ({"dp": "server", "weighting": "uniform", "strategy": "fedmedian"}, "mean-based strategy"),
    ({"dp": "server", "weighting": "uniform", "dp-noise": 0.0}, "dp-noise > 0"),
    ({"dp": "laplace"}, "'dp' must be one of"),
    ({"resume": True}, "resume=true needs 'out-dir'"),
])
def test_privacy_and_resume_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(changes)


def test_with_privacy_picks_flowers_wrapper():
    for mode, wrapper in (("client", DifferentialPrivacyClientSideFixedClipping),
                          ("server", DifferentialPrivacyServerSideFixedClipping)):
        cfg = RunConfig.from_mapping({**DP, "dp": mode})
        runner = with_privacy(cfg, build_strategy(cfg), 4)
        assert isinstance(runner, wrapper) and runner.clipping_norm == 0.5 and runner.noise_multiplier == 0.8
    plain = build_strategy(RunConfig())
    assert with_privacy(RunConfig(), plain, 4) is plain


def test_server_side_clipping_bounds_each_update_and_counts_epsilon(tiny_config, tmp_path):
    cfg = tiny_config(**{**DP, "dp": "server", "dp-noise": 1e-6})
    strategy = strategy_for(cfg, tmp_path)
    runner = with_privacy(cfg, strategy, 2)
    runner.current_arrays = ArrayRecord([np.zeros(2, np.float32)])
    arrays, _ = runner.aggregate_train(1, [train_reply(1, 10.0, 1), train_reply(2, -3.0, 1)])
    update = arrays.to_numpy_ndarrays()[0]
    # each update is clipped to norm 0.5 before averaging: (0.5 - 0.5) / 2 per coordinate
    np.testing.assert_allclose(update, [0.0, 0.0], atol=1e-4)
    assert strategy.accountant.get_privacy_spent().num_releases == 1


def test_client_side_clipping_mod_runs_when_the_server_asks(tiny_config):
    cfg = tiny_config(**{**DP, "local-steps": 5, "lr": 0.05})
    exp = prepare_experiment(cfg, progress=False)
    start = exp.build_model().state_dict()
    drift = {}
    for clip in (None, 0.01):
        config = {"lr": cfg.lr, "local-steps": cfg.local_steps, "server-round": 1, "group": "G0"}
        if clip:
            config[KEY_CLIPPING_NORM] = clip
        # stamped with its run's config, as the ServerApp's RunGrid sends every message
        message = reply(0, RecordDict({"arrays": ArrayRecord(start), "config": ConfigRecord(config),
                                       RUN_CONFIG: ConfigRecord(cfg.to_mapping())}))
        context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 1},
                          state=RecordDict(), run_config=cfg.to_mapping())
        out = client_app.app(message, context)  # through the ClientApp, so its mods run
        new = out.content["arrays"].to_torch_state_dict()
        drift[clip] = float(sum(((new[k] - v) ** 2).sum() for k, v in start.items()) ** 0.5)
    assert drift[None] > 0.05 and drift[0.01] == pytest.approx(0.01, rel=1e-3)


@pytest.mark.slow
def test_dp_simulation_records_epsilon(tiny_config):
    cfg = tiny_config(**DP, **{"num-server-rounds": 2})
    simulate(cfg, 2, timeout=400, echo=lambda line: None)
    history = load_results(cfg.out_dir)["history"]
    assert [e["dp_releases"] for e in history] == [0, 1, 2]
    assert 0 < history[1]["epsilon"] < history[2]["epsilon"]
    from pluralllm_flwr.report import write_report

    write_report([cfg.out_dir], cfg.out_dir)
    assert (Path(cfg.out_dir) / "alignment_vs_epsilon.png").stat().st_size > 5000


def test_resume_errors_are_clear(tiny_config, tmp_path):
    cfg = tiny_config(**{"out-dir": str(tmp_path / "run"), "lr-schedule": "constant"})
    with pytest.raises(ValueError, match="cannot resume from .*no results.json"):
        ResultsWriter.resume(cfg.out_dir, cfg)
    exp = prepare_experiment(cfg, progress=False)
    writer = ResultsWriter(cfg.out_dir, "fedavg", cfg, exp.split.train, exp.split.eval, {}, exp.checkpoint_metadata())
    writer.record({"round": 1, "gradient_steps": 3, "alignment": 0.5}, exp.build_model().state_dict())
    (writer.out_dir / LAST_CHECKPOINT).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot resume from"):
        ResultsWriter.resume(cfg.out_dir, cfg)
    train_once = tiny_config(**{"out-dir": str(tmp_path / "run"), "lr": 0.5, "lr-schedule": "constant"})
    writer.record({"round": 1, "gradient_steps": 3, "alignment": 0.5}, exp.build_model().state_dict())
    with pytest.raises(ValueError, match=r"run-config differs from the stopped run in \['lr'\]"):
        ResultsWriter.resume(cfg.out_dir, train_once)
    with pytest.raises(ValueError, match="already reached round 1"):
        ResultsWriter.resume(cfg.out_dir, cfg.replace(num_server_rounds=1))
    cosine = cfg.replace(lr_schedule="cosine", out_dir=str(tmp_path / "cosine"))
    ResultsWriter(cosine.out_dir, "fedavg", cosine, exp.split.train, exp.split.eval, {}, exp.checkpoint_metadata()).record(
        {"round": 1, "gradient_steps": 3, "alignment": 0.5}, exp.build_model().state_dict())
    with pytest.raises(ValueError, match="its cosine learning-rate schedule ran over 3 rounds"):
        ResultsWriter.resume(cosine.out_dir, cosine.replace(num_server_rounds=5))
    assert ResultsWriter.resume(cosine.out_dir, cosine)[2] == 1  # an interrupted run of the same length resumes
