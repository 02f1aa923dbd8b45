"""Embedding speed on this machine: prompts/second per model, and cold (compute) vs cached load time.

Prompts come from the real GlobalOpinionQA sample (../shared/data, read at run time, never copied) and
are topped up with synthetic survey questions to --prompts. Prints a Markdown table.

    .venv/bin/python benchmarks/bench_embeddings.py [--models minilm smollm2] [--prompts 200]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pluralllm_flwr import embeddings as emb
from pluralllm_flwr.data import Question, load_globalopinionqa

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "globalopinionqa" / "sample.csv"
LIKERT = ("Strongly agree", "Somewhat agree", "Somewhat disagree", "Strongly disagree", "DK/Refused")
TOPICS = ("scientists", "the national government", "the news media", "religious leaders", "the military",
          "large companies", "the courts", "the police", "international organisations", "neighbours")


def questions(n_prompts: int) -> tuple[list[Question], int]:
    """Real sample questions first, then synthetic ones."""
    real = load_globalopinionqa(SAMPLE).questions if SAMPLE.is_file() else []
    out = list(real)
    while sum(len(q.options) for q in out) < n_prompts:
        i = len(out)
        out.append(Question(f"s{i}", f"How much do you agree that {TOPICS[i % len(TOPICS)]} act in the best "
                                     f"interests of the public? (item {i})", LIKERT))
    return out, sum(len(q.options) for q in real)


class _Timed:
    """Wraps a module function and adds up the seconds spent in it, to split one cold run into phases."""

    def __init__(self, name: str):
        self.name, self.real, self.seconds = name, getattr(emb, name), 0.0
        setattr(emb, name, self)

    def __call__(self, *args, **kwargs):
        began = time.perf_counter()
        try:
            return self.real(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - began

    def restore(self) -> None:
        setattr(emb, self.name, self.real)


def bench(model: str, qs: list[Question], batch_size: int) -> dict:
    """One cold run (load + compute + write, timed by phase), then the same call served from the cache."""
    load, encode = _Timed("_load_model"), _Timed("_encode")
    try:
        with tempfile.TemporaryDirectory() as cache:
            _, cold = emb.embed_questions(qs, model, cache_dir=cache, device="cpu", batch_size=batch_size,
                                          progress=False)
            _, hot = emb.embed_questions(qs, model, cache_dir=cache, device="cpu", batch_size=batch_size,
                                         progress=False)
    finally:
        load.restore()
        encode.restore()
    assert hot["cached"] and not cold["cached"]
    prompts = len(emb._unique_prompts(qs)[0])
    return {"model": model, "dim": cold["dim"], "prompts": prompts, "load_s": load.seconds,
            "rate": prompts / encode.seconds, "cold_s": cold["seconds"], "cached_s": hot["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    import torch

    qs, n_real = questions(args.prompts)
    rows = [bench(m, qs, args.batch_size) for m in args.models]
    print(f"{sum(len(q.options) for q in qs)} prompts ({n_real} from the real GlobalOpinionQA sample), "
          f"batch {args.batch_size}, CPU, torch {torch.__version__} with {torch.get_num_threads()} threads\n")
    print("| model | dim | unique prompts | model load (s) | prompts/s | cold embed_questions (s) | cached (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dim']} | {r['prompts']} | {r['load_s']:.1f} | {r['rate']:.1f} | "
              f"{r['cold_s']:.1f} | {r['cached_s']:.3f} |")


if __name__ == "__main__":
    main()
