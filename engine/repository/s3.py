"""Model repositories in S3: ``s3://bucket/prefix`` is fetched into a local cache, then served like a local one.

Fetched are the models the preload names (``*``: every model under the prefix); of each, its top-level files
(``oclaw.json``, labels, ...) and the versions its manifest's policy picks (``latest`` by default, so one version
unless the manifest says ``all`` or lists some). Files already cached with the same ETag and size are not
downloaded again; a download lands under a temporary name and is renamed into place only once complete and, for a
``model.onnx``, only when it matches the manifest's sha256. A ``<prefix><name>.oclaw`` object is fetched the same
way and unpacked (verified) into the cache. boto3 comes from ``engine.aws``, imported on first use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter_ns
from typing import Any

from engine import aws
from engine.errors import ModelLoadError, ModelNotFound, OclawError
from engine.repository.local import (
    MODEL_FILE,
    MODEL_NAME,
    FetchReport,
    LocalRepository,
    RepositoryError,
    select_versions,
    validate_name,
)
from engine.repository.manifest import load_manifest
from engine.repository.pack import PACK_SUFFIX

log = logging.getLogger("oclaw.s3repo")

#: Per-model record of the ETag each cached file was fetched with.
INDEX = ".oclaw-fetch.json"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CHUNK = 1 << 20
#: A partial download older than this is a crash's leftover, not another process's work in progress.
_STALE_PART_S = 600
_ACCESS_CODES = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix (empty, or ending with ``/``)."""

    bucket: str
    prefix: str

    def key(self, *parts: str) -> str:
        """The object key of a path under the prefix."""
        return self.prefix + "/".join(parts)

    def uri(self, *parts: str) -> str:
        """``s3://bucket/prefix/parts``."""
        return f"s3://{self.bucket}/{self.key(*parts)}"


def parse_s3_uri(uri: str) -> S3Location:
    """Parse ``s3://bucket[/prefix]``; RepositoryError names what is wrong."""
    if not uri.startswith("s3://"):
        raise RepositoryError(f"invalid S3 URI {uri!r}: expected s3://bucket[/prefix]")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise RepositoryError(
            f"invalid S3 URI {uri!r}: the bucket name must be 3-63 lowercase letters, digits, dots and hyphens"
        )
    segments = prefix.strip("/").split("/") if prefix.strip("/") else []
    for seg in segments:
        if seg in ("", ".", "..") or any(ord(c) < 32 for c in seg):
            raise RepositoryError(f"invalid S3 URI {uri!r}: the prefix has an empty, '.' or '..' segment")
    return S3Location(bucket, "".join(f"{seg}/" for seg in segments))


def s3_error(exc: Exception, doing: str) -> OclawError:
    """An OclawError with a clear message for a botocore exception raised while ``doing``."""
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "NoSuchBucket" or (code in ("404", "NotFound") and doing.startswith("checking bucket")):
        return RepositoryError(f"{doing}: the bucket does not exist")
    if code in _ACCESS_CODES or status == 403:
        return RepositoryError(
            f"{doing}: access denied ({code or status}); the role needs s3:ListBucket on the bucket "
            "and s3:GetObject (s3:PutObject to publish) on the prefix"
        )
    if code in ("NoSuchKey", "404"):
        return ModelLoadError(f"{doing}: the object is gone (deleted while fetching?)")
    if code in ("PreconditionFailed", "412"):
        return ModelLoadError(f"{doing}: the object changed while it was being fetched; retry the load")
    if code:
        message = response.get("Error", {}).get("Message", "")
        return RepositoryError(f"{doing}: {code}: {message}".rstrip(": "))
    return RepositoryError(f"{doing}: {exc}")


@dataclass(frozen=True)
class RemoteFile:
    """One object of a model: its path relative to the model directory, key, ETag and size."""

    rel: str
    key: str
    etag: str
    size: int

    @property
    def version(self) -> int | None:
        """The version directory it lies in, or None for a top-level file (manifest, labels, ...)."""
        head, sep, _ = self.rel.partition("/")
        return int(head) if sep and head.isdigit() and int(head) > 0 else None


def _safe_rel(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and all(p not in ("", ".", "..") and not p.startswith(".") for p in parts)


#: What listing finds for one model: its pack, its directory's files, or why it cannot be served.
_Listed = RemoteFile | list[RemoteFile] | OclawError


@dataclass
class _ModelSync:
    """One model being brought into the cache."""

    name: str
    root: Path
    files: dict[str, RemoteFile]
    index: dict[str, str]
    error: OclawError | None = None
    wanted: list[tuple[RemoteFile, str | None]] = field(default_factory=list)
    fetched: set[str] = field(default_factory=set)
    downloads: int = 0
    cached: int = 0
    bytes: int = 0
    done_ns: int = 0


class S3Repository(LocalRepository):
    """An ``s3://bucket/prefix`` repository served from a local cache directory."""

    remote = True

    def __init__(self, uri: str, *, cache: str | Path, concurrency: int = 8) -> None:
        self.location = parse_s3_uri(uri)
        super().__init__(Path(cache, self.location.bucket, *self.location.prefix.split("/")), cache=cache)
        self.source = uri
        self.concurrency = max(1, concurrency)
        self._listed: list[str] | None = None
        self._pending: dict[str, float | OclawError] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Repository({self.source!r}, cache={str(self.root)!r})"

    def models(self) -> list[str]:
        """The models under the prefix (as last listed), else those in the cache."""
        if self._listed is not None:
            return list(self._listed)
        return super().models()

    def fetch(self, name: str) -> float:
        """The model's files in the cache: the result of the start-up fetch once, a fresh sync afterwards."""
        validate_name(name)
        result = self._pending.pop(name, None)
        if result is None:
            start = perf_counter_ns()
            self.prefetch([name])
            result = self._pending.pop(name, (perf_counter_ns() - start) / 1e6)
        if isinstance(result, OclawError):
            raise result
        return result

    def prefetch(self, names: Sequence[str] | None) -> FetchReport:
        """Fetch the named models (None: every model under the prefix) into the cache, files in parallel.

        A model that cannot be fetched is remembered with its reason (its load then fails with it); a
        repository that cannot be listed at all raises RepositoryError.
        """
        start = perf_counter_ns()
        with self._lock, ThreadPoolExecutor(self.concurrency, thread_name_prefix="oclaw-fetch") as pool:
            listing = self._list(names, pool)
            syncs: list[_ModelSync] = []
            packs: list[tuple[str, RemoteFile]] = []
            for name, found in listing.items():
                if isinstance(found, OclawError):
                    self._pending[name] = found
                elif isinstance(found, RemoteFile):
                    packs.append((name, found))
                else:
                    syncs.append(self._begin(name, found))
            pack_jobs = [pool.submit(self._get_pack, name, f) for name, f in packs]
            # the top-level files first: the manifest says which versions to fetch and their checksums
            self._download(pool, [(s, f, None) for s in syncs for f in s.files.values() if f.version is None])
            for sync in syncs:
                self._choose(sync)
            self._download(pool, [(s, f, sha) for s in syncs if s.error is None for f, sha in s.wanted])
            syncs += [job.result() for job in pack_jobs]
        for sync in syncs:
            self._finish(sync)
            if sync.error is not None:
                self._pending[sync.name] = sync.error
                log.error("model %s: fetch from %s failed: %s", sync.name, self.source, sync.error.message)
            else:
                self._pending[sync.name] = (max(sync.done_ns, start) - start) / 1e6
        report = FetchReport(
            ms=(perf_counter_ns() - start) / 1e6,
            files=sum(s.downloads for s in syncs),
            cached=sum(s.cached for s in syncs),
            bytes=sum(s.bytes for s in syncs),
        )
        log.info("fetched %s into %s: %s", self.source, self.root, report.as_dict())
        return report

    # -- listing ----------------------------------------------------------------------------------

    def _list_prefix(self, prefix: str) -> list[dict[str, Any]]:
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = aws.client("s3")
        objects: list[dict[str, Any]] = []
        try:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket, Prefix=prefix):
                objects.extend(page.get("Contents", []))
        except (BotoCoreError, ClientError) as exc:
            raise s3_error(exc, f"listing s3://{self.location.bucket}/{prefix}") from None
        return objects

    def _list(self, names: Sequence[str] | None, pool: ThreadPoolExecutor) -> dict[str, _Listed]:
        found: dict[str, _Listed] = {}
        if names is None:
            grouped: dict[str, list[dict[str, Any]]] = {}
            for obj in self._list_prefix(self.location.prefix):
                head, sep, _ = obj["Key"][len(self.location.prefix) :].partition("/")
                if not sep and head.endswith(PACK_SUFFIX):
                    head = head[: -len(PACK_SUFFIX)]
                if MODEL_NAME.fullmatch(head) and ".." not in head:
                    grouped.setdefault(head, []).append(obj)
            for name, objects in sorted(grouped.items()):
                found[name] = self._model_objects(name, objects)
            # a model both a pack and a directory is listed: its load fails with the reason
            self._listed = sorted(n for n, files in found.items() if not isinstance(files, ModelNotFound))
            return found
        valid: list[str] = []
        for name in dict.fromkeys(names):
            try:
                valid.append(validate_name(name))
            except OclawError as exc:
                found[name] = exc
        listings = list(pool.map(lambda n: self._list_prefix(self.location.key(n)), valid))  # n/... and n.oclaw
        for name, objects in zip(valid, listings, strict=True):
            found[name] = self._model_objects(name, objects)
        return found

    def _model_objects(self, name: str, objects: list[dict[str, Any]]) -> _Listed:
        """A model's objects: its pack, its directory's files, or why neither serves (both present, none)."""
        pack_key = self.location.key(name) + PACK_SUFFIX
        packs = [obj for obj in objects if obj["Key"] == pack_key]
        files = self._remote_files(name, [obj for obj in objects if obj["Key"].startswith(self.location.key(name, ""))])
        if packs and not isinstance(files, OclawError):
            where = f"{self.location.uri(name, '')} and {self.location.uri(name + PACK_SUFFIX)}"
            return ModelLoadError(f"model {name!r} is both {where}; remove one of them")
        if packs:
            return RemoteFile(name + PACK_SUFFIX, pack_key, str(packs[0]["ETag"]), int(packs[0]["Size"]))
        return files

    def _remote_files(self, name: str, objects: list[dict[str, Any]]) -> list[RemoteFile] | OclawError:
        base = self.location.key(name, "")
        files = []
        for obj in objects:
            rel = obj["Key"][len(base) :]
            if rel.endswith("/") or not _safe_rel(rel):
                continue  # folder markers, hidden files and keys that would leave the model directory
            files.append(RemoteFile(rel, obj["Key"], str(obj["ETag"]), int(obj["Size"])))
        if not any(f.version is not None and f.rel.endswith(f"/{MODEL_FILE}") for f in files):
            where = self.location.uri(name, "")
            return ModelNotFound(f"model {name!r}: no <version>/{MODEL_FILE} under {where}")
        return files

    # -- syncing ----------------------------------------------------------------------------------

    def _get_pack(self, name: str, f: RemoteFile) -> _ModelSync:
        """Download a model's pack unless cached (its ETag beside it), then unpack and verify it."""
        sync = _ModelSync(name, self.root, {}, {})
        dest, etag = self.root / f.rel, self.root / f".{f.rel}.etag"
        try:
            shutil.rmtree(self.root / name, ignore_errors=True)  # the directory form it may have had before
            cached = dest.is_file() and dest.stat().st_size == f.size and etag.read_text(encoding="utf-8") == f.etag
        except OSError:
            cached = False
        try:
            if not cached:
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._get_object(f, dest, None)
                etag.write_text(f.etag, encoding="utf-8")
            self._model_dir(name)
        except OSError as exc:
            sync.error = ModelLoadError(f"model cache {dest.parent}: {exc}")
        except OclawError as exc:
            sync.error = exc
        sync.downloads, sync.cached, sync.bytes = (0, 1, 0) if cached else (1, 0, f.size)
        sync.done_ns = perf_counter_ns()
        return sync

    def _begin(self, name: str, files: list[RemoteFile]) -> _ModelSync:
        root = self.root / name
        (self.root / f"{name}{PACK_SUFFIX}").unlink(missing_ok=True)  # the pack it may have been before
        try:
            index = json.loads((root / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            index = {}
        sync = _ModelSync(name, root, {f.rel: f for f in files}, index if isinstance(index, dict) else {})
        self._prune(sync)
        return sync

    def _prune(self, sync: _ModelSync) -> None:
        """Drop cached files the bucket no longer has (a stale version must not become "latest")."""
        if not sync.root.is_dir():
            return
        now = time.time()
        for path in sorted(sync.root.rglob("*"), reverse=True):
            rel = path.relative_to(sync.root).as_posix()
            try:
                if path.is_dir():
                    if not any(path.iterdir()):
                        path.rmdir()
                elif path.name.endswith(".part"):
                    if now - path.stat().st_mtime > _STALE_PART_S:
                        path.unlink()
                elif rel != INDEX and rel not in sync.files:
                    path.unlink()
            except OSError as exc:
                log.warning("cache %s: could not remove %s: %s", sync.root, path, exc)

    def _choose(self, sync: _ModelSync) -> None:
        """The versions to fetch (the manifest's policy) and the checksums to verify them with."""
        if sync.error is not None:
            return
        available = sorted({f.version for f in sync.files.values() if f.version and f.rel.endswith(f"/{MODEL_FILE}")})
        try:
            manifest = load_manifest(sync.root)
            versions = select_versions(sync.name, available, manifest.versions)
        except OclawError as exc:
            sync.error = exc
            return
        for f in sync.files.values():
            if f.version in versions:
                expected = manifest.checksums.get(str(f.version)) if f.rel == f"{f.version}/{MODEL_FILE}" else None
                sync.wanted.append((f, expected))

    def _download(self, pool: ThreadPoolExecutor, jobs: list[tuple[_ModelSync, RemoteFile, str | None]]) -> None:
        futures = [(sync, f, pool.submit(self._get, sync, f, sha)) for sync, f, sha in jobs]
        for sync, f, future in futures:
            result = future.result()
            if isinstance(result, OclawError):
                sync.error = sync.error or result
                continue
            sync.fetched.add(f.rel)
            sync.done_ns = max(sync.done_ns, result[1])
            if result[0]:
                sync.downloads += 1
                sync.bytes += f.size
            else:
                sync.cached += 1

    def _get(self, sync: _ModelSync, f: RemoteFile, expected: str | None) -> tuple[bool, int] | OclawError:
        """Download one file unless cached: (downloaded?, finish time), or the error."""
        dest = sync.root / f.rel
        try:
            if sync.index.get(f.rel) == f.etag and dest.is_file() and dest.stat().st_size == f.size:
                return False, perf_counter_ns()
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return ModelLoadError(f"model cache {dest.parent}: {exc}")
        try:
            self._get_object(f, dest, expected)
        except OclawError as exc:
            return exc
        return True, perf_counter_ns()

    def _get_object(self, f: RemoteFile, dest: Path, expected: str | None) -> None:
        """Stream one object to a temporary file, check it, and rename it into place."""
        from botocore.exceptions import BotoCoreError, ClientError

        uri = f"s3://{self.location.bucket}/{f.key}"
        tmp = dest.with_name(f".{dest.name}.{os.urandom(4).hex()}.part")
        digest = hashlib.sha256() if expected else None
        size = 0
        try:
            body = aws.client("s3").get_object(Bucket=self.location.bucket, Key=f.key, IfMatch=f.etag)["Body"]
            with body, tmp.open("wb") as fh:
                for chunk in body.iter_chunks(_CHUNK):
                    fh.write(chunk)
                    size += len(chunk)
                    if digest is not None:
                        digest.update(chunk)
            if size != f.size:
                raise ModelLoadError(f"{uri}: got {size} bytes, expected {f.size}; the download was discarded")
            if digest is not None and digest.hexdigest() != expected:
                raise ModelLoadError(
                    f"{uri}: sha256 {digest.hexdigest()} does not match the manifest's {expected}; "
                    "the download was discarded"
                )
            os.replace(tmp, dest)
        except (BotoCoreError, ClientError) as exc:
            raise s3_error(exc, f"fetching {uri}") from None
        except OSError as exc:
            raise ModelLoadError(f"fetching {uri} into {dest.parent}: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _finish(self, sync: _ModelSync) -> None:
        """Record the ETag of every file now cached, so the next start skips them."""
        index = {
            rel: f.etag
            for rel, f in sync.files.items()
            if (rel in sync.fetched or sync.index.get(rel) == f.etag) and (sync.root / rel).is_file()
        }
        if not index or index == sync.index:
            return
        tmp = sync.root / f".{INDEX}.{os.urandom(4).hex()}.part"
        try:
            tmp.write_text(json.dumps(index, indent=0, sort_keys=True), encoding="utf-8")
            os.replace(tmp, sync.root / INDEX)
        except OSError as exc:
            log.warning("cache %s: could not write %s: %s", sync.root, INDEX, exc)
            tmp.unlink(missing_ok=True)
