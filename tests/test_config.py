import tomllib
from pathlib import Path

import pytest

from pluralllm_flwr.config import ConfigError, RunConfig, cache_folder, group_names


def test_pyproject_defaults_equal_the_typed_view():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunConfig().to_mapping()
    assert "federations" not in pyproject["tool"]["flwr"]  # flwr 1.42 rewrites pyproject when it finds one


def test_from_mapping_round_trip_and_int_for_float():
    cfg = RunConfig.from_mapping({"num-server-rounds": 3, "lr": 1, "strategy": "fedprox", "proximal-mu": 0.1})
    assert cfg.num_server_rounds == 3 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


@pytest.mark.parametrize("values, message", [
    ({"strategy": "fedsgd"}, "'strategy' must be one of"),
    ({"num-server-rounds": 0}, "'num-server-rounds' must be at least 1"),
    ({"eval-every": 0}, "'eval-every' must be at least 1"),
    ({"num-rounds": 3}, r"unknown run-config key\(s\) \['num-rounds'\]"),
    ({"lr": "fast"}, "'lr' must be a float"),
    ({"local-steps": 2.5}, "'local-steps' must be a int"),
    ({"proximal-mu": -1.0}, "'proximal-mu' must be >= 0"),
    ({"min-context": 50, "max-context": 10}, "min-context <= max-context"),
    ({"dataset": "opinionqa"}, "'data-path' is required"),
    ({"weighting": "size"}, "'weighting' must be one of"),
    ({"d-model": 130}, "divisible"),
    ({"server-momentum": 1.0}, "0 <= server-momentum < 1"),
    ({"server-tau": 0.0}, "'server-tau' must be positive"),
    ({"qfedavg-q": -1.0}, "'qfedavg-q' must be >= 0"),
    ({"strategy": "fedadam"}, "server-lr=1.0 with strategy 'fedadam'"),
    ({"strategy": "fedavgm", "resume": True, "out-dir": "/tmp/x"}, "cannot continue strategy 'fedavgm'"),
])
def test_bad_values_give_one_clear_message(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(values)


def test_group_lists_split_on_semicolons_when_names_have_commas():
    assert RunConfig(train_groups="A, B").group_list("train_groups") == ["A", "B"]
    assert RunConfig(train_groups="$100,000 or more; Female").group_list("train_groups") == ["$100,000 or more", "Female"]
    assert RunConfig(eval_groups="auto").group_list("eval_groups") == "auto"
    # the same rule for the commands that take groups (pluralllm align --groups/--measure)
    assert group_names("Less than $30,000;Hispanic") == ["Less than $30,000", "Hispanic"]
    assert group_names("Democrat,Republican") == ["Democrat", "Republican"] and group_names("") == []


def test_context_sizes_are_checked_and_parsed():
    assert RunConfig().context_sizes == (1, 5, 10, 20, 50, 100)
    for bad in ("", "a,b", "0,5"):
        with pytest.raises(ConfigError, match="eval-context-sizes"):
            RunConfig(eval_context_sizes=bad)


def test_the_run_config_and_the_commands_find_the_same_default_cache(monkeypatch, tmp_path):
    """Training caches what `pluralllm align` and `score` later read: one rule for both, XDG_CACHE_HOME honoured."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert RunConfig().cache_path == cache_folder() == tmp_path / "pluralllm"
    assert RunConfig(cache_dir="~/elsewhere").cache_path == cache_folder("~/elsewhere") == Path.home() / "elsewhere"
