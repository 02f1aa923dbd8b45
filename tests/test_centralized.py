"""The centralized trainer, the results contract, checkpoints and the report."""

import pytest

from pluralllm_flwr.centralized import train_centralized
from pluralllm_flwr.cli import main
from pluralllm_flwr.experiment import prepare_experiment
from pluralllm_flwr.report import write_report
from pluralllm_flwr.results import TIMING_FIELDS, load_checkpoint, load_results

CONTRACT = {"method", "dataset", "embedder", "seed", "config", "train_groups", "eval_groups", "baselines",
            "history", "best", "final"}
ENTRY = {"round", "gradient_steps", "wall_seconds", "alignment", "per_group", "fairness"}


def without_time(history):
    return [{k: v for k, v in e.items() if k not in TIMING_FIELDS} for e in history]


def test_centralized_writes_the_results_contract(tiny_config):
    cfg = tiny_config()
    writer = train_centralized(cfg, progress=False)
    results = load_results(cfg.out_dir)
    assert CONTRACT <= set(results) and results["method"] == "centralized"
    assert [e["round"] for e in results["history"]] == [0, 1, 2, 3]
    assert [e["gradient_steps"] for e in results["history"]] == [0, 1, 2, 3]  # one step per epoch
    for entry in results["history"]:
        assert ENTRY <= set(entry) and set(entry["per_group"]) == {"G2"}
        assert {"jain", "cov", "worst"} <= set(entry["fairness"])
    assert results["best"]["alignment"] == max(e["alignment"] for e in results["history"])
    assert set(results["baselines"]) == {"uniform", "train_mean", "nearest_group", "context_mixture"}
    assert 0 < results["baselines"]["train_mean"]["coverage"] <= 1
    state, meta = load_checkpoint(writer.out_dir / "best.safetensors")
    assert meta["embedder"] == "minilm" and meta["embedding_dim"] == 384 and meta["model_config"]["d_model"] == 16
    assert meta["round"] == results["best"]["round"] and meta["train_groups"] == ["G0", "G1", "G3", "G4"]
    assert set(state) == set(prepare_experiment(cfg, progress=False).build_model().state_dict())


def test_compute_matched_sees_the_federated_number_of_episodes(tiny_config):
    cfg = tiny_config(**{"num-server-rounds": 2})
    results = train_centralized(cfg, compute_matched=True, progress=False).results
    per_round = cfg.local_steps  # epochs holding as many episodes as a federated round (4 groups x local-steps)
    assert [e["round"] for e in results["history"]] == [0, 1, 2, per_round, 2 * per_round]  # 1, 2: epochs = rounds
    assert [e["episodes"] for e in results["history"]] == [0, 4, 8, 4 * per_round, 8 * per_round]
    assert results["method"] == "centralized-matched"
    assert all(0 <= e["train_seconds"] <= e["wall_seconds"] and e["eval_seconds"] > 0 for e in results["history"])


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_config, tmp_path):
    runs = [train_centralized(tiny_config(seed=s, **{"out-dir": str(tmp_path / f"r{i}")}), progress=False).results
            for i, s in enumerate([1, 1, 2])]
    assert without_time(runs[0]["history"]) == without_time(runs[1]["history"])
    assert without_time(runs[0]["history"]) != without_time(runs[2]["history"])


def test_report_plots_and_table(tiny_config, tmp_path):
    dirs = []
    for seed in (1, 2):
        cfg = tiny_config(seed=seed, **{"out-dir": str(tmp_path / f"s{seed}")})
        train_centralized(cfg, progress=False)
        dirs.append(cfg.out_dir)
    assert main(["report", *dirs, "--out", str(tmp_path / "rep")]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| centralized | 2 |" in report and "train-mean baseline" in report and "context mixture baseline" in report and "## Alignment against context size" in report and "| G2 |" in report
    for name in ("alignment_vs_rounds.png", "alignment_vs_steps.png", "per_group.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 5000


def test_report_refuses_incomparable_runs(tiny_config, tmp_path):
    a = tiny_config(**{"out-dir": str(tmp_path / "a"), "num-server-rounds": 1})
    b = tiny_config(**{"out-dir": str(tmp_path / "b"), "num-server-rounds": 1, "eval-groups": "G3",
                       "train-groups": "G0,G1,G2,G4"})
    for cfg in (a, b):
        train_centralized(cfg, progress=False)
    with pytest.raises(ValueError, match="differs from"):
        write_report([a.out_dir, b.out_dir], tmp_path / "rep")


def test_results_of_a_missing_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
