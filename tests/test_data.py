import json
import re
import time

import numpy as np
import pytest

from pluralllm_flwr import data as D
from pluralllm_flwr.cli import main
from pluralllm_flwr.config import RunConfig

from .conftest import goqa_row, real_data, write_goqa


def test_goqa_loads_groups_distributions_and_quirks(goqa_csv):
    data = D.load_globalopinionqa(goqa_csv)
    assert len(data.questions) == 8
    assert data.questions[6].options == ("1", "2", "3")  # float scale points written as integers
    assert data.questions[0].key == "0" and data.questions[0].options == ("Yes", "No")
    np.testing.assert_allclose(data.answers["Aland"][0], [0.2, 0.8])
    assert 6 not in data.answers["Borduria"]  # all-zero distribution dropped ...
    assert data.dropped["all-zero distribution (group answers)"] == 1  # ... and counted
    np.testing.assert_allclose(data.answers["Aland"][7].sum(), 1.0, rtol=1e-6)  # 1.005 renormalised
    assert data.dropped["renormalised: sum within 1% of 1 (group answers, kept)"] == 1


@pytest.mark.parametrize("selections, options, message", [
    ("defaultdict(<class 'list'>, {'A': [0.5, 0.5]", "['x', 'y']", "cannot parse selections"),
    ("defaultdict(<class 'list'>, {'A': [0.5, 0.5]})", "['x', 'y'", "cannot parse options"),
    ("defaultdict(<class 'list'>, {'A': [0.2, 0.3, 0.5]})", "['x', 'y']", "has 3 values but the question has 2 options"),
    ("defaultdict(<class 'list'>, {'A': [-0.5, 1.5]})", "['x', 'y']", "negative values"),
    ("defaultdict(<class 'list'>, {'A': [float('nan'), 1.0]})", "['x', 'y']", "selections contains NaN values"),
    ("defaultdict(<class 'list'>, {'A': [0.3, 0.3]})", "['x', 'y']", "sums to 0.6000, more than 1% off 1"),
    ("defaultdict(<class 'list'>, {'A': ['a', 'b']})", "['x', 'y']", "numbers only"),
])
def test_goqa_bad_rows_name_file_row_and_problem(tmp_path, selections, options, message):
    good = goqa_row("Fine?", {"A": [0.5, 0.5]}, ["x", "y"])
    bad = {"question": "Broken question?", "selections": selections, "options": options, "source": "GAS"}
    path = write_goqa(tmp_path / "g.csv", [good, bad])
    with pytest.raises(D.DataError) as err:
        D.load_globalopinionqa(path)
    assert str(path) in str(err.value) and "row 2" in str(err.value) and "Broken question?" in str(err.value)
    assert message in str(err.value)


def test_goqa_nan_value_is_rejected(tmp_path):
    path = write_goqa(tmp_path / "g.csv", [goqa_row("Q?", {"A": [float("nan"), 1.0]}, ["x", "y"])])  # written "nan"
    with pytest.raises(D.DataError, match=r"row 1 \(question 'Q\?'\): selections contains NaN values"):
        D.load_globalopinionqa(path)


def test_missing_file_and_columns(tmp_path):
    with pytest.raises(D.DataError, match="no such file"):
        D.load_globalopinionqa(tmp_path / "absent.csv")
    (tmp_path / "bad.csv").write_text("question,options\nq,\"['a']\"\n")
    with pytest.raises(D.DataError, match=r"missing column\(s\) \['selections'\]"):
        D.load_globalopinionqa(tmp_path / "bad.csv")
    with pytest.raises(D.DataError, match="no such folder"):
        D.load_opinionqa(tmp_path / "absent")


def test_download_without_network_explains_how_to_pass_a_path(monkeypatch):
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror("no network")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(D.DataError, match="--path /abs/global_opinions.csv"):
        D.load_globalopinionqa(None)


def test_opinionqa_counts_refusals_nongroups_and_repeats(opinionqa_dir):
    data = D.load_opinionqa(opinionqa_dir)
    assert [q.key for q in data.questions] == ["Q1_W1", "Q2_W1"]
    assert data.questions[0].options == ("Agree", "Neutral", "Disagree")  # refusal excluded
    assert data.questions[0].ordinal == (1.0, 2.0, 3.0)
    np.testing.assert_allclose(data.answers["Male"][0], [0.75, 0.25, 0.0])  # refusals not counted
    assert 1 not in data.answers["Male"]  # only refusals -> no distribution
    np.testing.assert_allclose(data.answers["Female"][1], [0.5, 0.0, 0.5])  # 'agree' matched ignoring case
    assert {"Other (RACE)", "Other (POLPARTY)"} <= set(data.answers)  # ambiguous names qualified
    assert "Refused" not in data.answers
    assert data.dropped == {
        "answers of the non-group 'Refused'": 1,
        "no answers besides refusals (group answers)": 1,
        "option label matched ignoring case (kept)": 1,
        "question repeated in a later survey (first kept)": 1,
    }


def test_opinionqa_unknown_option_is_an_error(tmp_path):
    from .conftest import write_opinionqa

    root = write_opinionqa(tmp_path / "hr", {"S1": {"info": [("K", "Q?", ["Yes", "No"], [1.0, 2.0])],
                                                    "SEX": {"K": {"Male": {"Maybe": 2.0}}}}})
    with pytest.raises(D.DataError, match=r"SEX_data.json, question 'K', group 'Male': answer option 'Maybe'"):
        D.load_opinionqa(root)


def test_split_restrict_and_heldback(goqa_csv):
    data = D.load_globalopinionqa(goqa_csv)
    cfg = RunConfig(train_groups="Aland,Borduria", eval_groups="Carpania", eval_context=2, min_context=1,
                    heldback_fraction=0.2)
    prepared, split = D.prepare(cfg, data)
    assert split == D.GroupSplit(["Aland", "Borduria"], ["Carpania"])
    assert len(prepared.questions) == 6  # only the questions all three answered
    assert prepared.dropped["question not answered by every selected group"] == 2
    train, back = D.heldback_split(list(prepared.answers["Aland"]), 0.5, seed=1, group="Aland")
    assert sorted(train + back) == list(range(6)) and len(back) == 3
    assert D.heldback_split(list(range(6)), 0.5, 1, "Aland") == (train, back)  # deterministic
    assert D.heldback_split(list(range(6)), 0.5, 2, "Aland") != (train, back)  # the seed matters


def test_max_questions_is_a_counted_subset_the_same_for_every_seed(goqa_csv):
    data = D.load_globalopinionqa(goqa_csv)
    base = {"train_groups": "Aland,Borduria", "eval_groups": "Carpania", "eval_context": 2, "min_context": 1}
    subsets = [D.prepare(RunConfig(**base, max_questions=4, seed=s), data)[0] for s in (0, 1)]
    assert len(subsets[0].questions) == 4 and subsets[0].dropped["question outside the max-questions subset"] == 2
    assert [q.key for q in subsets[0].questions] == [q.key for q in subsets[1].questions]
    assert all(set(a) == set(range(4)) for a in subsets[0].answers.values())  # renumbered, nothing dangling
    assert len(D.prepare(RunConfig(**base, max_questions=99), data)[0].questions) == 6  # more than there are: all


@pytest.mark.parametrize("changes, message", [
    ({"train_groups": "Aland,Atlantis"}, r"unknown group\(s\) \['Atlantis'\]"),
    ({"train_groups": "Aland", "eval_groups": "Aland"}, "in both train-groups and eval-groups"),
    ({"train_groups": "Aland", "eval_groups": "Carpania", "eval_context": 7, "min_context": 1}, "evaluation needs more than eval-context=7"),
    ({"train_groups": "Aland", "eval_groups": "Carpania", "eval_context": 2, "min_context": 10},
     "needs at least min-context=10"),
])
def test_group_config_errors(goqa_csv, changes, message):
    with pytest.raises(D.DataError, match=message):
        D.prepare(RunConfig(**changes), D.load_globalopinionqa(goqa_csv))


def test_auto_split_is_seeded(goqa_csv):
    data = D.load_globalopinionqa(goqa_csv)
    cfg = RunConfig(train_groups="auto", eval_groups="auto", min_group_questions=6, auto_eval_fraction=0.3)
    split = D.split_groups(data, cfg)
    assert sorted(split.train + split.eval) == ["Aland", "Borduria", "Carpania"] and len(split.eval) == 1
    assert D.split_groups(data, cfg) == split
    with pytest.raises(D.DataError, match="only 1 group"):
        D.split_groups(data, cfg.replace(min_group_questions=8))


def test_cli_data_json(goqa_csv, capsys):
    assert main(["data", "--path", str(goqa_csv), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "globalopinionqa" and out["questions"] == 8 and out["options"] == 17
    assert out["groups"] == {"Aland": 8, "Borduria": 6, "Carpania": 7}
    assert out["dropped"]["all-zero distribution (group answers)"] == 1


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["data", "--path", str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_real_opinionqa_default_groups_present():
    data = D.load_opinionqa(real_data("opinionqa/human_resp"))
    assert len(data.questions) == 999
    for group in D.OPINIONQA_TRAIN + D.OPINIONQA_EVAL:
        assert len(data.answers[group]) >= 684, group
    prepared, split = D.prepare(RunConfig(dataset="opinionqa", data_path="x"), data)
    assert len(prepared.questions) > 600 and split.eval == D.OPINIONQA_EVAL


def test_real_goqa_sample_parses():
    data = D.load_globalopinionqa(real_data("globalopinionqa/sample.csv"))
    assert len(data.questions) == 25
    assert all(abs(d.sum() - 1) < 1e-5 for g in data.answers.values() for d in g.values())


def _goqa(tmp_path, rows=None, text=None, raw: bytes | None = None):
    path = tmp_path / "g.csv"
    if raw is not None:
        path.write_bytes(raw)
    elif text is not None:
        path.write_text(text)
    else:
        write_goqa(path, rows)
    return path


def _opinionqa(tmp_path, refs=("Yes", "No"), ordinal=None, sex=None):
    from .conftest import write_opinionqa

    root = write_opinionqa(tmp_path / "hr", {"S1": {"info": [("K", "Q?", list(refs), [1.0, 2.0])],
                                                    "SEX": {"K": sex or {"Male": {"Yes": 2.0}}}}})
    if ordinal:
        info = root / "S1" / "info.csv"
        info.write_text(info.read_text().replace('"[1.0, 2.0]"', ordinal))
    return root


def _damaged(tmp_path, name: str, content: bytes):
    root = _opinionqa(tmp_path)
    (root / "S1" / name).write_bytes(content)
    return root


def _fine(i):
    return goqa_row(f"Fine {i}?", {"A": [0.5, 0.5]}, ["x", "y"])


@pytest.mark.parametrize("make, message", [
    (lambda t: _goqa(t, raw=b""), r"g.csv: empty file \(expected GlobalOpinionQA's columns"),
    (lambda t: _goqa(t, text="question,selections,options,source\n"), r"g.csv: no questions \(a header and no rows\)"),
    (lambda t: t, "is a folder; GlobalOpinionQA is one CSV file"),
    (lambda t: _goqa(t, [_fine(i) for i in range(9)] + [goqa_row("Many?", {"A": [1 / 200] * 200}, list(range(200)))]),
     r"g.csv row 10 \(question 'Many\?'\): needs 2 to 26 options, got 200"),
    (lambda t: _goqa(t, [goqa_row("Twice?", {"A": [0.2, 0.3, 0.5]}, ["Yes", "No", "Yes"])]),
     r"g.csv row 1 \(question 'Twice\?'\): options must be distinct non-empty strings, got \['Yes', 'No', 'Yes'\]"),
    (lambda t: _goqa(t, raw="question,selections,options,source\nCaf\xe9?,x,y,z\n".encode("latin-1")),
     "g.csv: not UTF-8 text"),
    (lambda t: _opinionqa(t, sex={"Male": ["Yes", 2.0]}),
     r"SEX_data.json, question 'K', group 'Male': the answer counts must be a JSON object \(options to counts\), got list"),
    (lambda t: _damaged(t, "info.csv", b""), r"S1/info.csv: empty file"),
    (lambda t: _damaged(t, "SEX_data.json", b'{"K": {"M\xffle": {}}}'), "S1/SEX_data.json: not UTF-8 text"),
    (lambda t: _damaged(t, "info.csv", b",key,question\n0,K,Caf\xe9\n"), "S1/info.csv: not UTF-8 text"),
    (lambda t: _opinionqa(t, ordinal='"[1.0, \'a\']"'),
     r"info.csv row 1 \(question 'K'\): option_ordinal must be a list of numbers"),
    (lambda t: _opinionqa(t, refs=("Yes", "No", "Yes")), r"info.csv row 1 \(question 'K'\): options must be distinct"),
])
def test_every_data_error_is_one_line_naming_file_row_and_problem(tmp_path, capsys, make, message):
    """Through `pluralllm data`, which applies the checks training, bundling and scoring apply."""
    path = make(tmp_path)
    dataset = "opinionqa" if path.name == "hr" else "globalopinionqa"
    assert main(["data", "--dataset", dataset, "--path", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pluralllm: error: "), err
    assert re.search(message, err), err


def test_bad_data_is_refused_before_flower_starts(tmp_path, capsys):
    path = _goqa(tmp_path, [goqa_row("Twice?", {"A": [0.2, 0.3, 0.5]}, ["Yes", "No", "Yes"])])
    started = time.monotonic()
    assert main(["simulate", "-c", f"data-path='{path}' out-dir='{tmp_path / 'out'}'"]) == 2
    assert time.monotonic() - started < 5 and "options must be distinct" in capsys.readouterr().err


def test_groups_without_usable_answers_and_all_zero_counts_are_named(tmp_path, capsys):
    rows = [goqa_row(f"Q{i}?", {"A": [0.5, 0.5], "Zed": [0.0, 0.0]}, ["x", "y"]) for i in range(3)]
    data = D.load_globalopinionqa(_goqa(tmp_path, rows))
    assert data.unusable == ["Zed"] and "Zed" not in data.answers
    with pytest.raises(D.DataError, match=r"'eval-groups': group\(s\) \['Zed'\] of globalopinionqa have no usable answer"):
        D.split_groups(data, RunConfig(train_groups="A", eval_groups="Zed"))
    counts = D.load_opinionqa(_opinionqa(tmp_path, sex={"Male": {"Yes": 0.0, "No": 0.0}, "Female": {"Refused": 3.0},
                                                        "Other": {"Yes": 1.0}}))
    assert counts.dropped == {"all-zero counts (group answers)": 1, "no answers besides refusals (group answers)": 1}
    assert counts.unusable == ["Female", "Male"]
    assert main(["data", "--dataset", "opinionqa"]) == 2
    assert "--dataset opinionqa needs --path" in capsys.readouterr().err
