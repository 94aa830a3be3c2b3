"""oclaw demo: make an INT8 version of the bundled EfficientNet-Lite0, serve it beside fp32 and classify real photos.

Run through ``./scripts/demo.sh`` (it installs what this needs); no cloud account or network is used.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
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
#: Largest loss of cosine similarity to the fp32 outputs that the INT8 version may show.
MAX_DROP = 0.02


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


def working_copy(source: Path, dest: Path) -> Path:
    """Copy the model repository to ``dest`` and serve every version of the demo's model there."""
    shutil.copytree(source, dest)
    manifest = dest / MODEL / "oclaw.json"
    config = json.loads(manifest.read_text())
    config["versions"] = "all"
    manifest.write_text(json.dumps(config, indent=2) + "\n")
    return dest


def optimize_int8(repository: Path, calibration: Path, max_drop: float = MAX_DROP) -> int | None:
    """Run ``oclaw optimize`` for static INT8; the new version's number, or None when the budget is not met."""
    cmd = [
        sys.executable,
        "-m",
        "handler.cli",
        "optimize",
        MODEL,
        "--model-repository",
        str(repository),
        "--precision",
        "int8",
        "--int8-mode",
        "static",
        "--calibration",
        str(calibration),
        "--metric",
        "cosine",
        "--max-drop",
        str(max_drop),
    ]
    print(f"$ oclaw optimize {MODEL} --precision int8 --int8-mode static --calibration <the six photos> ", end="")
    print(f"--metric cosine --max-drop {max_drop}")
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()
        why = "budget not met" if done.returncode == 1 else "oclaw optimize failed"
        print(f"INT8: {why}, serving fp32 only (oclaw optimize exited {done.returncode} after {seconds:.0f} s)")
        print(f"   {lines[-1]}")
        return None
    versions = [int(p.name) for p in (repository / MODEL).iterdir() if p.name.isdigit()]
    report = json.loads((repository / MODEL / str(max(versions)) / "optimization.json").read_text())
    size, latency, metric = report["size_bytes"], report["latency_ms"], report["metric"]
    print(
        f"INT8 version {report['version']} ({report['method']}) in {seconds:.0f} s: "
        f"{size['optimized'] / 1e6:.1f} MB vs {size['source'] / 1e6:.1f} MB, "
        f"batch-1 latency {latency['optimized']:.1f} vs {latency['source']:.1f} ms, "
        f"{metric['name']} {metric['optimized']:.4f} (drop {metric['drop']:.4f} <= {metric['max_drop']})"
    )
    return int(report["version"])


def classify(client: httpx.Client, version: int, body: bytes) -> tuple[str, float]:
    """Top-1 of one PNG from one version, formatted, and the request's round-trip time in ms."""
    start = time.perf_counter()
    resp = client.post(
        f"/v2/models/{MODEL}/versions/{version}/infer", content=body, headers={"Content-Type": "image/png"}
    )
    ms = (time.perf_counter() - start) * 1000
    resp.raise_for_status()
    prob, index, label = resp.json()["outputs"][0]["data"][0].split(":", 2)
    return f"{label} ({index}) {float(prob):.3f}", ms


def serve_and_classify(repository: Path, images: dict[str, bytes], versions: list[int], port: int) -> None:
    """Serve the repository with ``oclaw serve`` and classify every photo with each version, side by side."""
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        cmd = [sys.executable, "-m", "handler.cli", "serve", "--model-repository", str(repository), "--port", str(port)]
        print(f"\n$ oclaw serve --model-repository {repository} --port {port}")
        spawned = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            wait_ready(url, proc)
            print(f"ready after {(time.perf_counter() - spawned) * 1000:.0f} ms (process start -> ready)\n")
            with httpx.Client(base_url=url, timeout=60) as client:
                meta = client.get(f"/v2/models/{MODEL}").json()
                print(f"model {meta['name']}, versions {', '.join(meta['versions'])}: inputs {meta['inputs']}\n")
                names = {v: "fp32" if v == versions[0] else "INT8" for v in versions}
                header = "".join(f"{f'{names[v]} (version {v})':<40}" for v in versions)
                print(f"{'photo':<18}{header}".rstrip())
                for name, body in images.items():
                    cells = [classify(client, v, body) for v in versions]
                    row = "".join(f"{f'{top1}, {ms:.1f} ms':<40}" for top1, ms in cells)
                    print(f"{name:<18}{row}".rstrip())
                print()
                for v in versions:
                    stats = client.get(f"/v2/models/{MODEL}/versions/{v}/stats").json()["model_stats"][0]
                    infer = stats["inference_stats"]
                    n = max(1, infer["success"]["count"])
                    print(
                        f"server-side per request, {names[v]} (version {v}): "
                        f"decode+preprocess {infer['compute_input']['ns'] / n / 1e6:.1f} ms, "
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", default=str(ROOT / "examples" / "models"))
    parser.add_argument("--port", type=int, default=0, help="port for the local server (default: a free one)")
    parser.add_argument(
        "--max-drop", type=float, default=MAX_DROP, help=f"INT8 budget: cosine drop allowed (default {MAX_DROP})"
    )
    args = parser.parse_args()
    port = args.port or free_port()
    images = {name: png(arr) for name, arr in photos().items()}

    with tempfile.TemporaryDirectory(prefix="oclaw-demo-") as tmp:
        repository = working_copy(Path(args.model_repository), Path(tmp) / "models")
        calibration = Path(tmp) / "photos"
        calibration.mkdir()
        for i, body in enumerate(images.values()):
            (calibration / f"{i}.png").write_bytes(body)
        print(f'working copy {repository} ("versions": "all"), the bundled repository is left as it is')
        source = max(int(p.name) for p in (repository / MODEL).iterdir() if p.name.isdigit())
        int8 = optimize_int8(repository, calibration, args.max_drop)
        serve_and_classify(repository, images, [source] if int8 is None else [source, int8], port)
    lambda_demo(args.model_repository, images["coffee"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
