"""The `pluralllm` command's subcommands, through `cli.main` as a user calls them."""
import json
import time

import pytest

from pluralllm_flwr.centralized import train_centralized
from pluralllm_flwr.cli import main

from .conftest import TINY_RUN

REQUIRED = {"bundle": ["--all", "--out-dir", "b"], "deploy local": ["--groups", "1"],
            "reproduce": ["--dataset", "globalopinionqa"]}  # each command's required options


def test_embed_json_then_cached(tiny_paths, tmp_path, capsys):
    args = ["embed", "--path", tiny_paths["data-path"], "--cache-dir", str(tmp_path / "cache"), "--json"]
    infos = []
    for _ in range(2):
        assert main(args) == 0
        infos.append(json.loads(capsys.readouterr().out))
    assert set(infos[0]) == {"vectors", "dim", "model", "cache_file", "cached", "seconds", "separation"}
    separation = infos[0]["separation"]
    assert set(separation) == {"raw", "question-option", "question-option-position"}
    assert separation["question-option"]["within_question_cosine"] < separation["raw"]["within_question_cosine"]
    assert infos[0]["dim"] == 384 and infos[0]["model"] == "minilm" and infos[0]["vectors"] > 40
    assert (infos[0]["cached"], infos[1]["cached"]) == (False, True)
    assert infos[0]["cache_file"] == infos[1]["cache_file"]


def test_embed_unknown_model_path_is_a_clear_error(tiny_paths, tmp_path, capsys):
    assert main(["embed", "--path", tiny_paths["data-path"], "--model", str(tmp_path / "no-model")]) == 2
    assert "pluralllm: error:" in capsys.readouterr().err


def test_score_json(tiny_config, tmp_path, capsys):
    cfg = tiny_config()
    train_centralized(cfg, progress=False)
    context = {"group": "G2", "answers": [{"question": f"Question {i}?", "options": ["Yes", "No"],
                                           "distribution": [0.3, 0.7]} for i in range(5)]}
    questions = [{"question": "Do you like tea?", "options": ["A lot", "Some", "Not at all"]}]
    (tmp_path / "c.json").write_text(json.dumps(context))
    (tmp_path / "q.json").write_text(json.dumps(questions))
    assert main(["score", "--checkpoint", f"{cfg.out_dir}/best.safetensors", "--context", str(tmp_path / "c.json"),
                 "--questions", str(tmp_path / "q.json"), "--cache-dir", cfg.cache_dir, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    prediction = out["groups"]["G2"]["predictions"][0] if "groups" in out else None
    assert prediction is not None, out
    assert len(prediction["distribution"]) == 3 and abs(sum(prediction["distribution"]) - 1) < 1e-5


@pytest.mark.parametrize("command", ["centralized", "simulate", "bundle", "deploy local", "reproduce", "demo"])
@pytest.mark.parametrize("override, message", [
    ("lr=abc", "-c lr=abc: abc is not a number, true/false or a quoted string (text needs quotes: lr='abc')"),
    ("lr=0.1 seed=1 lr=0.2", "-c: run-config key 'lr' is given twice (lr=0.1 and lr=0.2)"),
    ("lr 0.1", "-c 'lr 0.1': 'lr' is not KEY=VALUE"),
])
def test_a_malformed_run_config_is_one_line_naming_it(command, override, message, capsys):
    assert main([*command.split(), "-c", override, *REQUIRED.get(command, [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pluralllm: error: {message}") and err.count("\n") == 1 and "Traceback" not in err


def test_verbose_shows_the_traceback_too(capsys):
    assert main(["-v", "centralized", "-c", "lr=abc"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("(text needs quotes: lr='abc')")


def test_a_key_given_in_two_overrides_is_refused_too():
    from pluralllm_flwr.config import ConfigError, parse_overrides

    assert parse_overrides(["lr=0.1 data-path='/a b/c'", "seed=2"]) == {"lr": 0.1, "data-path": "/a b/c", "seed": 2}
    with pytest.raises(ConfigError, match="'seed' is given twice"):
        parse_overrides(["seed=1", "seed=2"])


def test_late_checks_come_first_and_show_with_quiet(tiny_config, tmp_path, capsys):
    """Refused in a second or two, before embedding or any Flower process: a bad node count, resuming a
    finished run, resuming with another run-config; --quiet still shows why."""
    from pluralllm_flwr.experiment import prepare_experiment
    from pluralllm_flwr.results import ResultsWriter

    from .test_deploy import run_config_arg

    cfg = tiny_config(**{"num-server-rounds": 1})
    exp = prepare_experiment(cfg, progress=False)
    ResultsWriter(cfg.out_dir, "fedavg", cfg, exp.split.train, exp.split.eval, {}, exp.checkpoint_metadata()).record(
        {"round": 1, "gradient_steps": 3, "alignment": 0.5}, exp.build_model().state_dict())
    capsys.readouterr()
    cases = [(["simulate", "--num-supernodes", "-1"], cfg.replace(out_dir=str(tmp_path / "new")),
              "--num-supernodes must be at least 1"),
             (["deploy", "local", "--groups", "0"], cfg, "--groups must be at least 1"),
             (["simulate"], cfg.replace(resume=True), "already reached round 1: the run is finished"),
             (["deploy", "local", "--groups", "1"], cfg.replace(resume=True), "already reached round 1"),
             (["simulate"], cfg.replace(resume=True, num_server_rounds=2, lr=0.5), "run-config differs from the stopped "
              "run in ['lr']"),
             (["simulate"], cfg, "already holds a run")]
    for args, run, message in cases:
        started = time.monotonic()
        assert main([*args, "--quiet", "-c", run_config_arg(run)]) == 2
        assert time.monotonic() - started < 3, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)


def test_the_demo_writes_its_run_and_report_where_out_dir_says(tiny_paths, tmp_path, monkeypatch):
    """`-c out-dir=...` (as `make align` trains its predictor): the run and its report both go there."""
    from pluralllm_flwr import cli

    def train_instead(args):  # stands in for the federated simulation: a tiny centralized run into the same out-dir
        train_centralized(cli._run_config(args), progress=False)
        return 0
    monkeypatch.setattr(cli, "cmd_simulate", train_instead)
    out = tmp_path / "predictor"
    given = {**TINY_RUN, **tiny_paths, "out-dir": str(out)}
    overrides = " ".join(f"{k}={v!r}" for k, v in given.items())
    assert main(["demo", "--dataset", "globalopinionqa", "--path", tiny_paths["data-path"], "--rounds", "2",
                 "-c", overrides]) == 0
    assert (out / "results.json").is_file() and "alignment" in (out / "report.md").read_text()


def test_outcome_reports_the_unseen_questions_where_the_run_has_them(capsys, tmp_path):
    from pluralllm_flwr.cli import _print_outcome

    final = {"alignment": 0.95, "round": 10, "conditioning_gain": 0.01}
    results = {"method": "centralized", "final": final, "best": final,
               "baselines": {"uniform": {"alignment": 0.8}}}
    _print_outcome(results, tmp_path)
    assert "unseen" not in capsys.readouterr().out
    final["unseen"] = {"alignment": 0.85, "no_context": 0.83, "conditioning_gain": 0.003, "n_questions": 40}
    _print_outcome(results, tmp_path)
    out = capsys.readouterr().out
    assert "unseen questions (40 group-question pairs): 0.8500, with an uninformative context 0.8300, " \
           "conditioning gain +0.0030" in out
    final["unseen"]["conditioning_gain"] = None
    _print_outcome(results, tmp_path)
    assert "conditioning gain n/a" in capsys.readouterr().out
