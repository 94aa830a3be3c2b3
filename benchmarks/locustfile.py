"""Locust users for an oclaw server (or any KServe V2 server): V2 JSON, V2 binary and raw-image requests.

Run it as Locust users do, against a server you started::

    oclaw serve --model-repository examples/models --port 8000 &
    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 16 -t 30s ImageUser

Each user class sends one request over and over (no think time: a closed loop, as ``benchmarks.loadgen``):

- ``ImageUser``: a raw image body (``Content-Type`` from the file name) to ``LOCUST_IMAGE_MODEL`` (default
  ``efficientnet_lite0``); the image is ``LOCUST_IMAGE`` (default ``examples/images/cat.jpg``).
- ``V2JsonUser``: a V2 JSON body read from ``LOCUST_JSON_BODY`` (a file) to ``LOCUST_JSON_MODEL``; without a
  file, one FP32 input of ``LOCUST_JSON_SHAPE`` (default ``1,64``) named ``LOCUST_JSON_INPUT`` (default ``x``).
- ``V2BinaryUser``: a V2 binary-extension body read from ``LOCUST_BINARY_BODY`` whose JSON header is
  ``LOCUST_BINARY_HEADER_LENGTH`` bytes long, to ``LOCUST_BINARY_MODEL``.

``python -m benchmarks.locust_run`` starts ``oclaw serve`` and runs these headless at several concurrencies,
with dynamic batching on and off. A response that is not 200 counts as a failure, with its status and body.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from locust import FastHttpUser, task

ROOT = Path(__file__).resolve().parent.parent
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _infer_path(model: str) -> str:
    return f"/v2/models/{model}/infer"


class _V2User(FastHttpUser):
    """One request, sent in a closed loop; checks the status (and that a JSON answer has outputs)."""

    abstract = True
    path = ""
    body = b""
    headers: dict[str, str] = {}  # noqa: RUF012 - set once per class by the subclasses' on_start

    def send(self, name: str) -> None:
        with self.client.post(self.path, data=self.body, headers=self.headers, name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {(r.text or '')[:200]}")
            elif r.headers.get("content-type", "").startswith("application/json") and b'"outputs"' not in r.content:
                r.failure(f"200 without outputs: {(r.text or '')[:200]}")
            else:
                r.success()


class ImageUser(_V2User):
    """Raw image bodies to an image model (oclaw decodes and pre-processes them)."""

    def on_start(self) -> None:
        image = Path(_env("LOCUST_IMAGE", str(ROOT / "examples" / "images" / "cat.jpg")))
        self.path = _infer_path(_env("LOCUST_IMAGE_MODEL", "efficientnet_lite0"))
        self.body = image.read_bytes()
        self.headers = {"Content-Type": IMAGE_TYPES.get(image.suffix.lower(), "application/octet-stream")}

    @task
    def infer(self) -> None:
        self.send("image")


class V2JsonUser(_V2User):
    """V2 JSON tensors."""

    def on_start(self) -> None:
        self.path = _infer_path(_env("LOCUST_JSON_MODEL", "mlp"))
        body_file = os.environ.get("LOCUST_JSON_BODY")
        if body_file:
            self.body = Path(body_file).read_bytes()
        else:
            shape = [int(d) for d in _env("LOCUST_JSON_SHAPE", "1,64").split(",")]
            count = 1
            for d in shape:
                count *= d
            tensor = {"name": _env("LOCUST_JSON_INPUT", "x"), "datatype": "FP32", "shape": shape}
            self.body = json.dumps({"inputs": [{**tensor, "data": [0.5] * count}]}).encode()
        self.headers = {"Content-Type": "application/json"}

    @task
    def infer(self) -> None:
        self.send("v2-json")


class V2BinaryUser(_V2User):
    """V2 binary-extension tensors (a JSON header, then the raw bytes)."""

    def on_start(self) -> None:
        self.path = _infer_path(_env("LOCUST_BINARY_MODEL", "dense"))
        self.body = Path(os.environ["LOCUST_BINARY_BODY"]).read_bytes()
        self.headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": os.environ["LOCUST_BINARY_HEADER_LENGTH"],
        }

    @task
    def infer(self) -> None:
        self.send("v2-binary")
