"""The one typed settings object; the only module that reads ``OCLAW_*`` environment variables."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any

from engine.errors import ConfigError

log = logging.getLogger("oclaw.config")

_PROVIDERS = ("cpu", "cuda", "tensorrt", "openvino", "rocm", "migraphx", "dml", "coreml", "azure")
_OPT_LEVELS = ("disable", "basic", "extended", "all")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Settings that take one of a few words (matched without regard to case).
_CHOICES = {
    "graph_optimization": _OPT_LEVELS,
    "log_format": ("json", "text"),
    "cloudrun_billing": ("request", "instance"),
    "warmup": ("auto", "true", "false"),
    "cuda_conv_algo_search": ("heuristic", "exhaustive", "default"),
    "auth": ("auto", "keys", "none"),
}
#: Counts and sizes that must be at least 1, and those that may be 0.
_AT_LEAST_ONE = (
    "fetch_concurrency",
    "max_body_bytes",
    "max_tensor_elements",
    "model_concurrency",
    "lambda_max_body_bytes",
    "s3_chunk_lines",
)
_AT_LEAST_ZERO = (
    "cuda_device_id",
    "intra_op_threads",
    "inline_run_us",
    "drain_timeout_s",
    "lambda_reserve_ms",
    "idle_unload_s",
    "warmer_hold_ms",
    "api_keys_ttl_s",
    "warmer_traffic_window_s",
    "batch_max_rows",
)
_ABOVE_ZERO = ("cloudrun_vcpu", "cloudrun_memory_gib")
DEFAULT_PORT = 8000


def cgroup_cpu_limit(path: str = "/sys/fs/cgroup/cpu.max") -> float | None:
    """The cgroup v2 CPU quota in CPUs (``"200000 100000"`` -> 2.0), or None when unlimited or unknown."""
    try:
        with open(path, encoding="ascii") as fh:
            quota, period = fh.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def _shown(value: object) -> str:
    """A setting's value as it is written in the environment."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def invalid(key: str, value: object, why: str) -> ConfigError:
    """The one shape of a bad setting: ``KEY=value: why``."""
    return ConfigError(f"{key}={_shown(value)}: {why}")


def port_number(text: str) -> int:
    """A TCP port (1-65535) from text; ValueError saying why not."""
    try:
        port = int(text)
    except ValueError:
        raise ValueError("expected a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise ValueError("a port number is 1-65535")
    return port


def server_port(environ: Mapping[str, str] | None = None) -> int:
    """The port ``oclaw serve`` listens on when ``--port`` is absent: ``$PORT`` (set by Cloud Run), else 8000."""
    env = os.environ if environ is None else environ
    raw = env.get("PORT", "").strip()
    if not raw:
        return DEFAULT_PORT
    try:
        return port_number(raw)
    except ValueError as exc:
        raise invalid("PORT", raw, str(exc)) from None


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _warn_unknown(names: Mapping[str, str], known: set[str]) -> None:
    """Name each ``OCLAW_*`` variable that is no setting, with the setting it was probably meant to be."""
    import difflib

    for name in sorted(names):
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        log.warning("%s is not an oclaw setting and is ignored%s", name, hint)


def _number(kind: type[int] | type[float], value: str) -> int | float:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"expected {'an integer' if kind is int else 'a number'}") from None


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected a boolean (true/false, 1/0, yes/no, on/off)")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """oclaw configuration; each field is read from ``OCLAW_<FIELD NAME IN CAPITALS>``."""

    #: A directory, or ``s3://bucket/prefix`` (fetched into OCLAW_MODEL_CACHE at start-up).
    model_repository: str = "./models"
    #: Local cache of models fetched from an ``s3://`` repository (Lambda's only writable place is /tmp).
    model_cache: str = "/tmp/oclaw-models"
    #: Files downloaded (or uploaded by ``oclaw publish``) in parallel.
    fetch_concurrency: int = 8
    #: Models loaded at start-up; ``*`` means every model in the repository.
    preload: tuple[str, ...] = ("*",)
    #: Models whose failure makes the server not ready; empty means "the preloaded ones".
    required_models: tuple[str, ...] = ()
    #: Execution providers in priority order; unavailable ones fall back to ``cpu`` with a warning.
    providers: tuple[str, ...] = ("cpu",)
    #: CUDA (and TensorRT) device of every session, as CUDA numbers them (after CUDA_VISIBLE_DEVICES).
    cuda_device_id: int = 0
    #: Largest share of the device's memory onnxruntime's CUDA arena may take, per session (0 < f <= 1; 0 = no
    #: limit); needs nvidia-ml-py to read the device's size (the ``gpu`` extra).
    gpu_memory_limit: float = 0.0
    #: cuDNN convolution algorithm search: ``heuristic`` (fast first run: right for cold starts), ``exhaustive``
    #: (onnxruntime's default: benchmarks every algorithm at each new input shape, seconds on the first request)
    #: or ``default``.
    cuda_conv_algo_search: str = "heuristic"
    #: Intra-op threads per session; 0 means the CPUs this process may use.
    intra_op_threads: int = 0
    graph_optimization: str = "all"
    #: Let ORT worker threads spin briefly between parallel sections (onnxruntime's default: steadier latency;
    #: off saves CPU on hosts where idle CPU is billed or shared).
    allow_spinning: bool = True
    #: Load ``model.prepared.onnx`` (made by ``oclaw prepare``) with optimisations off when compatible.
    use_prepared: bool = True
    #: One inference per model when it loads, before it is reported ready: ``true``, ``false`` or ``auto`` (every
    #: load except on an on-demand Lambda instance, where the request that follows the load is the first run
    #: anyway: a warm-up there only adds one run to the cold start; provisioned-concurrency and SnapStart INITs,
    #: servers and Cloud Run warm up, off the request path).
    warmup: str = "auto"
    #: Largest accepted request body, in bytes (413 above it).
    max_body_bytes: int = 64 * 1024 * 1024
    #: Largest element count of one declared tensor shape (rejected before allocating).
    max_tensor_elements: int = 1 << 26
    #: Concurrent ``session.run`` calls per model (the rest queue).
    model_concurrency: int = 1
    #: MiB the loaded models may take (``engine.memory``): -1 = the platform's limit less a headroom, 0 = no budget.
    memory_budget_mb: int = -1
    #: Seconds after its last request that a model (not a required one) is unloaded; 0 = never.
    idle_unload_s: float = 0.0
    #: Models whose warm-up run took less than this run on the event loop instead of a thread.
    inline_run_us: int = 1000
    #: Seconds SIGTERM waits for in-flight requests before closing.
    drain_timeout_s: float = 30.0
    log_level: str = "INFO"
    #: ``json`` (one object per line on stdout, with request and correlation ids) or ``text`` (stderr).
    log_format: str = "json"
    #: Largest HTTP body a Lambda function accepts (Lambda's synchronous payload limit is 6 MB).
    lambda_max_body_bytes: int = 6 * 1024 * 1024
    #: Milliseconds kept in hand before the Lambda deadline: work that would not finish is refused.
    lambda_reserve_ms: int = 50
    #: Prefix stripped from HTTP paths on Lambda (e.g. an API Gateway base-path mapping).
    api_base_path: str = ""
    #: How long a fan-out target of the warmer holds its instance, so pings land on distinct instances.
    warmer_hold_ms: int = 75
    #: The warmer skips its fan-out when this instance served real traffic this recently.
    warmer_traffic_window_s: float = 60.0
    #: S3 events: objects under this prefix are inferred (``<prefix><model>/<key>``) ...
    s3_input_prefix: str = "input/"
    #: ... and their results written under this one, same relative key plus a suffix.
    s3_output_prefix: str = "output/"
    #: Model for every S3 object (default: the first key segment under the input prefix).
    s3_model: str = ""
    #: JSON Lines objects are inferred and saved in parts of this many lines (resumable across retries).
    s3_chunk_lines: int = 1000
    #: Rows per run when events are batched (0: the manifest's max_batch_size, else 64; 1: one at a time).
    batch_max_rows: int = 0
    #: Where SQS results go when a message names no ``reply_to``: ``s3://bucket/prefix`` or a queue URL.
    sqs_result_destination: str = ""
    #: Metering sinks, comma-separated (``engine.metering.sinks.SINKS``): ``log:packed`` (JSON lines on stdout, a busy
    #: second's requests packed a few to a line), ``log`` (a line per request), ``jsonl:PATH``, ..., ``none``.
    metering_sinks: tuple[str, ...] = ("log:packed",)
    #: AWS X-Ray tracing on Lambda through Powertools Tracer (needs aws-xray-sdk; adds its import to INIT).
    tracing: bool = False
    #: OpenTelemetry spans for `oclaw serve` requests (needs the otel extra).
    otel: bool = False
    #: Prometheus metrics at /metrics on `oclaw serve`.
    metrics: bool = True
    #: API key entries (``oclaw keys create``): a JSON file, ``ssm:/parameter`` or ``secretsmanager:secret``; with
    #: them every route but the health probes needs a key.
    api_keys: str = ""
    #: Seconds before keys kept in SSM or Secrets Manager are fetched again.
    api_keys_ttl_s: float = 300.0
    #: Access control: ``auto`` (keys when OCLAW_API_KEYS is set; `oclaw serve` on a non-loopback address refuses
    #: to start without them), ``keys`` (always required) or ``none`` (off, logged as a warning).
    auth: str = "auto"
    #: Request header naming the tenant when no authenticated principal does.
    tenant_header: str = "x-tenant-id"
    #: Records a failing sink could not take are kept here and re-sent on a later flush.
    metering_spool: str = "/tmp/oclaw-metering-spool.jsonl"
    #: Audit log sinks (``engine.audit``), spelt as OCLAW_METERING_SINKS (but ``log:packed`` and ``emf``): one record
    #: per inference and model operation; ``auto``: ``log`` when access control is on, else ``none``.
    audit_sinks: tuple[str, ...] = ("auto",)
    #: Audit records a failing sink could not take are kept here (apart from metering's) and re-sent later.
    audit_spool: str = "/tmp/oclaw-audit-spool.jsonl"
    #: JSON file of prices: {"lambda-arm64@eu-west-1": {"gb_second": ..., "request": ...}, "cloudrun-request": ...}.
    price_table: str = ""
    #: Region for the price table where the platform does not say (Lambda sets AWS_REGION).
    region: str = ""
    #: Price overrides in USD (negative: the built-in list price for the platform).
    price_gb_second: float = -1.0
    price_vcpu_second: float = -1.0
    price_gib_second: float = -1.0
    price_request: float = -1.0
    #: Cloud Run: the instance's vCPUs and memory, and its billing mode (``request`` or ``instance``).
    cloudrun_vcpu: float = 1.0
    cloudrun_memory_gib: float = 0.5
    cloudrun_billing: str = "request"
    extra: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        unknown = [p for p in self.providers if p not in _PROVIDERS]
        if unknown:
            why = f"unknown provider(s) {', '.join(unknown)}; use {', '.join(_PROVIDERS)}"
            raise invalid("OCLAW_PROVIDERS", self.providers, why)
        if self.log_level.upper() not in LOG_LEVELS:
            raise invalid("OCLAW_LOG_LEVEL", self.log_level, f"not a log level; use one of {', '.join(LOG_LEVELS)}")
        object.__setattr__(self, "log_level", self.log_level.upper())
        with contextlib.suppress(ValueError):  # OCLAW_WARMUP also takes the usual boolean spellings
            object.__setattr__(self, "warmup", str(_bool(str(self.warmup))).lower())
        for name, choices in _CHOICES.items():
            value = str(getattr(self, name)).strip().lower()
            if value not in choices:
                raise invalid(f"OCLAW_{name.upper()}", getattr(self, name), f"must be one of {', '.join(choices)}")
            object.__setattr__(self, name, value)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise invalid(f"OCLAW_{f.name.upper()}", value, "must be a finite number")
        for names, low, what in ((_AT_LEAST_ONE, 1, ">= 1"), (_AT_LEAST_ZERO, 0, ">= 0")):
            for name in names:
                if getattr(self, name) < low:
                    raise invalid(f"OCLAW_{name.upper()}", getattr(self, name), f"must be {what}")
        if self.memory_budget_mb < -1:
            raise invalid("OCLAW_MEMORY_BUDGET_MB", self.memory_budget_mb, "must be >= 0 (0: no budget)")
        for name in _ABOVE_ZERO:
            if getattr(self, name) <= 0:
                raise invalid(f"OCLAW_{name.upper()}", getattr(self, name), "must be > 0")
        if not 0 <= self.gpu_memory_limit <= 1:
            why = "must be a fraction of the device's memory, 0 < f <= 1 (0: no limit)"
            raise invalid("OCLAW_GPU_MEMORY_LIMIT", self.gpu_memory_limit, why)

    @property
    def threads(self) -> int:
        """Effective intra-op thread count."""
        return self.intra_op_threads or available_cpus()

    def warms_at_load(self, init_type: str | None) -> bool:
        """Whether a model is warmed up when it loads, on a Lambda instance of ``init_type`` (None elsewhere)."""
        if self.warmup == "auto":
            return init_type != "on-demand"
        return self.warmup == "true"

    @property
    def audit_sink_specs(self) -> tuple[str, ...]:
        """The audit sinks in force: OCLAW_AUDIT_SINKS with ``auto`` resolved (empty: no audit log)."""
        if self.audit_sinks != ("auto",):
            return tuple(spec for spec in self.audit_sinks if spec != "none")
        keys_on = self.auth == "keys" or (self.auth == "auto" and bool(self.api_keys))
        return ("log",) if keys_on else ()

    @property
    def preload_all(self) -> bool:
        """True when every model of the repository is preloaded."""
        return "*" in self.preload

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``OCLAW_*`` variables (unknown ones are kept in ``extra``); keyword overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        known = set()
        for f in fields(cls):
            if f.name == "extra":
                continue
            key = f"OCLAW_{f.name.upper()}"
            known.add(key)
            if key not in env or f.name in overrides:
                continue
            raw = env[key]
            default = f.default
            try:
                if isinstance(default, bool):
                    values[f.name] = _bool(raw)
                elif isinstance(default, int):
                    values[f.name] = _number(int, raw)
                elif isinstance(default, float):
                    values[f.name] = _number(float, raw)
                elif isinstance(default, tuple):
                    values[f.name] = tuple(p.lower() for p in _csv(raw)) if f.name == "providers" else _csv(raw)
                else:
                    values[f.name] = raw
            except ValueError as exc:
                raise invalid(key, raw, str(exc)) from None
        values.update(overrides)
        values["extra"] = extra = {k: v for k, v in env.items() if k.startswith("OCLAW_") and k not in known}
        if extra:
            _warn_unknown(extra, known)
        return cls(**values)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read from the environment once."""
    return Settings.from_env()
