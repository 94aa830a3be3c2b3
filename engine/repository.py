"""The local, Triton-style model repository: ``<root>/<name>/<version>/model.onnx``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InvalidInput, ModelNotFound
from engine.manifest import Manifest, load_manifest

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MODEL_FILE = "model.onnx"


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
    if not text.isdigit() or int(text) < 1:
        raise InvalidInput(f"invalid model version {version!r}: expected a positive integer")
    return int(text)


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

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalRepository({str(self.root)!r})"

    def _model_dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    def models(self) -> list[str]:
        """Names of every model directory that holds at least one version."""
        if not self.root.is_dir():
            return []
        names = []
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and MODEL_NAME.fullmatch(child.name) and self._versions_in(child):
                names.append(child.name)
        return names

    @staticmethod
    def _versions_in(model_dir: Path) -> list[int]:
        found = []
        for child in model_dir.iterdir():
            if child.name.isdigit() and int(child.name) > 0 and (child / MODEL_FILE).is_file():
                found.append(int(child.name))
        return sorted(found)

    def versions(self, name: str) -> list[int]:
        """Versions available on disk, ascending; raises ModelNotFound when there are none."""
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            raise ModelNotFound(f"unknown model {name!r}")
        found = self._versions_in(model_dir)
        if not found:
            raise ModelNotFound(f"model {name!r} has no version directory with {MODEL_FILE}")
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
