"""The centralized trainer, the results contract, checkpoints and the report."""

import pytest

from pluralllm_flwr.centralized import train_centralized
from pluralllm_flwr.cli import main
from pluralllm_flwr.experiment import prepare_experiment
from pluralllm_flwr.report import write_report
from pluralllm_flwr.results import load_checkpoint, load_results

from .conftest import without_time

CONTRACT = {"method", "dataset", "embedder", "seed", "config", "train_groups", "eval_groups", "baselines",
            "history", "best", "final"}
ENTRY = {"round", "gradient_steps", "wall_seconds", "alignment", "per_group", "fairness"}


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


def test_saving_checkpoints_is_not_training_time(tmp_path, monkeypatch):
    """A run evaluated every round saves a checkpoint every round; train_seconds leaves that out."""
    import time

    import torch

    from pluralllm_flwr import results as results_module
    from pluralllm_flwr.config import RunConfig

    monkeypatch.setattr(results_module, "save_checkpoint", lambda *args: time.sleep(0.3))
    writer = results_module.ResultsWriter(tmp_path / "run", "fedavg", RunConfig(), ["a"], ["b"], {})
    for round_ in (0, 1):
        writer.record({"round": round_, "gradient_steps": round_, "alignment": 0.5}, {"w": torch.zeros(1)})
    second = writer.history[1]
    assert second["wall_seconds"] >= 0.6  # two saves (last and best) of 0.3 s each came before it
    assert second["train_seconds"] < 0.2


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


@pytest.mark.parametrize("matched", [False, True])
def test_centralized_resume_continues_with_the_same_numbers(tiny_config, tmp_path, matched):
    """As the simulation's resume: a run of 2 rounds resumed to 4 equals an uninterrupted run of 4 (the
    optimizer's and the episode streams' states travel with the checkpoint), and keeps its history."""
    whole = tiny_config(**{"out-dir": str(tmp_path / "whole"), "num-server-rounds": 4, "eval-every": 2,
                           "lr-schedule": "constant", "episode-sampler": "same-questions" if matched else "independent"})
    train_centralized(whole, compute_matched=matched, progress=False)
    part = whole.replace(out_dir=str(tmp_path / "part"), num_server_rounds=2)
    train_centralized(part, compute_matched=matched, progress=False)
    before = load_results(part.out_dir)["history"]
    resumed = train_centralized(part.replace(num_server_rounds=4, resume=True), compute_matched=matched,
                                progress=False).results
    assert resumed["history"][:len(before)] == before and resumed["config"]["resume"] is True
    # matched: the 4-round run also evaluates at round 4, the 2-round one did not, so its next train_loss
    # averages other steps; every other number must agree
    skip = {"train_loss"} if matched else set()
    ours, theirs = ({e["round"]: {k: v for k, v in e.items() if k not in skip}
                     for e in without_time(load_results(c.out_dir)["history"])} for c in (part, whole))
    assert list(ours)[-1] == list(theirs)[-1] == 4 * (whole.local_steps if matched else 1)
    common = [r for r in ours if r in theirs]
    assert len(common) >= 3 and [ours[r] for r in common] == [theirs[r] for r in common]
    with pytest.raises(ValueError, match="already reached round .*finished"):
        train_centralized(part.replace(num_server_rounds=4, resume=True), compute_matched=matched, progress=False)


def test_a_run_directory_is_never_overwritten_unasked(tiny_config, tmp_path, capsys):
    from .test_deploy import run_config_arg

    cfg = tiny_config(**{"num-server-rounds": 1})
    train_centralized(cfg, progress=False)
    first = (tmp_path / "out" / "results.json").read_text()
    args = ["centralized", "-c", run_config_arg(cfg)]
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "out" / "results.json").read_text() == first
    with pytest.raises(ValueError, match="cannot resume .* as centralized-matched: it holds a centralized run"):
        train_centralized(cfg.replace(resume=True, num_server_rounds=2, lr_schedule="constant"), compute_matched=True)
    assert main([*args, "--overwrite"]) == 0
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]
    assert len(kept) == 1 and (kept[0] / "results.json").read_text() == first
    assert f"is kept in {kept[0]}" in capsys.readouterr().out
