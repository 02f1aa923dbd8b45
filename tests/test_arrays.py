"""Decoding and encoding a message's arrays in place gives what Flower's own code gives, byte for byte."""
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from pluralllm_flwr.arrays import to_array, to_numpy, to_record, to_state_dict, weighted_mean
from pluralllm_flwr.strategies import STRATEGIES, FastMean

from .test_federated import reply


VALUES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(2.5),                                   # a 0-d array
    np.zeros((0, 5), np.float32),                    # an empty one
    np.array([[1, 2], [3, 4]], dtype=np.int64),
    np.array([True, False]),
    np.arange(6, dtype=">f4"),                       # big-endian
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),  # Fortran order: left to np.load
    np.arange(40, dtype=np.float16)[::3],            # a strided view (saved contiguous)
]


@pytest.mark.parametrize("value", VALUES)
def test_to_numpy_equals_flowers_decoding(value):
    array = Array(value)
    ours, flowers = to_numpy(array), array.numpy()
    assert ours.dtype == flowers.dtype and ours.shape == flowers.shape
    assert ours.tobytes() == flowers.tobytes()


def same_array(ours: Array, flowers: Array) -> bool:
    return (ours.dtype, ours.shape, ours.stype, ours.data) == (flowers.dtype, flowers.shape, flowers.stype, flowers.data)


@pytest.mark.parametrize("value", VALUES + [np.zeros(3, [("a", "<i4"), ("b", "<f8")])])  # + a structured dtype
def test_to_array_equals_flowers_encoding(value):
    assert same_array(to_array(value), Array(value))
    other = np.ones_like(value)  # the same dtype and shape again: the cached header, new data
    assert same_array(to_array(other), Array(other))


@pytest.mark.parametrize("tensor", [torch.randn(4, 6), torch.randn(6, 4).t(), torch.tensor(1.5),
                                    torch.arange(5, dtype=torch.int64), torch.randn(3, requires_grad=True)])
def test_to_array_of_a_tensor_equals_flowers(tensor):
    assert same_array(to_array(tensor), Array(tensor.detach()))


def test_to_record_equals_flowers_array_record():
    state = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3)).state_dict()  # float and int64
    ours, flowers = to_record(state), ArrayRecord(state)
    assert list(ours) == list(flowers)
    assert all(same_array(ours[name], flowers[name]) for name in flowers)
    assert ours.object_id == flowers.object_id  # what Flower hashes to ship and deduplicate a message


def test_a_payload_that_is_not_plain_npy_falls_back_to_flower(monkeypatch):
    array = Array(np.arange(4, dtype=np.float32))
    called = []
    monkeypatch.setattr(Array, "numpy", lambda self: called.append(1) or np.zeros(4, np.float32))
    array.data = array.data[:-1]  # length does not match dtype × shape
    assert to_numpy(array).tolist() == [0, 0, 0, 0] and called


def test_to_state_dict_equals_flowers_and_is_writable():
    state = {"w": torch.randn(3, 5), "b": torch.arange(4, dtype=torch.int64)}
    record = ArrayRecord(state)
    ours, flowers = to_state_dict(record), record.to_torch_state_dict()
    assert list(ours) == list(flowers)
    for name in ours:
        assert torch.equal(ours[name], flowers[name]) and ours[name].dtype == flowers[name].dtype
    ours["w"] += 1  # a copy, not a view of the message


def replies(weights):
    rng = np.random.default_rng(0)
    return [RecordDict({"arrays": ArrayRecord({"a": Array(rng.standard_normal((7, 3)).astype(np.float32)),
                                               "b": Array(rng.standard_normal(5).astype(np.float32))}),
                        "metrics": MetricRecord({"num-examples": w, "loss": float(i)})})
            for i, w in enumerate(weights)]


@pytest.mark.parametrize("weights", [[1, 1, 1], [3, 7, 11, 2], [0.3, 1.7]])
def test_weighted_mean_is_byte_identical_to_flowers(weights):
    records = replies(weights)
    ours, flowers = weighted_mean(records, "num-examples"), aggregate_arrayrecords(records, "num-examples")
    assert list(ours) == list(flowers)
    for name in ours:
        assert ours[name].data == flowers[name].data


@pytest.mark.parametrize("base", [FedAvg, FedAdam])
def test_fast_mean_strategies_aggregate_as_flowers_own(base):
    """A Flower strategy with FastMean behind it aggregates exactly as the strategy alone."""
    fast = FastMean() if base is FedAvg else type("Fast", (base, FastMean), {})()
    plain = base()
    arrays = ArrayRecord({"a": Array(np.ones((7, 3), np.float32)), "b": Array(np.ones(5, np.float32))})
    for strategy in (fast, plain):
        strategy.current_arrays = {k: v.numpy() for k, v in arrays.items()}  # FedOpt's state after configure_train
    messages = [reply(i, content) for i, content in enumerate(replies([3, 7, 11]))]
    (ours, our_metrics), (flowers, flower_metrics) = fast.aggregate_train(1, messages), plain.aggregate_train(1, messages)
    assert all(ours[k].data == flowers[k].data for k in flowers) and list(ours) == list(flowers)
    assert dict(our_metrics) == dict(flower_metrics)


def test_every_strategy_built_on_fedavgs_mean_uses_fast_mean():
    for name, strategy in STRATEGIES.items():
        uses_mean = name not in ("fedmedian", "qfedavg")  # their own aggregation rules
        assert (FastMean in strategy.__mro__) == uses_mean, name
