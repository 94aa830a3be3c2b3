"""Dynamic batching with a runner free, the manifest's dynamic_batching keys, an unloaded batched model freed.

With two runners, a lone request runs at once and a queue waits for its preferred batch size or its delay.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from engine.dynbatch import batcher_for
from engine.errors import ConfigError
from engine.repository.manifest import load_manifest
from tests.batchkit import BATCHING, batcher_of, counter, held, model_of, outputs, post, queue_up, wait_until, x_body
from tests.conftest import ServerThread, start_server
from tests.modelgen import _save


@pytest.fixture(scope="module")
def srv2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """Two runners per model (OCLAW_MODEL_CONCURRENCY=2)."""
    repo = tmp_path_factory.mktemp("two-runners")
    pref = {"max_queue_delay_microseconds": 10_000_000, "preferred_batch_size": [3]}
    _save(counter(), repo, "counter_pref", 1, {"max_batch_size": 8, "dynamic_batching": pref})
    delay = {"max_queue_delay_microseconds": 1000}
    _save(counter(), repo, "counter_delay", 1, {"max_batch_size": 8, "dynamic_batching": delay})
    server = start_server(repo, model_concurrency=2, inline_run_us=0)
    yield server
    server.stop()


def test_a_lone_request_is_never_delayed(srv2: ServerThread) -> None:
    # two runners and a 10 s max_queue_delay: a request arriving to an idle model runs at once, on its own
    batcher = batcher_of(srv2, "counter_pref")
    runs = batcher.runs
    began = time.monotonic()
    resp = post(srv2, "counter_pref", *x_body(np.ones((1, 4), np.float32)))
    assert outputs(resp)["n"].tolist() == [1]
    assert time.monotonic() - began < 5  # the 10 s max_queue_delay was not waited
    assert batcher.runs == runs  # served on the path of a model without batching


def test_with_a_runner_free_the_queue_waits_for_a_preferred_batch_size(srv2: ServerThread) -> None:
    model, batcher = model_of(srv2, "counter_pref"), batcher_of(srv2, "counter_pref")
    body = x_body(np.ones((1, 4), np.float32))
    with ThreadPoolExecutor(8) as pool:
        with held(model, threads=2):
            lone = pool.submit(post, srv2, "counter_pref", *body)
            wait_until(lambda: batcher.busy == 1, "the first request is in flight")
            first = queue_up(srv2, "counter_pref", pool, [lambda: post(srv2, "counter_pref", *body)] * 2)
            assert (batcher.busy, len(batcher.queue)) == (1, 2)  # a runner is free, yet they wait for company
            third = pool.submit(post, srv2, "counter_pref", *body)
            wait_until(lambda: batcher.busy == 2 and not batcher.queue, "the preferred batch of 3 started")
        assert outputs(lone.result(timeout=30))["n"].tolist() == [1]
        assert [outputs(f.result(timeout=30))["n"].tolist() for f in [*first, third]] == [[3]] * 3


def test_with_a_runner_free_the_queue_runs_after_max_queue_delay(srv2: ServerThread) -> None:
    model, batcher = model_of(srv2, "counter_delay"), batcher_of(srv2, "counter_delay")
    body = x_body(np.ones((1, 4), np.float32))
    with ThreadPoolExecutor(4) as pool:
        with held(model, threads=2):
            lone = pool.submit(post, srv2, "counter_delay", *body)
            wait_until(lambda: batcher.busy == 1, "the first request is in flight")
            queued = pool.submit(post, srv2, "counter_delay", *body)
            wait_until(lambda: batcher.busy == 2 and not batcher.queue, "the delay ran out and a run started")
        assert outputs(queued.result(timeout=30))["n"].tolist() == [1]
        assert lone.result(timeout=30).status_code == 200


# -- the manifest ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ({"dynamic_batching": {}}, "dynamic_batching needs max_batch_size >= 1"),
        ({"max_batch_size": 8, "dynamic_batching": []}, "dynamic_batching must be an object"),
        (
            {"max_batch_size": 8, "dynamic_batching": {"max_queue_delay_microseconds": -1}},
            "dynamic_batching.max_queue_delay_microseconds must be a non-negative integer",
        ),
        (
            {"max_batch_size": 8, "dynamic_batching": {"max_queue_size": 0}},
            "dynamic_batching.max_queue_size must be a positive integer",
        ),
        (
            {"max_batch_size": 8, "dynamic_batching": {"preferred_batch_size": [4, 16]}},
            "dynamic_batching.preferred_batch_size 16 exceeds max_batch_size 8",
        ),
        (
            {"max_batch_size": 8, "dynamic_batching": {"preferred_batch_size": 4}},
            "dynamic_batching.preferred_batch_size must be a list",
        ),
        (
            {"max_batch_size": 8, "dynamic_batching": {"max_queue_delay_microsecond": 10}},
            "did you mean 'dynamic_batching.max_queue_delay_microseconds'",
        ),
        (
            {"max_batch_size": 8, "dynamic_batching": {"default_queue_policy": {}}},
            "unknown key 'dynamic_batching.default_queue_policy'",
        ),
    ],
)
def test_manifest_errors_name_the_key(tmp_path: Path, manifest: dict[str, Any], message: str) -> None:
    (tmp_path / "oclaw.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError) as caught:
        load_manifest(tmp_path)
    assert message in caught.value.message


def test_manifest_reads_tritons_names(tmp_path: Path) -> None:
    spec = {"max_queue_delay_microseconds": 500, "preferred_batch_size": [8, 4], "max_queue_size": 32}
    (tmp_path / "oclaw.json").write_text(json.dumps({"max_batch_size": 8, "dynamic_batching": spec}))
    batching = load_manifest(tmp_path).dynamic_batching
    assert batching is not None
    assert (batching.max_queue_delay_microseconds, batching.preferred_batch_size, batching.max_queue_size) == (
        500,
        (4, 8),
        32,
    )
    assert load_manifest(tmp_path / "missing").dynamic_batching is None


def test_an_unloaded_batched_model_is_freed(tmp_path: Path) -> None:
    """The batcher does not keep its model alive: a batched model the pool unloads is freed (memory comes back)."""
    import gc
    import weakref

    _save(counter(), tmp_path, "counter", 1, {"max_batch_size": 64, "dynamic_batching": BATCHING})
    server = start_server(tmp_path, inline_run_us=0)
    try:
        outputs(post(server, "counter", *x_body(np.ones((2, 4), np.float32))))
        model = weakref.ref(model_of(server, "counter"))
        assert batcher_for(model_of(server, "counter")) is not None
        unload = httpx.post(f"{server.url}/v2/repository/models/counter/unload", json={}, timeout=30)
        assert unload.status_code == 200, unload.text
        gc.collect()
        assert model() is None
    finally:
        server.stop()
