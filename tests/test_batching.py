"""Row batching: many requests through one run, split back per request, bad items isolated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.batching import infer_many
from engine.config import Settings
from engine.errors import OclawError
from engine.metering.records import split_int as split_evenly
from engine.model import LoadedModel
from engine.pool import ModelPool
from engine.repository.local import LocalRepository
from engine.tensors import InferRequest, InferResponse, InputTensor


@pytest.fixture(scope="module")
def models(repo: Path) -> ModelPool:
    pool = ModelPool(LocalRepository(repo), Settings.from_env({}))
    for name in ("gather", "add_sub", "fixed"):
        pool.load(name)
    return pool


def idx_request(*values: int) -> InferRequest:
    arr = np.array(values, dtype=np.int64)
    return InferRequest(inputs=[InputTensor("idx", "INT64", arr.shape, arr)], id=f"r{values}")


@pytest.mark.parametrize(("total", "weights"), [(10, [1, 1, 1]), (7, [5, 0, 2]), (1_000_003, [3, 9, 1, 1])])
def test_split_evenly_adds_up_exactly(total: int, weights: list[int]) -> None:
    parts = split_evenly(total, weights)
    assert sum(parts) == total and len(parts) == len(weights)


def test_rows_of_many_requests_run_together_and_split_back(models: ModelPool) -> None:
    model = models.get("gather")
    before = model.stats.as_dict("gather", "1")["execution_count"]
    requests = [idx_request(1, 2), idx_request(3), idx_request(0, 9, 4)]
    results = infer_many(model, requests)
    assert all(isinstance(r, InferResponse) for r in results)
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    for req, res in zip(requests, results, strict=True):
        assert isinstance(res, InferResponse) and res.id == req.id
        np.testing.assert_array_equal(res.outputs[0].array, table[req.inputs[0].array])
    stats = model.stats.as_dict("gather", "1")
    assert stats["execution_count"] == before + 1  # one run of the three requests (Triton: executions) ...
    assert stats["inference_stats"]["success"]["count"] >= 3  # ... each request a success
    assert stats["inference_count"] >= 6  # ... and rows per request
    assert {"batch_size": 6, "compute_infer": {"count": 1}} in [
        {"batch_size": b["batch_size"], "compute_infer": {"count": b["compute_infer"]["count"]}}
        for b in stats["batch_stats"]
    ]


def test_a_bad_item_is_isolated_from_its_batch(models: ModelPool) -> None:
    model: LoadedModel = models.get("gather")
    requests = [idx_request(1), idx_request(99), idx_request(2, 3), InferRequest(inputs=[])]
    results = infer_many(model, requests)
    assert isinstance(results[0], InferResponse) and isinstance(results[2], InferResponse)
    assert isinstance(results[1], OclawError) and "could not run this input" in results[1].message
    assert isinstance(results[3], OclawError) and "missing input" in results[3].message
    np.testing.assert_array_equal(results[2].outputs[0].array, np.arange(40, dtype=np.float32).reshape(10, 4)[[2, 3]])


def test_max_rows_bounds_each_run_and_fixed_shape_models_run_alone(models: ModelPool) -> None:
    model = models.get("gather")
    before = model.stats.as_dict("gather", "1")["inference_stats"]["compute_infer"]["count"]
    results = infer_many(model, [idx_request(i % 10) for i in range(9)], max_rows=4)
    assert len(results) == 9 and all(isinstance(r, InferResponse) for r in results)
    fixed = models.get("fixed")
    assert not fixed.batchable and models.get("add_sub").batchable
    x = np.ones((2, 3), dtype=np.float32)
    outs = infer_many(fixed, [InferRequest(inputs=[InputTensor("x", "FP32", (2, 3), x)]) for _ in range(3)])
    assert all(isinstance(o, InferResponse) and (o.outputs[0].array == 2).all() for o in outs)
    assert model.stats.as_dict("gather", "1")["inference_stats"]["compute_infer"]["count"] == before + 9
