"""``Client`` and ``AsyncClient``: one keep-alive connection pool each, retries, typed errors, the same API."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from oclaw_sdk._core import Call, Core, Inputs, ModelConfig, Plan, Reply, error_of, next_wait
from oclaw_sdk.errors import ConnectionFailed, OclawError
from oclaw_sdk.result import Result
from oclaw_sdk.retry import RetryPolicy

T = TypeVar("T")
#: What sends a call: a reply, or the ConnectionFailed of a call that got none (HTTP by default; see lambda_invoke).
SyncTransport = Callable[[Call], Reply | OclawError]
AsyncTransport = Callable[[Call], Awaitable[Reply | OclawError]]
_INDEX = "/v2/repository/index"


def _base_url(endpoint: str) -> str:
    endpoint = endpoint.rstrip("/")
    return endpoint if "://" in endpoint else f"http://{endpoint}"


def _limits(max_connections: int) -> httpx.Limits:
    return httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)


def _request(endpoint: str, call: Call) -> httpx.Request:
    """The call as an httpx request; its timeout, for every phase, in the extension httpx's transports read."""
    timeout = httpx.Timeout(call.timeout_s).as_dict()
    return httpx.Request(
        call.method, endpoint + call.path, content=call.body, headers=call.headers, extensions={"timeout": timeout}
    )


def _failed(call: Call, exc: Exception) -> ConnectionFailed:
    return ConnectionFailed(f"{call.method} {call.path}: {type(exc).__name__}: {exc}".rstrip(": "))


def _outcome(call: Call, reply: Reply) -> Reply | OclawError:
    return reply if reply.status < 400 or reply.status in call.accept else error_of(reply)


class Client:
    """A client of one oclaw server (or a V2 server alike): ``predict`` and the V2 endpoints.

    ``endpoint`` is the server's URL (a path prefix is kept); ``api_key`` goes as ``Authorization: Bearer``.
    Requests that fail to connect, or answer 429/502/503/504, are tried again after a backoff (``retry``) or the
    server's Retry-After. ``timeout_s`` bounds each phase of a request (connect, write, read, pool wait);
    ``max_connections`` the keep-alive pool, ``max_concurrency`` the parts of a batch in flight at once; ``auth``
    an httpx auth (``oclaw_sdk.aws.SigV4``), ``proxy`` a proxy URL (environment variables are not read);
    ``transport`` replaces HTTP (``for_lambda``).
    """

    def __init__(
        self,
        endpoint: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 16,
        max_concurrency: int = 8,
        headers: Mapping[str, str] | None = None,
        auth: httpx.Auth | None = None,
        proxy: str | None = None,
        transport: SyncTransport | None = None,
    ) -> None:
        self.endpoint = _base_url(endpoint)
        self.retry = retry or RetryPolicy()
        self.max_concurrency = max_concurrency
        self._core = Core(api_key=api_key, headers=headers, timeout_s=timeout_s, signed=auth is not None)
        # httpx's transport (its keep-alive pool) without httpx.Client, whose cookies, redirects and URL merging
        # cost about a third of the client's CPU time per request
        self._http = httpx.HTTPTransport(limits=_limits(max_connections), proxy=proxy)
        self._auth = auth
        self._transport = transport or self._send_http
        self._threads: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_lambda(
        cls, function_name: str, *, qualifier: str | None = None, lambda_client: Any = None, **options: Any
    ) -> Client:
        """A client that invokes the function with boto3's ``lambda.invoke`` instead of calling a URL
        (``lambda_client``: a boto3 Lambda client, default one from boto3's default session)."""
        from oclaw_sdk.aws import LambdaTransport

        transport = LambdaTransport(function_name, qualifier=qualifier, client=lambda_client)
        return cls(f"lambda://{function_name}", transport=transport, **options)

    # -- API -------------------------------------------------------------------------------------------------

    def predict(self, inputs: Inputs, model: str, config: ModelConfig | None = None) -> Result:
        """Run ``model`` on ``inputs`` (see ``Inputs``); large inputs go in concurrent parts of ``batch_size``."""
        return self._run(self._core.predict(inputs, model, config or ModelConfig()))

    def is_live(self) -> bool:
        """``GET /v2/health/live``."""
        return self._run(self._core.get("/v2/health/live", accept=frozenset({503}))).status == 200

    def is_ready(self) -> bool:
        """``GET /v2/health/ready``: every required model loaded."""
        return self._run(self._core.get("/v2/health/ready", accept=frozenset({503}))).status == 200

    def is_model_ready(self, model: str, version: str | int | None = None) -> bool:
        """``GET /v2/models/{m}[/versions/{v}]/ready``; False for an unknown model or version too."""
        path = self._core.model_path(model, version) + "/ready"
        return self._run(self._core.get(path, accept=frozenset({404, 503}))).status == 200

    def server_metadata(self) -> dict[str, Any]:
        """``GET /v2``: name, version, extensions."""
        return dict(self._run(self._core.get("/v2")).json())

    def model_metadata(self, model: str, version: str | int | None = None) -> dict[str, Any]:
        """A model's name, versions, platform, inputs and outputs."""
        return self._run(self._core.model_metadata(model, version))

    def model_config(self, model: str, version: str | int | None = None) -> dict[str, Any]:
        """A model version's Triton-style configuration (``parameters.precision`` among others)."""
        return self._run(self._core.model_config(model, version))

    def list_models(self, *, ready: bool = False) -> list[dict[str, Any]]:
        """The repository index (``POST /v2/repository/index``): name, version, state, reason of each model."""
        return list(self._run(self._core.post_json(_INDEX, {"ready": ready})).json())

    def model_statistics(self, model: str | None = None, version: str | int | None = None) -> dict[str, Any]:
        """Triton's statistics extension: request, inference and execution counts and times."""
        path = "/v2/models" if model is None else self._core.model_path(model, version)
        return dict(self._run(self._core.get(path + "/stats")).json())

    def close(self) -> None:
        """Close the connections (and the threads that sent parts of a batch)."""
        self._http.close()
        if self._threads is not None:
            self._threads.shutdown(wait=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- driving plans ---------------------------------------------------------------------------------------

    def _run(self, plan: Plan[T]) -> T:
        try:
            calls = next(plan)
            while True:
                calls = plan.send(self._send_all(calls))
        except StopIteration as stop:
            value: T = stop.value
            return value

    def _send_all(self, calls: list[Call]) -> list[Reply]:
        if len(calls) == 1:
            return [self._send(calls[0])]
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="oclaw-sdk")
        return list(self._threads.map(self._send, calls))

    def _send(self, call: Call) -> Reply:
        attempt = 0
        while True:
            outcome = self._transport(call)
            if isinstance(outcome, Reply):
                outcome = _outcome(call, outcome)
            if isinstance(outcome, Reply):
                return outcome
            wait = next_wait(self.retry, attempt, outcome)
            if wait is None:
                raise outcome
            time.sleep(wait)
            attempt += 1

    def _send_http(self, call: Call) -> Reply | OclawError:
        request = _request(self.endpoint, call)
        try:
            if self._auth is not None:
                request = next(self._auth.sync_auth_flow(request))
            response = self._http.handle_request(request)
            try:
                content = response.read()
            finally:
                response.close()
        except httpx.TransportError as exc:
            return _failed(call, exc)
        return Reply(response.status_code, response.headers, content)


class AsyncClient:
    """``Client``'s API for asyncio: the same methods, awaited; parts of a batch are sent concurrently."""

    def __init__(
        self,
        endpoint: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 16,
        max_concurrency: int = 8,
        headers: Mapping[str, str] | None = None,
        auth: httpx.Auth | None = None,
        proxy: str | None = None,
        transport: AsyncTransport | None = None,
    ) -> None:
        self.endpoint = _base_url(endpoint)
        self.retry = retry or RetryPolicy()
        self.max_concurrency = max_concurrency
        self._core = Core(api_key=api_key, headers=headers, timeout_s=timeout_s, signed=auth is not None)
        self._http = httpx.AsyncHTTPTransport(limits=_limits(max_connections), proxy=proxy)
        self._auth = auth
        self._transport = transport or self._send_http

    @classmethod
    def for_lambda(
        cls, function_name: str, *, qualifier: str | None = None, lambda_client: Any = None, **options: Any
    ) -> AsyncClient:
        """See ``Client.for_lambda``; each invoke runs in a thread (boto3 is synchronous)."""
        from oclaw_sdk.aws import LambdaTransport

        invoke = LambdaTransport(function_name, qualifier=qualifier, client=lambda_client)

        async def transport(call: Call) -> Reply | OclawError:
            return await asyncio.to_thread(invoke, call)

        return cls(f"lambda://{function_name}", transport=transport, **options)

    async def predict(self, inputs: Inputs, model: str, config: ModelConfig | None = None) -> Result:
        """See ``Client.predict``."""
        return await self._run(self._core.predict(inputs, model, config or ModelConfig()))

    async def is_live(self) -> bool:
        """``GET /v2/health/live``."""
        return (await self._run(self._core.get("/v2/health/live", accept=frozenset({503})))).status == 200

    async def is_ready(self) -> bool:
        """``GET /v2/health/ready``."""
        return (await self._run(self._core.get("/v2/health/ready", accept=frozenset({503})))).status == 200

    async def is_model_ready(self, model: str, version: str | int | None = None) -> bool:
        """``GET /v2/models/{m}[/versions/{v}]/ready``; False for an unknown model or version too."""
        path = self._core.model_path(model, version) + "/ready"
        return (await self._run(self._core.get(path, accept=frozenset({404, 503})))).status == 200

    async def server_metadata(self) -> dict[str, Any]:
        """``GET /v2``."""
        return dict((await self._run(self._core.get("/v2"))).json())

    async def model_metadata(self, model: str, version: str | int | None = None) -> dict[str, Any]:
        """See ``Client.model_metadata``."""
        return await self._run(self._core.model_metadata(model, version))

    async def model_config(self, model: str, version: str | int | None = None) -> dict[str, Any]:
        """See ``Client.model_config``."""
        return await self._run(self._core.model_config(model, version))

    async def list_models(self, *, ready: bool = False) -> list[dict[str, Any]]:
        """See ``Client.list_models``."""
        return list((await self._run(self._core.post_json(_INDEX, {"ready": ready}))).json())

    async def model_statistics(self, model: str | None = None, version: str | int | None = None) -> dict[str, Any]:
        """See ``Client.model_statistics``."""
        path = "/v2/models" if model is None else self._core.model_path(model, version)
        return dict((await self._run(self._core.get(path + "/stats"))).json())

    async def close(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _run(self, plan: Plan[T]) -> T:
        try:
            calls = next(plan)
            while True:
                calls = plan.send(await self._send_all(calls))
        except StopIteration as stop:
            value: T = stop.value
            return value

    async def _send_all(self, calls: list[Call]) -> list[Reply]:
        if len(calls) == 1:
            return [await self._send(calls[0])]
        limit = asyncio.Semaphore(self.max_concurrency)

        async def bounded(call: Call) -> Reply:
            async with limit:
                return await self._send(call)

        return list(await asyncio.gather(*(bounded(c) for c in calls)))

    async def _send(self, call: Call) -> Reply:
        attempt = 0
        while True:
            outcome = await self._transport(call)
            if isinstance(outcome, Reply):
                outcome = _outcome(call, outcome)
            if isinstance(outcome, Reply):
                return outcome
            wait = next_wait(self.retry, attempt, outcome)
            if wait is None:
                raise outcome
            await asyncio.sleep(wait)
            attempt += 1

    async def _send_http(self, call: Call) -> Reply | OclawError:
        request = _request(self.endpoint, call)
        try:
            if self._auth is not None:
                request = await anext(aiter(self._auth.async_auth_flow(request)))
            response = await self._http.handle_async_request(request)
            try:
                content = await response.aread()
            finally:
                await response.aclose()
        except httpx.TransportError as exc:
            return _failed(call, exc)
        return Reply(response.status_code, response.headers, content)
