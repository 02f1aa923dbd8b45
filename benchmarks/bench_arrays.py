"""A message's arrays: Flower's own decoding and encoding (`np.load` and `np.save` per array) against
`pluralllm_flwr.arrays` (read in place; .npy headers formatted once per dtype and shape); prints a Markdown
table.

For the predictor bench_simulation.py trains (GPO on 384-d raw MiniLM vectors, about 80 arrays) and for
the default model, it times what a round does with arrays: the server's weighted mean of n replies
(Flower's `aggregate_arrayrecords` against `arrays.weighted_mean`, which must give the same bytes: checked
here), a client's loading of the global weights (`ArrayRecord.to_torch_state_dict` against
`arrays.to_state_dict`) and its encoding of the reply (`ArrayRecord(state_dict)` against `arrays.to_record`,
which must give the same bytes: checked here). Medians of --repeats interleaved repeats.

    .venv/bin/python benchmarks/bench_arrays.py [--replies 8 32] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pluralllm_flwr.arrays import to_record, to_state_dict, weighted_mean  # noqa: E402
from pluralllm_flwr.features import feature_dim  # noqa: E402
from pluralllm_flwr.model import ModelConfig  # noqa: E402
from pluralllm_flwr.predictors import build_predictor  # noqa: E402

MODELS = {"gpo (bench_simulation's)": ModelConfig(input_dim=feature_dim(384, "raw"), architecture="gpo"),
          "mixture (the default)": ModelConfig(input_dim=feature_dim(384, "question-option-position"),
                                               architecture="mixture")}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def replies(state: dict[str, torch.Tensor], n: int) -> list[RecordDict]:
    """n clients' replies: the weights, perturbed per client, and a weight for the mean."""
    generator = torch.Generator().manual_seed(0)
    return [RecordDict({"arrays": ArrayRecord({k: v + 0.01 * torch.randn(v.shape, generator=generator)
                                               for k, v in state.items()}),
                        "metrics": MetricRecord({"num-examples": 100 + i})}) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a virtual client runs
    print("| model | arrays | parameters | step | Flower ms | ours ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, config in MODELS.items():
        state = build_predictor(config, seed=0).state_dict()
        params = sum(v.numel() for v in state.values())
        rows = []
        for n in args.replies:
            records = replies(state, n)
            theirs, ours = aggregate_arrayrecords(records, "num-examples"), weighted_mean(records, "num-examples")
            if list(theirs) != list(ours) or any(theirs[k].data != ours[k].data for k in theirs):
                sys.exit(f"{name}: weighted_mean differs from Flower's aggregate_arrayrecords for {n} replies")
            rows.append((f"weighted mean of {n} replies (server, per round)",  # records bound now, not at the last n
                         lambda records=records: aggregate_arrayrecords(records, "num-examples"),
                         lambda records=records: weighted_mean(records, "num-examples")))
        record = ArrayRecord(state)
        rows.append(("load the global weights (client, per message)", record.to_torch_state_dict,
                     lambda: to_state_dict(record)))
        if record.object_id != to_record(state).object_id:
            sys.exit(f"{name}: to_record's arrays differ from ArrayRecord's")
        rows.append(("encode the reply (client, per message)", lambda: ArrayRecord(state), lambda: to_record(state)))
        for step, flower, fast in rows:
            a, b = [], []
            for _ in range(args.repeats):  # interleaved, so both see the same machine
                a.append(seconds(flower))
                b.append(seconds(fast))
            flower_ms, ours_ms = statistics.median(a) * 1e3, statistics.median(b) * 1e3
            print(f"| {name} | {len(state)} | {params:,} | {step} | {flower_ms:.1f} | {ours_ms:.1f} | "
                  f"{flower_ms / ours_ms:.1f}× |")
    print(f"\ntorch {torch.__version__}, numpy {np.__version__}, 1 thread; medians of {args.repeats} repeats. The "
          "weighted means and the encoded replies were checked byte-identical to Flower's.")


if __name__ == "__main__":
    main()
