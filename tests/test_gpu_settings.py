"""GPU settings, tested without a GPU: the CUDA provider's options, the memory limit, fallback to the CPU."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import httpx
import pytest

from engine.config import Settings
from engine.errors import ConfigError, OclawError
from engine.session import device_of, gpu_memory_bytes, provider_options
from tests.conftest import spawn_server

GIB = 1 << 30
CUDA = "CUDAExecutionProvider"


def test_cuda_options_carry_the_device_the_limit_and_the_algorithm_search() -> None:
    settings = Settings.from_env(
        {"OCLAW_CUDA_DEVICE_ID": "1", "OCLAW_GPU_MEMORY_LIMIT": "0.25", "OCLAW_CUDA_CONV_ALGO_SEARCH": "Exhaustive"}
    )
    asked: list[int] = []

    def device_bytes(device: int) -> int:
        asked.append(device)
        return 80 * GIB

    specs = provider_options([CUDA, "CPUExecutionProvider"], settings, device_bytes)
    assert specs == [
        (
            CUDA,
            {
                "device_id": "1",
                "arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_algo_search": "EXHAUSTIVE",
                "gpu_mem_limit": str(20 * GIB),
            },
        ),
        "CPUExecutionProvider",
    ]
    assert asked == [1]


def test_defaults_suit_a_cold_start_and_set_no_limit() -> None:
    specs = provider_options(["TensorrtExecutionProvider", CUDA, "CPUExecutionProvider"], Settings.from_env({}))
    assert specs == [
        ("TensorrtExecutionProvider", {"device_id": "0"}),
        (CUDA, {"device_id": "0", "arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "HEURISTIC"}),
        "CPUExecutionProvider",
    ]
    # a CPU-only process never asks the device's size
    assert provider_options(["CPUExecutionProvider"], Settings.from_env({"OCLAW_GPU_MEMORY_LIMIT": "0.5"})) == [
        "CPUExecutionProvider"
    ]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OCLAW_GPU_MEMORY_LIMIT": "1.5"}, "OCLAW_GPU_MEMORY_LIMIT=1.5: must be a fraction of the device's memory"),
        ({"OCLAW_GPU_MEMORY_LIMIT": "-0.1"}, "OCLAW_GPU_MEMORY_LIMIT=-0.1: must be a fraction"),
        ({"OCLAW_GPU_MEMORY_LIMIT": "half"}, "OCLAW_GPU_MEMORY_LIMIT=half: expected a number"),
        ({"OCLAW_CUDA_DEVICE_ID": "-1"}, "OCLAW_CUDA_DEVICE_ID=-1: must be >= 0"),
        ({"OCLAW_CUDA_CONV_ALGO_SEARCH": "fast"}, "must be one of heuristic, exhaustive, default"),
    ],
)
def test_bad_gpu_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(OclawError) as exc:
        Settings.from_env(env)
    assert message in exc.value.message


class _FakeNvml(types.ModuleType):
    """NVML's Python surface (nvidia-ml-py) for a machine with two GPUs; it records which device was asked."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.asked: list[object] = []
        self.memory = {0: 16 * GIB, 1: 80 * GIB, "GPU-b": 40 * GIB}

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        self.asked.append(index)
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> object:
        self.asked.append(uuid)
        return uuid

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=self.memory[handle])


def test_the_cuda_device_number_is_mapped_through_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_memory_bytes(0) == 16 * GIB
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")  # CUDA's device 0 is NVML's device 1
    assert gpu_memory_bytes(0) == 80 * GIB
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-b")
    assert gpu_memory_bytes(0) == 40 * GIB
    assert nvml.asked == [0, 1, "GPU-b"]


def test_without_nvml_the_limit_fails_with_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    with pytest.raises(ConfigError) as exc:
        gpu_memory_bytes(0)
    assert "pip install 'oclaw[gpu]'" in exc.value.message


def test_a_cuda_setting_without_a_cuda_build_serves_on_the_cpu(repo: Path, tmp_path: Path) -> None:
    """onnxruntime here has no CUDA provider: oclaw serve warns, serves on the CPU and says where it runs."""
    env = {"OCLAW_PROVIDERS": "cuda", "OCLAW_GPU_MEMORY_LIMIT": "0.5", "OCLAW_PRELOAD": "add_sub"}
    srv = spawn_server(repo, tmp_path, env=env)
    try:
        srv.wait_ready()
        assert httpx.get(f"{srv.url}/v2/health/ready", timeout=60).status_code == 200
        body = {
            "inputs": [
                {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16},
                {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": [2.0] * 16},
            ]
        }
        r = httpx.post(f"{srv.url}/v2/models/add_sub/infer", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [3.0] * 16
    finally:
        assert srv.terminate() == 0
    assert "execution provider 'cuda' is not available here; falling back to CPU" in srv.output()


def test_a_session_reports_where_it_runs() -> None:
    class Session:
        def __init__(self, providers: list[str]) -> None:
            self.providers = providers

        def get_providers(self) -> list[str]:
            return self.providers

    settings = Settings.from_env({"OCLAW_CUDA_DEVICE_ID": "3"})
    assert device_of(Session([CUDA, "CPUExecutionProvider"]), settings) == "cuda:3"
    assert device_of(Session(["CPUExecutionProvider"]), settings) == "cpu"
    assert device_of(Session(["OpenVINOExecutionProvider", "CPUExecutionProvider"]), settings) == "openvino"
