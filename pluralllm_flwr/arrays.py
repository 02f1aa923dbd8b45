"""Reading a message's arrays without `np.load`.

Flower serialises each array of an `ArrayRecord` in NumPy's .npy format and decodes one with
`np.load`, which parses its header as Python source, array by array: for GPO's 84 arrays that is most of
the server's weighted mean of a round's replies and of a client's loading of the global weights
(benchmarks/bench_arrays.py). `to_numpy` reads the array's bytes in place, with the dtype and shape that
`Array` already carries, and falls back to `Array.numpy` for anything but a C-ordered .npy payload.
`weighted_mean` is Flower's `aggregate_arrayrecords` on top of it: the same operations in the same
order, so the same bytes (tests/test_arrays.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

NPY_MAGIC = b"\x93NUMPY"


def to_numpy(array: Array) -> np.ndarray:
    """The array as a read-only view of the message's bytes (equal to `array.numpy()`)."""
    data = array.data
    if array.stype == "numpy.ndarray" and data[:6] == NPY_MAGIC:
        size = 2 if data[6] == 1 else 4  # .npy version 1 has a 2-byte header length, versions 2 and 3 a 4-byte one
        start = 8 + size + int.from_bytes(data[8:8 + size], "little")
        dtype = np.dtype(array.dtype)
        nbytes = math.prod(array.shape) * dtype.itemsize
        if len(data) - start == nbytes and b"'fortran_order': False" in data[8 + size:start]:
            return np.frombuffer(data, dtype=dtype, offset=start).reshape(array.shape)
    return array.numpy()


def to_state_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """`record.to_torch_state_dict()`, decoded by `to_numpy` (each tensor its own writable copy)."""
    return {name: torch.from_numpy(to_numpy(array).copy()) for name, array in record.items()}


def weighted_mean(records: list[RecordDict], weight_key: str) -> ArrayRecord:
    """Flower's `aggregate_arrayrecords`: the mean of every reply's arrays, each weighted by its first
    MetricRecord's `weight_key` over their sum, accumulated in the replies' order."""
    weights = [next(iter(record.metric_records.values()))[weight_key] for record in records]
    total = sum(weights)
    mean: dict[str, np.ndarray] = {}
    for record, weight in zip(records, [w / total for w in weights], strict=True):
        for arrays in record.array_records.values():
            for name, array in arrays.items():
                if name in mean:
                    mean[name] += to_numpy(array) * weight
                else:
                    mean[name] = to_numpy(array) * weight
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in mean.items()})
