"""Shared fixtures: small datasets in both formats, built in code; the real data only when present."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def real_data(relative: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data not present at {path} (../shared/data sits beside the checkout on project machines)")
    return path


def goqa_row(question: str, selections: dict, options: list) -> dict:
    return {"question": question, "selections": f"defaultdict(<class 'list'>, {selections!r})",
            "options": repr(options), "source": "GAS"}


def write_goqa(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    pd.DataFrame(rows, columns=["question", "selections", "options", "source"]).to_csv(path, index=False)
    return path


@pytest.fixture
def goqa_csv(tmp_path: Path) -> Path:
    rows = [goqa_row(f"Question {i}?", {"Aland": [0.2, 0.8], "Borduria": [0.5, 0.5], "Carpania": [0.9, 0.1]},
                     ["Yes", "No"]) for i in range(6)]
    rows.append(goqa_row("Scale?", {"Aland": [0.1, 0.2, 0.7], "Borduria": [0.0, 0.0, 0.0]}, [1.0, 2.0, 3.0]))
    rows.append(goqa_row("Off by a little?", {"Aland": [0.5, 0.505], "Carpania": [0.3, 0.7]}, ["A", "B"]))
    return write_goqa(tmp_path / "global_opinions.csv", rows)


def write_opinionqa(root: Path, surveys: dict[str, dict[str, dict]]) -> Path:
    """surveys: name -> {"info": [(key, question, references, ordinal)], "<ATTR>": {key: {group: counts}}}."""
    import pandas as pd

    for name, content in surveys.items():
        folder = root / name
        folder.mkdir(parents=True)
        pd.DataFrame([{"key": k, "question": q, "references": repr(refs), "option_ordinal": repr(o)}
                      for k, q, refs, o in content["info"]]).to_csv(folder / "info.csv")
        refs_of = {k: refs for k, _, refs, _ in content["info"]}
        for attr, per_key in content.items():
            if attr == "info":
                continue
            blob = {k: {"MC_options": refs_of[k], "question_text": "q", **groups} for k, groups in per_key.items()}
            (folder / f"{attr}_data.json").write_text(json.dumps(blob))
    return root


@pytest.fixture
def opinionqa_dir(tmp_path: Path) -> Path:
    refs = ["Agree", "Neutral", "Disagree", "Refused"]
    info = [("Q1_W1", "First?", refs, [1.0, 2.0, 3.0]), ("Q2_W1", "Second?", refs, [1.0, 2.0, 3.0])]
    sex = {"Q1_W1": {"Male": {"Agree": 3.0, "Neutral": 1.0, "Refused": 5.0}, "Female": {"Disagree": 2.0}},
           "Q2_W1": {"Male": {"Refused": 4.0}, "Female": {"agree": 1.0, "Disagree": 1.0}}}
    race = {"Q1_W1": {"Other": {"Agree": 1.0}, "Refused": {"Agree": 1.0}}}
    party = {"Q1_W1": {"Other": {"Disagree": 1.0}}}
    later = {"info": [("Q1_W1", "First?", refs, [1.0, 2.0, 3.0])], "SEX": {"Q1_W1": {"Male": {"Agree": 1.0}}}}
    return write_opinionqa(tmp_path / "human_resp", {
        "American_Trends_Panel_W1": {"info": info, "SEX": sex, "RACE": race, "POLPARTY": party},
        "Pew_American_Trends_Panel_disagreement_500": later})
