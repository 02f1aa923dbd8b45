"""Reading and writing a message's arrays without `np.load` and `np.save`.

Flower serialises each array of an `ArrayRecord` in NumPy's .npy format and decodes one with
`np.load`, which parses its header as Python source, array by array: for GPO's 84 arrays that is most of
the server's weighted mean of a round's replies and of a client's loading of the global weights
(benchmarks/bench_arrays.py). `to_numpy` reads the array's bytes in place, with the dtype and shape that
`Array` already carries, and falls back to `Array.numpy` for anything but a C-ordered .npy payload.
`weighted_mean` is Flower's `aggregate_arrayrecords` on top of it: the same operations in the same
order, so the same bytes (tests/test_arrays.py). `to_record` builds an `ArrayRecord` the way
`ArrayRecord(state_dict)` does, with each array's .npy header formatted once per dtype and shape
instead of once per array and message: the same bytes, for GPO about 0.3 ms less per reply and 3 ms
less per round's mean; most of an encoding's cost is building the `Array` objects.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

NPY_MAGIC = b"\x93NUMPY"
_headers: dict[tuple[str, tuple[int, ...]], bytes] = {}  # (dtype, shape) -> np.save's header for a C-ordered array


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


def to_array(value: np.ndarray | torch.Tensor) -> Array:
    """`Array(value)`: the same .npy bytes, its header taken from `np.save` the first time a dtype and shape
    are seen. Arrays that are not C-contiguous (np.save writes those otherwise) or of a structured dtype go
    to `Array` itself."""
    value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if not value.flags.c_contiguous or value.dtype.fields is not None or value.dtype.hasobject:
        return Array(value)
    key = (value.dtype.str, value.shape)
    data = value.tobytes()
    if (header := _headers.get(key)) is None:
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        saved = buffer.getvalue()
        header = _headers[key] = saved[:len(saved) - len(data)]
    return Array(dtype=str(value.dtype), shape=tuple(value.shape), stype="numpy.ndarray", data=header + data)


def to_record(state: Mapping[str, np.ndarray | torch.Tensor]) -> ArrayRecord:
    """`ArrayRecord(state)` for a state dict or a dict of NumPy arrays, each array by `to_array`."""
    return ArrayRecord({name: to_array(value) for name, value in state.items()})


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
    return to_record(mean)
