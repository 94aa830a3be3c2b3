"""The local, Triton-style model repository: ``<root>/<name>/<version>/model.onnx``, or ``<root>/<name>.oclaw``."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from time import perf_counter_ns

from engine.errors import InvalidInput, ModelLoadError, ModelNotFound, OclawError
from engine.repository.manifest import Manifest, VersionPolicy, load_manifest
from engine.repository.pack import PACK_SUFFIX, unpack

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MODEL_FILE = "model.onnx"

log = logging.getLogger("oclaw.repository")
#: Why a model file is ignored (``LocalRepository._warn_ignored``).
_FLAT = "a model's file goes in a numbered version folder"
_NOT_A_VERSION = "version folders are named by positive integers (1, 2, ...)"


def validate_name(name: str) -> str:
    """Return ``name`` if it is a legal model name; raise InvalidInput before any file access."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name) or ".." in name:
        raise InvalidInput(f"invalid model name {name!r}: expected [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}} without '..'")
    return name


def parse_version(version: str | int | None) -> int | None:
    """Parse a version path segment (a positive integer), ``None`` meaning the default."""
    if version is None or version == "":
        return None
    text = str(version)
    if not (text.isascii() and text.isdigit()) or len(text) > 18 or int(text) < 1:  # "²".isdigit() too
        raise InvalidInput(f"invalid model version {version!r}: expected a positive integer")
    return int(text)


def select_versions(name: str, available: Sequence[int], policy: VersionPolicy) -> list[int]:
    """The versions a manifest's policy picks from those available (ascending)."""
    if policy == "latest":
        return sorted(available)[-1:]
    if policy == "all":
        return sorted(available)
    wanted = [v for v in sorted(available) if v in policy]
    if not wanted:
        raise ModelNotFound(f"model {name!r}: none of the manifest's versions {list(policy)} exist")
    return wanted


class RepositoryError(OclawError):
    """The repository itself cannot be read: a bad URI, a missing bucket, access denied, no connection."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


@dataclass(frozen=True)
class FetchReport:
    """What bringing models into the local cache cost (all zeros for a local repository)."""

    ms: float = 0.0
    files: int = 0
    cached: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, float | int]:
        """The report as a log record field."""
        return {"ms": round(self.ms, 1), "files": self.files, "cached": self.cached, "bytes": self.bytes}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelFiles:
    """Where one version of a model lives on disk."""

    name: str
    version: int
    path: Path


class LocalRepository:
    """A model repository on the local file system."""

    #: Where the models come from, as configured (a path, or an ``s3://`` URI for a fetched repository).
    source: str
    #: True when the models are fetched from elsewhere into ``root`` (a local cache).
    remote: bool = False

    def __init__(self, root: str | Path, *, cache: str | Path | None = None) -> None:
        self.root = Path(root)
        self.source = str(root)
        #: Where ``.oclaw`` packs are unpacked (OCLAW_MODEL_CACHE; never beside the pack, which may be read-only).
        self.cache = Path(cache) if cache is not None else Path(os.environ.get("TMPDIR") or "/tmp", "oclaw-models")
        #: Paths already warned about (each is named once, not at every scan).
        self._warned: set[Path] = set()
        #: Per pack: the archive's (size, mtime, inode) when last unpacked, and the copy or why it was refused.
        self._packs: dict[str, tuple[tuple[int, int, int], Path | OclawError]] = {}
        self._packs_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalRepository({str(self.root)!r})"

    def pack_path(self, name: str) -> Path | None:
        """The model's ``<root>/<name>.oclaw`` when it is served from a pack, else None."""
        path = self.root / f"{validate_name(name)}{PACK_SUFFIX}"
        return path if path.is_file() else None

    def _model_dir(self, name: str) -> Path:
        model_dir = self.root / validate_name(name)
        pack = self.pack_path(name)
        if pack is None:
            return model_dir
        if model_dir.is_dir():
            raise ModelLoadError(f"model {name!r} is both {model_dir} and {pack}; remove one of them")
        return self._unpacked(name, pack)

    def _unpacked(self, name: str, pack: Path) -> Path:
        """The verified copy of a pack in the cache, unpacked once per change of the archive (the previous copy
        this repository served is then removed)."""
        try:
            st = pack.stat()
        except OSError as exc:
            raise ModelLoadError(f"model {name!r}: {pack}: {exc.strerror or exc}") from None
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        with self._packs_lock:
            known = self._packs.get(name)
            if known is not None and known[0] == key:
                result = known[1]
            else:
                try:
                    result = unpack(pack, self.cache, name)
                except OclawError as exc:
                    result = OclawError(f"model {name!r}: {exc.message}")
                    log.error("model %s: pack %s refused: %s", name, pack, exc.message)
                self._packs[name] = (key, result)
                if known is not None and isinstance(known[1], Path) and known[1] != result:
                    import shutil

                    shutil.rmtree(known[1], ignore_errors=True)
        if isinstance(result, OclawError):
            raise ModelLoadError(result.message)
        return result

    def models(self) -> list[str]:
        """Names of every model directory that holds at least one version, and of every ``<name>.oclaw`` pack."""
        if not self.root.is_dir():
            return []
        names = []
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and MODEL_NAME.fullmatch(child.name) and self._versions_in(child):
                names.append(child.name)
            elif child.name.endswith(PACK_SUFFIX) and MODEL_NAME.fullmatch(stem := child.name[: -len(PACK_SUFFIX)]):
                if ".." not in stem and child.is_file():
                    names.append(stem)
                    if (self.root / stem).is_dir() and child not in self._warned:
                        self._warned.add(child)
                        log.warning(
                            "model %r is both %s and %s: it will not load; remove one", stem, self.root / stem, child
                        )
            elif child.name == MODEL_FILE:
                self._warn_ignored(child, self.root / "<name>", _FLAT)
        return sorted(set(names))

    def _versions_in(self, model_dir: Path) -> list[int]:
        found = []
        for child in model_dir.iterdir():
            if child.name.isdigit() and int(child.name) > 0 and (child / MODEL_FILE).is_file():
                found.append(int(child.name))
            elif child.name == MODEL_FILE:
                self._warn_ignored(child, model_dir, _FLAT)
            elif not child.name.startswith(".") and child.is_dir() and (child / MODEL_FILE).is_file():
                self._warn_ignored(child / MODEL_FILE, model_dir, _NOT_A_VERSION)
        return sorted(found)

    def _warn_ignored(self, path: Path, model_dir: Path, why: str) -> None:
        """Name a model file the layout does not take, and where it belongs, once."""
        if path not in self._warned:
            self._warned.add(path)
            log.warning("model %r: %s is ignored: %s, e.g. %s", model_dir.name, path, why, model_dir / "1" / MODEL_FILE)

    def versions(self, name: str) -> list[int]:
        """Versions available on disk, ascending; raises ModelNotFound when there are none."""
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            raise ModelNotFound(f"unknown model {name!r}")
        found = self._versions_in(model_dir)
        if not found:
            raise ModelNotFound(
                f"model {name!r} has no version directory with {MODEL_FILE}: "
                f"expected {model_dir / '<version>' / MODEL_FILE}, the version a positive integer"
            )
        return found

    def manifest(self, name: str) -> Manifest:
        """The model's manifest (defaults when there is no ``oclaw.json``)."""
        return load_manifest(self._model_dir(name))

    def files(self, name: str, version: int) -> ModelFiles:
        """The files of one version."""
        path = self._model_dir(name) / str(version) / MODEL_FILE
        if not path.is_file():
            raise ModelNotFound(f"model {name!r} has no version {version}")
        return ModelFiles(name=name, version=version, path=path)

    def prefetch(self, names: Sequence[str] | None) -> FetchReport:
        """Bring the named models (None: all) to local disk before they load; a local repository is there, so
        this only checks that it is: RepositoryError when the root is not a directory."""
        if not self.root.is_dir():
            what = "does not exist" if not self.root.exists() else "is not a directory"
            raise RepositoryError(f"model repository {self.source!r} {what} (OCLAW_MODEL_REPOSITORY)")
        return FetchReport()

    def fetch(self, name: str) -> float:
        """Make sure one model's files are on local disk (a pack: verified and unpacked); milliseconds it took."""
        if self.pack_path(name) is None:
            return 0.0
        start = perf_counter_ns()
        self._model_dir(name)
        return (perf_counter_ns() - start) / 1e6
