"""The Python SDK's overhead over stock ``tritonclient.http``: the same server, model and tensors, latency per request.

    .venv/bin/python -m benchmarks.sdk_overhead [--quick]

One ``oclaw serve`` (metering off) with the MLP 64→256→10 ([1, 64] FP32) and EfficientNet-Lite0
([1, 3, 224, 224] FP32 tensors, not images), binary tensors in and out for both clients. At c1 one thread sends
requests back to back; at c8 eight threads do, each with its own tritonclient (it is not thread-safe) and all
sharing one ``oclaw_sdk.Client`` (one keep-alive pool). The clients alternate round by round. Measurements, not
tests: nothing is asserted; the table gives p50/p99 and the SDK's p50 over tritonclient's from the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import fmt, fmt_ratio, percentiles, ratio, table
from benchmarks.harness import link_model, log, save_model, start_server, stop_servers

ROOT = Path(__file__).resolve().parent.parent
EFFICIENTNET = ROOT / "examples" / "models" / "efficientnet_lite0"
#: Requests per thread and round: (c1, c8) per model, full run and --quick.
COUNTS = {"mlp": ((400, 100), (100, 25)), "efficientnet_lite0": ((40, 8), (10, 3))}
Send = Callable[[], object]
#: Makes a sender in the thread that uses it (tritonclient's gevent client must stay on the thread it was made on).
Factory = Callable[[], Send]


def _repository(work: Path) -> tuple[Path, Path]:
    from tests.modelgen import mlp

    repo = work / "repo"
    mlp_file = save_model(mlp((64, 256, 10)), repo, "mlp")
    link_model(EFFICIENTNET / "1" / "model.onnx", repo, "efficientnet_lite0")
    manifest = json.loads((EFFICIENTNET / "oclaw.json").read_text())
    manifest.pop("checksums", None)
    (repo / "efficientnet_lite0" / "oclaw.json").write_text(json.dumps(manifest))
    shutil.copy(EFFICIENTNET / "labels.txt", repo / "efficientnet_lite0" / "labels.txt")
    return repo, mlp_file


def _triton_sender(port: int, model: str, array: np.ndarray, input_name: str, output: str) -> Send:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=120)
    tensor = httpclient.InferInput(input_name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=True)
    wanted = [httpclient.InferRequestedOutput(output, binary_data=True)]
    return lambda: client.infer(model, [tensor], outputs=wanted).as_numpy(output)


def _sdk_sender(client: Any, model: str, array: np.ndarray, input_name: str, output: str) -> Send:
    return lambda: client.predict({input_name: array}, model).as_numpy(output)


def _httpx_sender(client: Any, model: str, array: np.ndarray, input_name: str, output: str) -> Send:
    """httpx alone: a body encoded once, the answer decoded (the SDK's transport without the SDK)."""
    from oclaw_sdk import codec

    body, length = codec.encode_request({input_name: array})
    headers = {codec.HEADER_LENGTH: str(length), "content-type": "application/octet-stream"}

    def send() -> object:
        answer = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        return codec.decode_response(answer.content, int(answer.headers[codec.HEADER_LENGTH]))[1][output]

    return send


def _run(factories: list[Factory], count: int) -> list[int]:
    """Each sender in its own thread (two requests to warm it), then ``count`` requests back to back; latencies."""
    latencies: list[list[int]] = [[] for _ in factories]
    start = threading.Barrier(len(factories))

    def loop(i: int) -> None:
        send = factories[i]()
        send()
        send()
        start.wait()
        for _ in range(count):
            began = time.perf_counter_ns()
            send()
            latencies[i].append(time.perf_counter_ns() - began)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(factories))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [x for lat in latencies for x in lat]


def measure(quick: bool, rounds: int) -> list[dict[str, Any]]:
    import httpx

    from oclaw_sdk import Client

    rows = []
    with tempfile.TemporaryDirectory(prefix="oclaw-sdk-bench-") as tmp:
        work = Path(tmp)
        repo, mlp_file = _repository(work)
        servers = {"oclaw": start_server("oclaw-nometer", repo, mlp_file, work, "sdk")}
        port = servers["oclaw"][1]
        try:
            cases = {
                "mlp": ("x", "y", np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)),
                "efficientnet_lite0": ("input", "logits", np.zeros((1, 3, 224, 224), np.float32)),
            }
            for model, (input_name, output, array) in cases.items():
                for c, count in zip((1, 8), COUNTS[model][1 if quick else 0], strict=True):
                    sdk = Client(f"127.0.0.1:{port}", timeout_s=120, max_connections=max(c, 2))
                    limits = httpx.Limits(max_connections=max(c, 2), max_keepalive_connections=max(c, 2))
                    raw = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits)
                    args = (model, array, input_name, output)
                    senders: dict[str, list[Factory]] = {
                        "tritonclient.http": [partial(_triton_sender, port, *args)] * c,
                        "httpx + oclaw_sdk.codec": [partial(_httpx_sender, raw, *args)] * c,
                        "oclaw_sdk": [partial(_sdk_sender, sdk, *args)] * c,
                    }
                    lat: dict[str, list[int]] = {name: [] for name in senders}
                    for r in range(rounds):
                        order = list(senders) if r % 2 == 0 else list(reversed(senders))
                        for name in order:
                            lat[name] += _run(senders[name], count)
                    sdk.close()
                    raw.close()
                    base = percentiles(lat["tritonclient.http"])
                    for name in senders:
                        p = percentiles(lat[name])
                        rows.append(
                            {
                                "model": model,
                                "c": c,
                                "client": name,
                                "n": len(lat[name]),
                                **p,
                                "p50_ratio": ratio(p["p50_us"], base["p50_us"]),
                            }
                        )
                        log(f"{model} c{c} {name}: p50 {p['p50_us']:.0f} µs, p99 {p['p99_us']:.0f} µs")
        finally:
            stop_servers(servers)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per case, clients alternating (default 4)")
    args = parser.parse_args(argv)
    rows = measure(args.quick, args.rounds)
    print(
        table(
            ["model", "clients", "client", "requests", "p50 µs", "p99 µs", "p50 vs tritonclient"],
            [
                [r["model"], r["c"], r["client"], r["n"], fmt(r["p50_us"]), fmt(r["p99_us"]), fmt_ratio(r["p50_ratio"])]
                for r in rows
            ],
        )
    )


if __name__ == "__main__":
    main()
