"""Schema-driven fuzzing of the HTTP API from its own OpenAPI document, with schemathesis.

The app ``oclaw serve`` runs, on a real uvicorn on 127.0.0.1, serves ``/openapi.json``; schemathesis generates
requests for every operation in it: ones the schema allows and ones that break it, most naming the repository's
real models so that they get past the model lookup, and infer requests with a model's real inputs. Each response
is checked: no 5xx (except a repository parameter oclaw does not act on: the 501 the document declares), the body
conforms to the schema declared for its status, the content type is one declared. Once without access control and
once with an admin key (Authorization header). Deterministic (``derandomize=True``, no example database); the
module prints how many cases ran: 1,688, ~15 s on 2 cores.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from engine import auth
from handler.openapi import INFER, INFER_VERSION
from tests.conftest import ServerThread, start_server

#: The models the server holds: the cases name them as often as they name a random model.
MODELS = ["add_sub", "identity_fp32", "identity_bytes", "fixed"]
#: Generated cases per operation and generation mode (valid, schema-breaking).
EXAMPLES = 30
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]

#: Cases run, by auth mode and status; printed when the module ends.
COUNTS: dict[str, Counter[int]] = {}


@pytest.fixture(scope="module", autouse=True)
def report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print how many cases ran, by status, when the module ends (past pytest's output capture)."""
    yield
    lines = [
        f"fuzz openapi {mode}: {sum(c.values())} cases (status {', '.join(f'{k}: {v}' for k, v in sorted(c.items()))})"
        for mode, c in COUNTS.items()
    ]
    lines.append(f"fuzz openapi total: {sum(sum(c.values()) for c in COUNTS.values())} cases")
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


@pytest.fixture(scope="module", params=["open", "keys"])
def api(
    request: pytest.FixtureRequest, repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ServerThread, dict[str, str]]]:
    """A server over MODELS, without access control or with one admin key; its mode and the headers to send."""
    small = tmp_path_factory.mktemp("models")
    for name in MODELS:
        shutil.copytree(repo / name, small / name)
    headers: dict[str, str] = {}
    if request.param == "keys":
        key, entry = auth.create_key("admin", "fuzz", name="fuzz")
        keys = tmp_path_factory.mktemp("keys") / "keys.json"
        keys.write_text(json.dumps([entry.as_dict()]))
        server = start_server(small, api_keys=str(keys))
        headers["Authorization"] = f"Bearer {key}"
    else:
        server = start_server(small)
    yield request.param, server, headers
    server.stop()


def valid_bodies(metadata: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Infer requests a model accepts (from its metadata: dynamic dimensions 1 to 3), outputs JSON or binary."""

    def tensor(spec: dict[str, Any], shape: list[int]) -> st.SearchStrategy[dict[str, Any]]:
        n = math.prod(shape)
        values = st.text(max_size=6) if spec["datatype"] == "BYTES" else st.floats(-1e6, 1e6, width=32)
        data = st.lists(values, min_size=n, max_size=n)
        return data.map(lambda d: {"name": spec["name"], "datatype": spec["datatype"], "shape": shape, "data": d})

    def request(dims: list[int]) -> st.SearchStrategy[dict[str, Any]]:
        shapes = [[d if d >= 0 else dims[i] for i, d in enumerate(s["shape"])] for s in metadata["inputs"]]
        inputs = st.tuples(*(tensor(s, shape) for s, shape in zip(metadata["inputs"], shapes, strict=True)))
        binary = st.booleans().map(lambda b: {"binary_data_output": b})
        return st.builds(lambda i, p: {"inputs": list(i), "parameters": p}, inputs, binary)

    return st.lists(st.integers(1, 3), min_size=4, max_size=4).flatmap(request)


def cases(operation: APIOperation, metadata: dict[str, dict[str, Any]]) -> st.SearchStrategy[schemathesis.Case]:
    """Valid and schema-breaking cases; for a model's routes, most of them name a real model (load and unload:
    never, so every model stays loaded), and an infer request sometimes has that model's real inputs."""
    names = {p.name for p in operation.path_parameters}
    fixed: list[dict[str, str]] = [{}]
    if "model_name" in names and "/repository/" not in operation.path:
        fixed += [
            {"model_name": m, "model_version": "1"} if "model_version" in names else {"model_name": m} for m in MODELS
        ]
    strategies = [
        operation.as_strategy(mode, path_parameters=params)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        for params in fixed
    ]
    if operation.path.endswith("/infer"):
        strategies += [
            valid_bodies(metadata[params["model_name"]]).flatmap(
                lambda body, params=params: operation.as_strategy(
                    path_parameters=params, body=body, media_type="application/json"
                )
            )
            for params in fixed[1:]
        ]
    return st.one_of(*strategies)


def test_every_operation_of_the_openapi_document(api: tuple[str, ServerThread, dict[str, str]]) -> None:
    """Every operation, valid and schema-breaking cases: a declared answer, never a 5xx."""
    mode, server, headers = api
    doc = httpx.get(f"{server.url}/openapi.json", headers=headers, timeout=30).json()
    assert {INFER, INFER_VERSION} <= set(doc["paths"])
    assert doc["paths"][INFER]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InferenceRequest"
    }
    schema = schemathesis.openapi.from_dict(doc)
    metadata = {m: httpx.get(f"{server.url}/v2/models/{m}", headers=headers).json() for m in MODELS}
    if headers:  # the routes past access control are reached because of the key
        assert httpx.get(f"{server.url}/v2/models/add_sub").status_code == 401
    counts = COUNTS.setdefault(mode, Counter())
    failures: list[str] = []
    answered: set[str] = set()  # operations that got a 200
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len([m for item in doc["paths"].values() for m in item])
    with requests.Session() as session:
        for operation in operations:

            @settings(
                max_examples=EXAMPLES * 2,
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=cases(operation, metadata))
            def run(case: schemathesis.Case) -> None:
                response = case.call(base_url=server.url, session=session, headers=headers, timeout=30)
                counts[response.status_code] += 1
                if response.status_code == 200:
                    answered.add(case.operation.label)
                repository = "/repository/models/" in case.operation.path
                checks = CHECKS[1:] if response.status_code == 501 and repository else CHECKS
                case.validate_response(response, checks=checks, headers=headers)

            try:
                run()
            except (AssertionError, FailureGroup) as exc:
                failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    # every operation was answered at least once, but load and unload (never sent a real model's name)
    assert {op.label for op in operations if "/repository/models/" not in op.path} <= answered
    assert sum(counts.values()) >= EXAMPLES * len(operations)
