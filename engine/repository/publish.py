"""``oclaw publish``: validate a local model repository as the loader does, then upload it to ``s3://bucket/prefix``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine import aws
from engine.errors import ModelLoadError, ModelNotFound, OclawError
from engine.repository.local import (
    MODEL_FILE,
    LocalRepository,
    RepositoryError,
    select_versions,
    sha256_file,
    validate_name,
)
from engine.repository.s3 import parse_s3_uri, s3_error


def _model_files(model_dir: Path) -> list[Path]:
    """Every file of a model directory (hidden files and partial downloads left out)."""
    rels = (p.relative_to(model_dir) for p in model_dir.rglob("*") if p.is_file())
    return sorted(model_dir / r for r in rels if not any(part.startswith(".") for part in r.parts))


def validate_for_publish(repo: LocalRepository, names: Sequence[str] | None) -> list[str]:
    """Check models as the loader does (layout, manifest, version policy, checksums); their names."""
    if not repo.root.is_dir():
        raise RepositoryError(f"model repository {str(repo.root)!r} is not a directory")
    chosen = list(names) if names else repo.models()
    if not chosen:
        raise ModelNotFound(f"no models in {repo.root} (expected <model>/<version>/{MODEL_FILE})")
    for name in chosen:
        versions = repo.versions(validate_name(name))
        manifest = repo.manifest(name)
        select_versions(name, versions, manifest.versions)
        for version, expected in manifest.checksums.items():
            if version.isdigit() and int(version) in versions:
                path = repo.files(name, int(version)).path
                if (actual := sha256_file(path)) != expected:
                    raise ModelLoadError(f"{path}: sha256 {actual} does not match the manifest's {expected}")
    return chosen


#: Loads one model of a repository as the server would, raising an OclawError when it cannot (the caller's loader:
#: this package never opens a session).
LoadCheck = Callable[[LocalRepository, str], None]


def check_models(repo: LocalRepository, names: Sequence[str], load: LoadCheck) -> None:
    """Load every model with ``load``; one ModelLoadError naming each that failed (the others are still tried)."""
    failures = []
    for name in names:
        try:
            load(repo, name)
        except OclawError as exc:
            named = exc.message.startswith(f"model {name!r}")
            failures.append(exc.message if named else f"model {name!r} failed to load: {exc.message}")
    if failures:
        raise ModelLoadError("; ".join(failures) + " (nothing was uploaded)")


def publish(
    root: str | Path,
    uri: str,
    *,
    models: Sequence[str] | None = None,
    concurrency: int = 8,
    load: LoadCheck | None = None,
    cache: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Upload a local repository's models (validated first) under ``s3://bucket/prefix``; one row per file.

    A model served from ``<name>.oclaw`` is checked unpacked (in ``cache``) and uploaded as that one object.

    With ``load``, every model is also loaded by it before anything is uploaded, so a model file the loader cannot
    open (truncated, not ONNX) is never published. Version directories go first and manifests last, so a reader
    never sees a manifest before its files.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    location = parse_s3_uri(uri)
    repo = LocalRepository(root, cache=cache)
    names = validate_for_publish(repo, models)
    if load is not None:
        check_models(repo, names, load)
    s3 = aws.client("s3")
    try:
        s3.head_bucket(Bucket=location.bucket)
    except (BotoCoreError, ClientError) as exc:
        raise s3_error(exc, f"checking bucket s3://{location.bucket}") from None
    uploads: list[tuple[str, str, Path]] = []  # (model, key under the prefix, file)
    for name in names:
        pack = repo.pack_path(name)
        files = [pack] if pack is not None else _model_files(repo.root / name)
        uploads += [(name, path.relative_to(repo.root).as_posix(), path) for path in files]

    def stage(item: tuple[str, str, Path]) -> int:
        parts = item[1].split("/")
        return 2 if parts[-1] == "oclaw.json" or len(parts) == 1 else 0 if parts[1].isdigit() else 1

    def put(item: tuple[str, str, Path]) -> dict[str, Any]:
        name, rel, path = item
        key = location.key(rel)
        size = path.stat().st_size
        try:
            with path.open("rb") as fh:
                s3.put_object(Bucket=location.bucket, Key=key, Body=fh, ContentLength=size)
        except (BotoCoreError, ClientError) as exc:
            raise s3_error(exc, f"uploading {path} to s3://{location.bucket}/{key}") from None
        return {"uri": f"s3://{location.bucket}/{key}", "bytes": size, "model": name}

    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="oclaw-publish") as pool:
        for group in (0, 1, 2):
            rows += pool.map(put, [item for item in uploads if stage(item) == group])
    return rows
