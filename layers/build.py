"""Build the runtime-dependency Lambda layer offline, for each Python version and architecture.

    python -m layers.build [--python 3.12] [--arch x86_64 arm64] [--out build/layers]

The dependencies of ``engine`` and ``handler`` on Lambda (pyproject's dependencies and its ``lambda`` and ``tracing``
extras) are resolved for the Lambda platform from binary wheels only, less what every Lambda Python runtime already
provides (boto3, botocore and their dependencies, the runtime interface client). The tree is trimmed, checked to hold
native code for the target architecture only, byte-compiled and import-checked when the target interpreter is on this
machine, and zipped with the ``python/`` root Lambda puts on ``sys.path`` from ``/opt``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
#: Function code plus all its layers, unzipped.
UNZIPPED_LIMIT = 250 * MIB
#: A zip uploaded with the request itself; larger ones go through S3 (sam deploy always does).
UPLOAD_LIMIT = 50 * MIB
#: Lambda architecture -> the machine name in wheel platform tags.
MACHINES = {"x86_64": "x86_64", "arm64": "aarch64"}
#: ELF e_machine -> machine name.
ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64"}
#: In every Lambda Python runtime already (/var/runtime); a layer copy would only shadow them.
PROVIDED = frozenset(
    {"awslambdaric", "boto3", "botocore", "s3transfer", "jmespath", "python-dateutil", "six", "urllib3"}
)
#: Used by ``oclaw serve`` only.
SERVER_ONLY = frozenset({"uvicorn"})
EXTRAS = ("lambda", "tracing")
#: Paths under python/ that nothing on Lambda imports (checked by importing the layer after the trim).
TRIM_PATHS = (
    "bin",
    "numpy/_core/include",
    "numpy/_core/lib/pkgconfig",
    "numpy/f2py",
    "numpy/_pyinstaller",
    "onnxruntime/backend",
    "onnxruntime/datasets",
    "onnxruntime/quantization",
    "onnxruntime/tools",
    "onnxruntime/transformers",
)
TRIM_DIRS = frozenset({"tests", "__pycache__"})
TRIM_SUFFIXES = (".pyi", ".pyx", ".pxd")
#: What INIT imports from the layer; each must import from the layer alone.
SMOKE_IMPORTS = ("onnxruntime", "numpy", "orjson", "PIL.Image", "pydantic_core", "fastapi", "mangum")


@dataclass(frozen=True)
class Layer:
    """One built layer and its figures."""

    name: str
    tree: Path
    zip_path: Path | None
    unzipped_bytes: int
    zip_bytes: int | None
    seconds: float
    compiled: bool
    verified: bool


def normalize(name: str) -> str:
    """A distribution name in PEP 503 form."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The requirements of oclaw on Lambda, from pyproject.toml."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    skip = PROVIDED | SERVER_ONLY
    return [r for r in reqs if normalize(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) not in skip]


def pip_platform_args(python: str, arch: str) -> list[str]:
    """pip options selecting Lambda's platform: onnxruntime publishes manylinux_2_28 wheels only, others 2014."""
    machine = MACHINES[arch]
    return [
        *("--platform", f"manylinux2014_{machine}", "--platform", f"manylinux_2_28_{machine}"),
        *("--python-version", python, "--implementation", "cp", "--abi", f"cp{python.replace('.', '')}"),
        "--only-binary=:all:",
    ]


def _pip(args: Sequence[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", *args]
    subprocess.run(cmd, check=True)


def resolve(reqs: Sequence[str], python: str, arch: str) -> list[str]:
    """Exact pins of ``reqs`` and their dependencies for the platform, less what Lambda provides."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp, "report.json")
        # pip before 24 wants a --target with the platform options, even for a dry run
        args = ["--dry-run", "--ignore-installed", "--target", str(Path(tmp, "site")), "--report", str(report)]
        _pip([*args, *pip_platform_args(python, arch), *reqs])
        installs = json.loads(report.read_text())["install"]
    pins = {normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}
    return sorted(f"{name}=={version}" for name, version in pins.items() if name not in PROVIDED)


def install(pins: Sequence[str], site: Path, python: str, arch: str) -> None:
    """Install exactly ``pins`` (no dependency resolution) into ``site``."""
    _pip(["--no-deps", "--no-compile", "--target", str(site), *pip_platform_args(python, arch), *pins])


def trim(site: Path) -> int:
    """Remove what nothing imports on Lambda; returns the bytes removed."""
    before = tree_bytes(site)
    for rel in TRIM_PATHS:
        shutil.rmtree(site / rel, ignore_errors=True)
    for path in sorted(site.rglob("*"), reverse=True):  # deepest first
        if path.is_dir() and path.name in TRIM_DIRS and not path.parent.name.endswith(".dist-info"):
            shutil.rmtree(path)
        elif path.is_file() and path.name.endswith(TRIM_SUFFIXES):
            path.unlink()
    return before - tree_bytes(site)


def elf_machine(path: Path) -> str | None:
    """The machine an ELF file is built for, or None when it is not ELF."""
    with path.open("rb") as fh:
        head = fh.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    code = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return ELF_MACHINES.get(code, hex(code))


def native_machines(site: Path) -> dict[str, int]:
    """How many shared objects the tree holds per machine."""
    counts: dict[str, int] = {}
    for path in site.rglob("*.so*"):
        if path.is_file() and (machine := elf_machine(path)) is not None:
            counts[machine] = counts.get(machine, 0) + 1
    return counts


def find_python(version: str) -> str | None:
    """A working CPython ``version`` interpreter on PATH or under pyenv, if this machine has one."""
    pyenv_root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python{version}"), reverse=True)
    check = f"import sys; assert sys.version_info[:2] == {tuple(map(int, version.split('.')))}"
    for candidate in filter(None, candidates):  # a pyenv shim is on PATH even where it cannot run that version
        if subprocess.run([candidate, "-c", check], capture_output=True, check=False).returncode == 0:
            return candidate
    return None


def byte_compile(site: Path, interpreter: str) -> None:
    """Write __pycache__ for the target interpreter: /opt is read-only, so Lambda would compile on every cold start."""
    cmd = [interpreter, "-S", "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash", str(site)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def verify(site: Path, interpreter: str) -> None:
    """Import what INIT needs from the layer alone (no site-packages), as Lambda would."""
    code = f"import {', '.join(SMOKE_IMPORTS)}; import onnxruntime as o; assert o.get_available_providers()"
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(site)}
    subprocess.run([interpreter, "-S", "-c", code], check=True, env=env)


def tree_bytes(root: Path) -> int:
    """Total size of the regular files under ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def zip_tree(root: Path, dest: Path) -> int:
    """Zip the contents of ``root`` reproducibly (sorted, fixed timestamps, modes kept); returns the zip's size."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = (path.stat().st_mode & 0o777 | 0o100000) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes(), compresslevel=6)
    return dest.stat().st_size


def layer_name(python: str, arch: str) -> str:
    """The layer's name, e.g. ``oclaw-runtime-py312-arm64``."""
    return f"oclaw-runtime-py{python.replace('.', '')}-{arch}"


def build(python: str, arch: str, root: Path, *, compile_: bool | None = None, zip_path: Path | None = None) -> Layer:
    """Build one layer's tree at ``root/python``; with ``zip_path``, zip it and write its pins beside the zip."""
    start = time.perf_counter()
    name = layer_name(python, arch)
    site = root / "python"
    shutil.rmtree(site, ignore_errors=True)
    pins = resolve(requirements(), python, arch)
    install(pins, site, python, arch)
    trim(site)
    machines = native_machines(site)
    if set(machines) != {MACHINES[arch]}:
        raise RuntimeError(f"{name}: shared objects for {machines}, expected {MACHINES[arch]} only")
    interpreter = find_python(python)
    if compile_ and interpreter is None:
        raise RuntimeError(f"--byte-compile needs a python{python} interpreter on PATH or under pyenv")
    compiled = interpreter is not None and compile_ is not False
    if compiled and interpreter:
        byte_compile(site, interpreter)
    verified = interpreter is not None and MACHINES[arch] == platform.machine()
    if verified and interpreter:
        verify(site, interpreter)
    zip_bytes = None
    if zip_path is not None:
        zip_bytes = zip_tree(root, zip_path)
        zip_path.with_suffix(".txt").write_text("\n".join(pins) + "\n")
    seconds = time.perf_counter() - start
    return Layer(name, site, zip_path, tree_bytes(site), zip_bytes, seconds, compiled, verified)


def mb(n: int | None) -> str:
    """Bytes in MB, as Lambda's quotas count them (MiB)."""
    return "-" if n is None else f"{n / MIB:.1f}"


def table(layers: Iterable[Layer]) -> str:
    """Sizes against Lambda's limits, one row per layer."""
    head = ("layer", "unzipped MB", "of 250 MB", "zip MB", "direct upload", "pyc", "import ok", "build s")
    rows = [head]
    for layer in layers:
        upload = "-" if layer.zip_bytes is None else ("yes" if layer.zip_bytes <= UPLOAD_LIMIT else "no, via S3")
        rows.append(
            (
                layer.name,
                mb(layer.unzipped_bytes),
                f"{100 * layer.unzipped_bytes / UNZIPPED_LIMIT:.0f} %",
                mb(layer.zip_bytes),
                upload,
                "yes" if layer.compiled else "no",
                "yes" if layer.verified else "not checked",
                f"{layer.seconds:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the layers and print their sizes."""
    parser = argparse.ArgumentParser(prog="python -m layers.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", nargs="+", default=["3.12"], help="Lambda Python versions (default 3.12)")
    parser.add_argument("--arch", nargs="+", choices=sorted(MACHINES), default=["x86_64", "arm64"])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "layers", help="default build/layers")
    parser.add_argument(
        "--byte-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write .pyc with the target interpreter (default: when it is on this machine)",
    )
    parser.add_argument(
        "--tree", type=Path, help="build one layer's unzipped tree (python/...) into this directory, no zip (sam build)"
    )
    args = parser.parse_args(argv)
    if args.tree is not None:
        if len(args.python) != 1 or len(args.arch) != 1:
            parser.error("--tree builds one layer: give one --python and one --arch")
        print(table([build(args.python[0], args.arch[0], args.tree, compile_=args.byte_compile)]))
        return 0
    built = []
    for python in args.python:
        for arch in args.arch:
            name = layer_name(python, arch)
            zip_path = args.out / f"{name}.zip"
            built.append(build(python, arch, args.out / name, compile_=args.byte_compile, zip_path=zip_path))
    print(table(built))
    print(f"zips in {args.out}; the function package and all layers together must stay under 250 MB unzipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
