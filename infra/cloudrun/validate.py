"""Offline checks of the Cloud Run files: the Knative Service and the Cloud Scheduler warm-ping flags file.

``kubernetes-validate`` has no schema for ``serving.knative.dev/v1`` and passes a Knative Service with only a
warning, so the envelope is checked here with a strict JSON Schema (Cloud Run's fields and annotations, each
on its own metadata level), then ``spec.template.spec`` is checked as a core/v1 PodSpec with
``kubernetes-validate --strict`` after Knative's defaults are applied. On top: probe and warm-ping paths must be
routes the server answers, and ``OCLAW_*`` variables must be settings oclaw knows.

    python infra/cloudrun/validate.py infra/cloudrun/service.yaml infra/cloudrun/scheduler-job.yaml
"""

from __future__ import annotations

import copy
import math
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # loaded by path rather than run as a script: the schemas lie beside this file
    sys.path.insert(0, _HERE)

from cloudrun_schemas import (  # noqa: E402 - after the path above
    CONTROLLED,
    CRON_FIELD,
    RESERVED_ENV,
    REVISION_ANNOTATIONS,
    REVISION_FIELDS,
    SCHEDULER_SCHEMA,
    SERVICE_ANNOTATIONS,
    SERVICE_SCHEMA,
)

# -- what the server answers ------------------------------------------------------------------------


@lru_cache(maxsize=1)
def served_routes() -> tuple[tuple[str, re.Pattern[str]], ...]:
    """(method, path pattern) of every route `oclaw serve` answers, read from the real app."""
    from engine.config import Settings
    from engine.runtime import Runtime
    from handler.http import create_app

    with tempfile.TemporaryDirectory() as empty:
        runtime = Runtime(Settings.from_env({}, model_repository=empty))
        app = create_app(runtime, preload=False)
        runtime.close()
    routes: list[tuple[str, re.Pattern[str]]] = [("GET", re.compile(r"/metrics"))]  # served by handler.asgi
    for route in app.routes:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None) or ()
        if path is None:
            continue
        pattern = re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)))
        routes += [(method, pattern) for method in methods]
    return tuple(routes)


def is_served(method: str, path: str) -> bool:
    """True when the server answers ``method path`` (query strings aside)."""
    path = path.split("?", 1)[0]
    return any(m == method.upper() and p.fullmatch(path) for m, p in served_routes())


def _oclaw_env_problems(env: dict[str, str]) -> list[str]:
    from engine.config import Settings
    from engine.errors import ConfigError

    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        return [f"env: {exc.message}"]
    return [f"env: {name} is not an oclaw setting" for name in sorted(settings.extra)]


# -- the Service ------------------------------------------------------------------------------------


def _where(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path) or "(document)"


def _annotation_level_problems(doc: dict[str, Any]) -> list[str]:
    """Unknown Cloud Run / Knative annotations, and known ones on the wrong metadata level."""
    problems = []
    levels = (
        ("metadata.annotations", (doc.get("metadata") or {}).get("annotations"), SERVICE_ANNOTATIONS),
        (
            "spec.template.metadata.annotations",
            (((doc.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("annotations"),
            REVISION_ANNOTATIONS,
        ),
    )
    for where, found, known in levels:
        if not isinstance(found, dict):
            continue
        for key in found:
            if not isinstance(key, str) or not CONTROLLED.match(key) or key in known:
                continue
            other = next((w for w, _, k in levels if w != where and key in k), None)
            if other is not None:
                problems.append(f"{where}: {key} belongs in {other}")
                continue
            close = [k for k in (*SERVICE_ANNOTATIONS, *REVISION_ANNOTATIONS) if k.lower() == key.lower()]
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{where}: unknown annotation {key}{hint}")
    return problems


def _cpu(value: Any) -> float | None:
    text = str(value)
    try:
        return int(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


def _gib(value: Any) -> float | None:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi|M|G)", str(value))
    if match is None:
        return None
    number, unit = float(match[1]), match[2]
    return number * {"Mi": 1 / 1024, "Gi": 1, "M": 1e6 / 2**30, "G": 1e9 / 2**30}[unit]


def _probe_problems(where: str, probe: dict[str, Any], *, kind: str, port: int) -> list[str]:
    problems = []
    handlers = [h for h in ("httpGet", "tcpSocket", "grpc") if h in probe]
    if len(handlers) != 1:
        return [f"{where}: exactly one of httpGet, tcpSocket, grpc (found {handlers or 'none'})"]
    if kind == "livenessProbe" and handlers == ["tcpSocket"]:
        problems.append(f"{where}: Cloud Run liveness probes use httpGet or grpc, not tcpSocket")
    action = probe[handlers[0]]
    if isinstance(action, dict):
        if action.get("port", port) != port:
            problems.append(f"{where}.{handlers[0]}.port: {action['port']!r} is not the serving port {port}")
        path = action.get("path", "/")
        if handlers == ["httpGet"] and isinstance(path, str) and not is_served("GET", path):
            problems.append(f"{where}.httpGet.path: the server has no GET route {path}")
    period, timeout = probe.get("periodSeconds", 10), probe.get("timeoutSeconds", 1)
    if all(isinstance(v, int) for v in (period, timeout)):
        if timeout > period:
            problems.append(f"{where}: timeoutSeconds {timeout} exceeds periodSeconds {period}")
        if kind == "startupProbe":
            failures = probe.get("failureThreshold", 3)
            if period > 240 or probe.get("initialDelaySeconds", 0) > 240:
                problems.append(f"{where}: Cloud Run startup probes allow at most 240 s per period and delay")
            if isinstance(failures, int) and failures * period > 240:
                problems.append(f"{where}: failureThreshold x periodSeconds = {failures * period} s exceeds 240 s")
    return problems


def _with_knative_defaults(pod: dict[str, Any]) -> tuple[dict[str, Any], int, list[str]]:
    """The pod spec as Knative completes it: container names, port 8080 by default, probes on the serving port."""
    pod = copy.deepcopy(pod)
    problems = []
    serving = [c for c in pod.get("containers", []) if isinstance(c, dict) and c.get("ports")]
    if len(pod.get("containers", [])) == 1 and not serving:
        pod["containers"][0]["ports"] = [{"containerPort": 8080}]
        serving = pod["containers"]
    if len(serving) != 1:
        problems.append(f"spec.template.spec.containers: exactly one container must declare ports ({len(serving)})")
        return pod, 8080, problems
    ports = serving[0]["ports"]
    if not isinstance(ports, list) or len(ports) != 1 or not isinstance(ports[0], dict):
        problems.append("spec.template.spec.containers: the serving container declares exactly one port")
        return pod, 8080, problems
    ports[0].setdefault("containerPort", 8080)
    if ports[0].get("name", "http1") not in ("http1", "h2c"):
        problems.append(f"ports.name: {ports[0]['name']!r} must be http1 or h2c")
    port = ports[0]["containerPort"]
    for i, container in enumerate(pod["containers"]):
        if isinstance(container, dict):
            container.setdefault("name", "user-container" if container is serving[0] else f"sidecar-{i}")
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                for action in ("httpGet", "tcpSocket", "grpc"):
                    if isinstance(probe, dict) and isinstance(probe.get(action), dict):
                        probe[action].setdefault("port", port)
    return pod, port if isinstance(port, int) else 8080, problems


def service_problems(doc: Any) -> list[str]:
    """Everything wrong with a Knative Service for Cloud Run running oclaw (empty: valid)."""
    import kubernetes_validate

    if not isinstance(doc, dict):
        return ["the document is not a mapping"]
    validator = jsonschema.Draft202012Validator(SERVICE_SCHEMA)
    problems = [
        f"{_where(e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    ]
    problems += _annotation_level_problems(doc)
    if problems:
        return problems
    spec = doc["spec"]["template"]["spec"]
    revision = (doc["spec"]["template"].get("metadata") or {}).get("annotations") or {}
    pod = {k: v for k, v in spec.items() if k not in REVISION_FIELDS}
    pod, port, problems = _with_knative_defaults(pod)
    if problems:
        return problems
    try:
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": doc["metadata"]["name"]}, "spec": pod},
            kubernetes_validate.latest_version(),
            strict=True,
        )
    except kubernetes_validate.ValidationError as exc:
        return [f"spec.template.spec.{_where(exc.absolute_path)}: {exc.message}"]

    low, high = (
        int(revision.get("autoscaling.knative.dev/minScale", "0")),
        revision.get("autoscaling.knative.dev/maxScale"),
    )
    if high is not None and int(high) < max(low, 1):
        problems.append(f"maxScale {high} is below minScale {low} (or 0)")
    throttled = revision.get("run.googleapis.com/cpu-throttling", "true") == "true"
    for i, container in enumerate(pod["containers"]):
        where = f"spec.template.spec.containers.{i}"
        env = {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}
        problems += [f"{where}.env: {name} is set by Cloud Run" for name in RESERVED_ENV if name in env]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in container:
                problems += _probe_problems(f"{where}.{kind}", container[kind], kind=kind, port=port)
        if "readinessProbe" in container:
            stage = (doc["metadata"].get("annotations") or {}).get("run.googleapis.com/launch-stage", "GA")
            if stage == "GA":
                problems.append(f"{where}.readinessProbe: a Preview feature: set run.googleapis.com/launch-stage BETA")
        limits = (container.get("resources") or {}).get("limits") or {}
        cpu, memory = _cpu(limits.get("cpu", "1")), _gib(limits.get("memory", "512Mi"))
        if cpu is None or memory is None:
            problems.append(f"{where}.resources.limits: unreadable cpu {limits.get('cpu')!r} or memory")
            continue
        if cpu < 1 and (spec.get("containerConcurrency", 80) != 1 or not throttled):
            problems.append(f"{where}: less than 1 CPU needs containerConcurrency 1 and cpu-throttling true")
        if any(k.startswith("OCLAW_") for k in env):
            problems += [f"{where}.{p}" for p in _oclaw_env_problems(env)]
            expected = {
                "OCLAW_CLOUDRUN_VCPU": cpu,
                "OCLAW_CLOUDRUN_MEMORY_GIB": memory,
                "OCLAW_CLOUDRUN_BILLING": "request" if throttled else "instance",
            }
            for name, want in expected.items():
                have = env.get(name)
                if have is None:
                    continue
                same = (
                    have == want
                    if isinstance(want, str)
                    else _cpu(have) is not None and math.isclose(float(have), want, rel_tol=1e-3)
                )
                if not same:
                    problems.append(f"{where}.env: {name}={have} but the revision has {want} (cost estimates)")
    return problems


# -- the Cloud Scheduler job (a --flags-file of `gcloud scheduler jobs create http`) ----------------


def scheduler_problems(doc: Any, service: dict[str, Any] | None = None) -> list[str]:
    """Everything wrong with the warm-ping job's flags file (and, given the Service, its target)."""
    if not isinstance(doc, dict):
        return ["the document is not a mapping"]
    validator = jsonschema.Draft202012Validator(SCHEDULER_SCHEMA)
    problems = [f"{_where(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    if problems:
        return problems
    bad = [f for f in doc["--schedule"].split() if not CRON_FIELD.fullmatch(f)]
    if bad:
        problems.append(f"--schedule: not a cron field: {bad}")
    deadline = float(doc.get("--attempt-deadline", "180s")[:-1])
    if not 15 <= deadline <= 1800:
        problems.append(f"--attempt-deadline: {deadline:g}s is outside 15s..1800s")
    uri = urlsplit(doc["--uri"])
    if not is_served(doc["--http-method"], uri.path):
        problems.append(f"--uri: the server has no {doc['--http-method'].upper()} route {uri.path}")
    if doc["--oidc-token-audience"].rstrip("/") != f"{uri.scheme}://{uri.netloc}":
        problems.append(
            "--oidc-token-audience: Cloud Run checks the audience against the service URL, the URI's origin"
        )
    if service is not None:
        name = (service.get("metadata") or {}).get("name", "")
        if not uri.netloc.startswith(f"{name}-"):
            problems.append(f"--uri: {uri.netloc} is not the URL of the service {name!r}")
        timeout = ((service.get("spec") or {}).get("template") or {}).get("spec", {}).get("timeoutSeconds", 300)
        if deadline < min(timeout, 60):
            problems.append(f"--attempt-deadline {deadline:g}s is shorter than a cold start may take")
    return problems


def problems_in(paths: Sequence[str | Path]) -> dict[str, list[str]]:
    """Problems per file: Services by their apiVersion, scheduler flags files by their ``--`` keys."""
    docs = {str(p): yaml.safe_load(Path(p).read_text(encoding="utf-8")) for p in paths}
    services = [d for d in docs.values() if isinstance(d, dict) and "apiVersion" in d]
    service = services[0] if len(services) == 1 else None
    out = {}
    for path, doc in docs.items():
        if isinstance(doc, dict) and any(isinstance(k, str) and k.startswith("--") for k in doc):
            out[path] = scheduler_problems(doc, service)
        else:
            out[path] = service_problems(doc)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Check each file; print its problems; exit 1 when any."""
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: validate.py SERVICE.yaml [SCHEDULER-FLAGS.yaml ...]", file=sys.stderr)
        return 2
    failed = False
    for path, problems in problems_in(paths).items():
        for problem in problems:
            print(f"{path}: {problem}")
        print(f"{path}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
