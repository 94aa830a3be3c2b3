"""onnxruntime sessions: options, execution providers with CPU fallback."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from engine.config import Settings
from engine.errors import ConfigError, ModelLoadError
from engine.optimize.prepare import prepared_path

log = logging.getLogger("oclaw.session")

#: Short provider names (OCLAW_PROVIDERS) -> onnxruntime provider names.
PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "azure": "AzureExecutionProvider",
}

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


#: onnxruntime's log severity for its fatal messages only (0 verbose, 1 info, 2 warning, 3 error, 4 fatal).
ORT_FATAL = 4
ort.set_default_logger_severity(ORT_FATAL)  # the process-wide logger, used where no session's applies


def resolve_providers(wanted: tuple[str, ...], available: list[str] | None = None) -> list[str]:
    """Map short names to ORT providers, drop unavailable ones with a warning, always end with CPU."""
    have = set(ort.get_available_providers() if available is None else available)
    chosen: list[str] = []
    for short in wanted:
        full = PROVIDER_NAMES[short]
        if full in have:
            if full not in chosen:
                chosen.append(full)
        else:
            log.warning("execution provider %r is not available here; falling back to CPU", short)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


#: OCLAW_CUDA_CONV_ALGO_SEARCH -> the CUDA provider's cudnn_conv_algo_search.
_CONV_ALGO_SEARCH = {"heuristic": "HEURISTIC", "exhaustive": "EXHAUSTIVE", "default": "DEFAULT"}

ProviderSpec = str | tuple[str, dict[str, str]]


def provider_options(
    providers: list[str], settings: Settings, device_bytes: Callable[[int], int] | None = None
) -> list[ProviderSpec]:
    """The providers with their options, as InferenceSession takes them: the CUDA provider on
    OCLAW_CUDA_DEVICE_ID, its arena growing by what is asked (not doubling) and capped at OCLAW_GPU_MEMORY_LIMIT of
    the device's memory, cuDNN's algorithm search per OCLAW_CUDA_CONV_ALGO_SEARCH; TensorRT on the same device.

    ``device_bytes`` (the device's memory, by CUDA device number) defaults to asking NVML.
    """
    specs: list[ProviderSpec] = []
    for name in providers:
        if name == "CUDAExecutionProvider":
            options = {
                "device_id": str(settings.cuda_device_id),
                "arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_algo_search": _CONV_ALGO_SEARCH[settings.cuda_conv_algo_search],
            }
            if settings.gpu_memory_limit:
                total = (device_bytes or gpu_memory_bytes)(settings.cuda_device_id)
                options["gpu_mem_limit"] = str(int(total * settings.gpu_memory_limit))
            specs.append((name, options))
        elif name == "TensorrtExecutionProvider":
            specs.append((name, {"device_id": str(settings.cuda_device_id)}))
        else:
            specs.append(name)
    return specs


def gpu_memory_bytes(device_id: int) -> int:
    """The memory of CUDA device ``device_id``, from NVML (nvidia-ml-py); NVML numbers devices ignoring
    CUDA_VISIBLE_DEVICES, so the CUDA number is mapped through it first."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        raise ConfigError(
            "OCLAW_GPU_MEMORY_LIMIT needs the device's memory size from NVML: pip install 'oclaw[gpu]' (nvidia-ml-py)"
        ) from None
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    target = visible[device_id] if device_id < len(visible) else str(device_id)
    try:
        pynvml.nvmlInit()
        try:
            if target.isdigit():
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(target))
            else:
                handle = pynvml.nvmlDeviceGetHandleByUUID(target)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        raise ConfigError(f"OCLAW_GPU_MEMORY_LIMIT: cannot read CUDA device {device_id}'s memory: {exc}") from None


def device_of(session: ort.InferenceSession, settings: Settings) -> str:
    """Where a session runs: ``cuda:<id>`` (CUDA or TensorRT first among its providers), else the provider's
    short name (``cpu``, ``openvino``, ...)."""
    first = session.get_providers()[0]
    if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return f"cuda:{settings.cuda_device_id}"
    return next((short for short, full in PROVIDER_NAMES.items() if full == first), first)


def session_options(settings: Settings, threads: int | None = None) -> ort.SessionOptions:
    """SessionOptions for one model under these settings (``threads``: intra-op threads, else the settings')."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or settings.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _OPT_LEVELS[settings.graph_optimization]
    # onnxruntime writes its own ANSI-coloured lines to stderr, outside the JSON log stream; oclaw reports every
    # error they would show (a failed session, run or warm-up raises and is logged), so only fatal ones remain
    opts.log_severity_level = ORT_FATAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
    return opts


def choose_model_file(path: Path, settings: Settings, providers: list[str]) -> tuple[Path, bool]:
    """The file to load (a compatible prepared graph when there is one) and whether it is prepared."""
    if not settings.use_prepared or providers != ["CPUExecutionProvider"]:
        return path, False
    chosen, reason = prepared_path(path)
    if reason is not None and reason != "not prepared":
        log.warning("%s: prepared graph not used (%s); optimising at load instead", path, reason)
    return chosen, chosen != path


def default_instance_count(providers: list[str]) -> int:
    """Sessions per model when its manifest does not say (``instance_count``): one on a CPU, where one session's
    intra-op threads already use every core; two on a CUDA device, each with its own stream, so one run's host work
    and copies overlap the other's kernels (Triton's advice for GPU throughput; not measured by oclaw yet)."""
    return 2 if providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else 1


def create_session(path: Path, settings: Settings, threads: int | None = None) -> tuple[ort.InferenceSession, bool]:
    """Create a session of a model file (and say whether a prepared graph was used); ``threads``: its intra-op
    threads (an instance's share of the cores), else the settings'.

    Falls back to CPU if an accelerator fails to start, and to the source model if a prepared one fails.
    """
    providers = resolve_providers(settings.providers)
    specs = provider_options(providers, settings)
    opts = session_options(settings, threads)
    chosen, prepared = choose_model_file(path, settings, providers)
    if prepared:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(chosen), sess_options=opts, providers=specs), True
        except Exception as exc:  # noqa: BLE001 - fall back to the source model, never fail on a cache
            log.warning("%s: prepared graph failed to load (%s); using the source model", chosen, exc)
            opts = session_options(settings, threads)
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=specs)
    except Exception as exc:
        if providers == ["CPUExecutionProvider"]:
            raise ModelLoadError(f"{path}: {exc}") from exc
        log.warning("session with %s failed (%s); retrying on CPU", providers, exc)
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc2:
            raise ModelLoadError(f"{path}: {exc2}") from exc2
    missing = [p for p in providers if p not in session.get_providers()]
    if missing:
        log.warning("%s: providers %s did not start; running on %s", path, missing, session.get_providers())
    return session, False
