"""oclaw demo: serve the bundled EfficientNet-Lite0 locally and classify real photos over the V2 HTTP API.

Run through ``./scripts/demo.sh`` (it installs what this needs); no cloud account or network is used.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from engine.logs import find_event

ROOT = Path(__file__).resolve().parent.parent
MODEL = "efficientnet_lite0"


def photos() -> dict[str, np.ndarray]:
    """Real photos that ship inside the scikit-image and scikit-learn wheels."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    return {
        "coffee": data.coffee(),
        "chelsea (a cat)": data.chelsea(),
        "rocket": data.rocket(),
        "astronaut": data.astronaut(),
        "china (a palace)": china,
        "flower": flower,
    }


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"oclaw serve exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise SystemExit("oclaw serve did not become ready")


def function_url_event(body: bytes) -> dict[str, object]:
    """A Lambda Function URL event carrying a PNG, as Lambda delivers it (base64 body)."""
    path = f"/v2/models/{MODEL}/infer"
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"content-type": "image/png", "host": "demo.lambda-url.us-east-1.on.aws"},
        "requestContext": {"http": {"method": "POST", "path": path, "sourceIp": "127.0.0.1"}, "requestId": "demo"},
        "body": base64.b64encode(body).decode(),
        "isBase64Encoded": True,
    }


def lambda_demo(repository: str, coffee: bytes) -> None:
    """Run the Lambda handler the way Lambda does: awslambdaric against a local Runtime API."""
    from handler.local_lambda import LocalLambda

    print("\n== the same model as an AWS Lambda function (awslambdaric + local Runtime API, no Docker) ==")
    with (
        tempfile.NamedTemporaryFile(suffix=".log") as log,
        LocalLambda(env={"OCLAW_MODEL_REPOSITORY": repository}, memory_mb=2048, log=log.name) as fn,
    ):
        fn.wait_init()
        for label, event in (
            ("Function URL, coffee.png", function_url_event(coffee)),
            ("warm ping", {"oclaw": "warm", "concurrency": 1}),
        ):
            result = fn.invoke(event)
            answer = result.json()
            if "body" in answer:
                best = json.loads(answer["body"])["outputs"][0]["data"][0]
                print(f"{label}: HTTP {answer['statusCode']}, top-1 {best}")
            else:
                print(f"{label}: {json.dumps(answer)}")
            print(f"   {result.report_line()}")
        record = find_event(Path(log.name).read_text(), "cold_start")
        print(f"INIT record: {json.dumps(record)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", default=str(ROOT / "examples" / "models"))
    parser.add_argument("--port", type=int, default=0, help="port for the local server (default: a free one)")
    args = parser.parse_args()
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    images = {name: png(arr) for name, arr in photos().items()}

    with tempfile.TemporaryFile() as log:
        cmd = [
            sys.executable,
            "-m",
            "handler.cli",
            "serve",
            "--model-repository",
            args.model_repository,
            "--port",
            str(port),
        ]
        print(f"$ oclaw serve --model-repository {args.model_repository} --port {port}")
        spawned = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            wait_ready(url, proc)
            print(f"ready after {(time.perf_counter() - spawned) * 1000:.0f} ms (process start -> ready)\n")
            with httpx.Client(base_url=url, timeout=60) as client:
                meta = client.get(f"/v2/models/{MODEL}").json()
                print(f"model {meta['name']} v{meta['versions'][-1]}: inputs {meta['inputs']}\n")
                for name, body in images.items():
                    start = time.perf_counter()
                    resp = client.post(f"/v2/models/{MODEL}/infer", content=body, headers={"Content-Type": "image/png"})
                    ms = (time.perf_counter() - start) * 1000
                    resp.raise_for_status()
                    print(f"{name}: {len(body) // 1024} kB PNG, {ms:.1f} ms")
                    for entry in resp.json()["outputs"][0]["data"]:
                        prob, index, label = entry.split(":", 2)
                        print(f"   {float(prob):6.3f}  {label} ({index})")
                stats = client.get(f"/v2/models/{MODEL}/stats").json()["model_stats"][0]
                infer = stats["inference_stats"]
                n = max(1, infer["success"]["count"])
                print(
                    f"\nserver-side per request: decode+preprocess {infer['compute_input']['ns'] / n / 1e6:.1f} ms, "
                    f"inference {infer['compute_infer']['ns'] / n / 1e6:.1f} ms, "
                    f"post-process {infer['compute_output']['ns'] / n / 1e6:.2f} ms"
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            log.seek(0)
            record = find_event(log.read().decode(errors="replace"), "cold_start")
            print(f"cold start record: {json.dumps(record)}")
            print(f"server stopped on SIGTERM (exit code {code})")
    lambda_demo(args.model_repository, images["coffee"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
