"""`pluralllm reproduce`: the smoke version of the whole reproduction (every method, the mu sweep and
every ablation, through Flower's simulation) on synthetic data, checking every figure and table."""
import json
import re
from pathlib import Path

import pytest

from pluralllm_flwr.cli import main
from pluralllm_flwr.reproduce import STRATEGY_COMPARISON, _choose_mu, _complete, load_manifest, run_or_reuse
from pluralllm_flwr.reproduction_report import _share_of_gain
from pluralllm_flwr.results import load_results

from .conftest import TINY_RUN, tiny_causal_lm

SECTIONS = ["## The paper's claims against ours", "### Alignment and fairness", "### Reaching the centralized score",
            "### Per held-out group", "### FedProx: the mu sweep", "#### Local steps at equal work",
            "#### Size-weighted against uniform aggregation", "#### Evaluation context size", "#### Embedder",
            "### Non-IID stress test", "### Aggregation strategies and fairness", "### GPO, the paper's predictor",
            "### The default predictor (`mixture`", "## Not run"]
FIGURES = ["alignment-vs-round", "alignment-vs-gradient_steps", "alignment-vs-episodes", "alignment-vs-train_seconds",
           "per-group", "local-steps", "eval-context", "embedders", "stress", "strategies",
           "default-alignment-vs-round", "default-alignment-vs-episodes", "default-per-group"]


@pytest.fixture(scope="module")
def tiny_embedder(tmp_path_factory) -> Path:
    """A second embedder for the embedder ablation: a random tiny Llama saved as a local model folder."""
    model, tok = tiny_causal_lm(["Synthetic survey question number 1: how do you feel about topic 1? Option A"])
    folder = tmp_path_factory.mktemp("tiny-embedder")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _overrides(tiny_paths) -> str:
    values = {**TINY_RUN, "cache-dir": tiny_paths["cache-dir"], "min-group-questions": 10}  # the tiny groups: 'auto'
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in values.items())


def test_smoke_reproduction_writes_every_figure_and_table_and_reuses_its_runs(tiny_paths, tiny_embedder, tmp_path,
                                                                               capsys):
    runs, report = tmp_path / "runs", tmp_path / "docs" / "results.md"
    args = ["reproduce", "--scale", "smoke", "--rounds", "2", "--seeds", "0,1", "--embedders", f"minilm,{tiny_embedder}",
            "--dataset", f"globalopinionqa={tiny_paths['data-path']}", "--dataset", f"opinionqa={tmp_path / 'absent'}",
            "--out", str(runs), "--report", str(report), "-c", _overrides(tiny_paths)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "SKIPPING opinionqa" in printed  # a dataset that cannot be loaded is said, and reported

    text = report.read_text()
    for section in SECTIONS:
        assert section in text, section
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for figure in FIGURES:
        assert any(f"globalopinionqa-{figure}.png" in link for link in linked), figure
    for link in linked:
        assert (report.parent / link).is_file() and (report.parent / link).stat().st_size > 5000, link
    assert "opinionqa**: " in text and "absent" in text  # the skipped dataset and why

    manifest = load_manifest(runs)
    plan = manifest["datasets"]["globalopinionqa"]
    assert [len(p) for p in plan["main"].values()] == [2, 2, 2]  # FedAvg, FedProx, centralized x 2 seeds
    assert plan["mu"] in (0.1, 1.0) and len(plan["mu_sweep"]) == 2
    fedavg = load_results(plan["main"]["FedAvg"][0])
    central = load_results(plan["main"]["Centralized"][0])
    assert fedavg["final"]["round"] == 2 and central["final"]["round"] == 2 * TINY_RUN["local-steps"]
    assert fedavg["final"]["episodes"] == central["final"]["episodes"]  # compute-matched: the same work
    assert sorted(plan["local_steps"]) == ["3", "6"] and load_results(plan["local_steps"]["6"])["final"]["round"] == 1
    # each local-steps run does the work of the compute-matched centralized run, so the report gives their gap
    assert {load_results(p)["final"]["episodes"] for p in plan["local_steps"].values()} == {central["final"]["episodes"]}
    assert "centralized minus federated (final, same work)" in text
    assert set(plan["weighting"]) == {"num-examples", "uniform"}
    assert plan["embedders"]["minilm"]["run"] == plan["main"]["FedAvg"][0]  # the same run: reused
    assert {info["dim"] for info in plan["embedders"].values()} == {384, 32}
    assert all(set(scores) == {"5", "20"} for scores in plan["eval_context"].values())
    assert len(plan["eval_context"]) == 6
    # the default predictor's comparison: the same methods and seeds, its own claims
    assert list(plan["default_main"]) == ["FedAvg", "FedProx (mu=0.1)", "Centralized"]
    assert [len(p) for p in plan["default_main"].values()] == [2, 2, 2]
    default = {m: load_results(p[0]) for m, p in plan["default_main"].items()}
    assert {r["config"]["model"] for r in default.values()} == {"mixture"}
    assert default["FedAvg"]["final"]["episodes"] == default["Centralized"]["final"]["episodes"]
    assert "globalopinionqa, default predictor (mixture): better alignment" in text
    assert "globalopinionqa, GPO: better alignment" in text
    # the stress test: the default predictor at each skew, FedAvg, FedProx and centralized at equal work
    assert sorted(plan["stress"]) == ["0", "1"] and all(len(m) == 3 for m in plan["stress"].values())
    # skew 0 is the data itself: at the comparison's rounds its runs are the comparison's first seed's
    assert plan["stress"]["0"] == {"FedAvg": plan["default_main"]["FedAvg"][0], "Centralized":
                                   plan["default_main"]["Centralized"][0], "FedProx": plan["default_main"]["FedProx (mu=0.1)"][0]}
    stressed = {skew: {m: load_results(p) for m, p in by_method.items()} for skew, by_method in plan["stress"].items()}
    assert {r["config"]["skew"] for r in stressed["1"].values()} == {1.0}
    assert {r["config"]["model"] for rs in stressed.values() for r in rs.values()} == {"mixture"}
    assert stressed["1"]["FedAvg"]["final"]["episodes"] == stressed["1"]["Centralized"]["final"]["episodes"]
    assert stressed["1"]["FedProx"]["config"]["proximal-mu"] > 0
    # groups pulled toward their own preferences differ more: the context mixture gains on train-mean
    mixture_gain = {skew: rs["FedAvg"]["baselines"]["context_mixture"]["alignment"]
                    - rs["FedAvg"]["baselines"]["train_mean"]["alignment"] for skew, rs in stressed.items()}
    assert mixture_gain["1"] > mixture_gain["0"] + 0.01
    assert re.search(r"FedAvg breaks down at skew \d|No breakdown within the range|No verdict", text)
    # the strategies: every rule of STRATEGY_COMPARISON and centralized, 2 seeds, on every group ('auto' split)
    assert list(plan["strategies"]) == [*STRATEGY_COMPARISON, "Centralized"]
    assert all(len(paths) == 2 for paths in plan["strategies"].values())
    ruled = {label: load_results(paths[1]) for label, paths in plan["strategies"].items()}
    for label, changes in STRATEGY_COMPARISON.items():
        config = ruled[label]["config"]
        assert all(config[k.replace("_", "-")] == v for k, v in changes.items()), label
        assert config["train-groups"] == "auto" and config["common-questions"] is False and config["seed"] == 1
    assert len(ruled["FedAdam"]["train_groups"]) + len(ruled["FedAdam"]["eval_groups"]) == 5
    assert re.search(r"A higher worst group than FedAvg's in every seed\*\*: |No federated strategy gives a higher", text)

    # A second call trains nothing: every run is complete with the same run-config.
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "running" not in again and "queued" not in again
    assert again.count("complete, reused") == printed.count("running ...") + printed.count(": queued")
    simulations = load_manifest(runs)["simulations"]  # the federated runs: two Flower simulations, not one each
    assert [s["runs"] for s in simulations] == [8, 1, 4, 2, 14]  # stress: skew 0 is the default comparison's seed 0
    assert all(s["seconds"] > s["run_seconds"] > 0 for s in simulations)
    assert "Flower's start-up, teardown and set-up between runs" in text
    assert [i["command"][:19] for i in load_manifest(runs)["invocations"]] == ["pluralllm reproduce"] * 2
    assert main(["reproduce", "--report-only", "--out", str(runs), "--report", str(report)]) == 0


def test_fedavgs_share_of_centralized_gain_is_undefined_where_centralized_gains_nothing():
    run = lambda alignment: {"final": {"alignment": alignment}}  # noqa: E731
    assert _share_of_gain(run(0.85), run(0.90), uniform=0.80) == pytest.approx(0.5)
    assert _share_of_gain(run(0.85), run(0.79), uniform=0.80) is None


def test_mu_is_chosen_on_held_back_questions_not_held_out_groups():
    sweep = [{"mu": 0.01, "heldback": 0.80, "heldout": 0.95}, {"mu": 0.1, "heldback": 0.85, "heldout": 0.90},
             {"mu": 1.0, "heldback": 0.85, "heldout": 0.99}]
    assert _choose_mu(sweep) == 0.1  # best held-back; the smaller mu on a tie, whatever the held-out score
    with pytest.raises(ValueError, match="heldback-fraction > 0"):
        _choose_mu([{"mu": 0.1, "heldback": None, "heldout": 0.9}])


def test_a_run_is_reused_only_when_complete_with_the_same_config(tiny_config, tmp_path):
    from pluralllm_flwr.centralized import train_centralized

    cfg = tiny_config(**{"out-dir": str(tmp_path / "run")})
    train_centralized(cfg, progress=False)
    path = Path(cfg.out_dir)
    assert _complete(path, cfg, cfg.num_server_rounds)
    assert not _complete(path, cfg, cfg.num_server_rounds + 1)  # stopped early
    assert not _complete(path, cfg.replace(lr=0.5), cfg.num_server_rounds)  # another setting
    assert _complete(path, cfg.replace(device="cpu"), cfg.num_server_rounds)  # the same numbers
    assert not _complete(tmp_path / "nothing", cfg, 1)
    results = json.loads((path / "results.json").read_text())
    del results["config"]["server-lr"]  # a run recorded before a key existed: it ran with the key's default
    (path / "results.json").write_text(json.dumps(results))
    assert _complete(path, cfg, cfg.num_server_rounds)
    echoed = []
    run_or_reuse(path, cfg.replace(lr=0.5), cfg.num_server_rounds, lambda c: train_centralized(c, progress=False),
                 echoed.append, "run")  # another setting: the old run is kept aside, not deleted
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / "results.json").is_file() and "moved to" in echoed[0]
    assert json.loads((path / "results.json").read_text())["config"]["lr"] == 0.5


@pytest.mark.parametrize("args, message", [
    (["reproduce"], "name the datasets"),
    (["reproduce", "--dataset", "pew=x"], "unknown dataset 'pew'"),
    (["reproduce", "--dataset", "opinionqa=/no/such/folder"], "no dataset could be loaded"),
    (["reproduce", "--report-only", "--out", "/no/such/runs"], "no reproduction here"),
])
def test_bad_reproduce_arguments_are_clear_errors(args, message, capsys, tmp_path):
    assert main([*args, "--report", str(tmp_path / "r.md")]) == 2
    assert message in capsys.readouterr().err



def test_a_bad_embedder_fails_before_any_training(tiny_paths, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = ["reproduce", "--scale", "smoke", "--rounds", "1", "--embedders", f"minilm,{tmp_path / 'no-such-model'}",
            "--dataset", f"globalopinionqa={tiny_paths['data-path']}", "--out", str(runs),
            "--report", str(tmp_path / "r.md"), "-c", _overrides(tiny_paths)]
    assert main(args) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert not (runs / "globalopinionqa" / "fedavg").exists()  # nothing trained
