"""Pack a model repository as a Lambda layer, served from ``/opt/models/<name>/<version>/model.onnx``.

    python -m layers.models REPOSITORY [--out build/layers] [--name oclaw-models]

Every model with at least one version directory holding ``model.onnx`` is packed with its manifest and side files;
anything else in the repository is left out. Set ``OCLAW_MODEL_REPOSITORY=/opt/models`` on the function.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from engine.repository.local import LocalRepository
from layers.build import ROOT, UNZIPPED_LIMIT, UPLOAD_LIMIT, Layer, mb, tree_bytes, zip_tree

#: Where the layer's repository appears on Lambda (layers are extracted under /opt).
MOUNT = Path("/opt/models")


def repository_files(repository: Path) -> Iterator[tuple[Path, str]]:
    """(file, path inside the repository) for each file the layer carries."""
    repo = LocalRepository(repository)
    for name in repo.models():
        model_dir = repository / name
        for path in sorted(model_dir.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                yield path, f"{name}/{path.name}"
        for version in repo.versions(name):
            version_dir = model_dir / str(version)
            for path in sorted(version_dir.rglob("*")):
                if path.is_file() and not any(part.startswith(".") for part in path.relative_to(model_dir).parts):
                    yield path, f"{name}/{path.relative_to(model_dir).as_posix()}"


def copy_repository(repository: Path, root: Path) -> list[str]:
    """Copy the repository's models to ``root/models``; returns the model names."""
    target = root / MOUNT.name
    shutil.rmtree(target, ignore_errors=True)
    for source, rel in repository_files(repository):
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / rel)
    names = LocalRepository(target).models()
    if not names:
        raise ValueError(f"no models in {repository}: expected <name>/<version>/model.onnx")
    return names


def pack(repository: Path, zip_path: Path) -> Layer:
    """Zip the repository as a layer (``models/`` at the zip's root)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        names = copy_repository(repository, Path(tmp))
        unzipped = tree_bytes(Path(tmp))
        zipped = zip_tree(Path(tmp), zip_path)
    seconds = time.perf_counter() - start
    label = f"{len(names)} model" + ("" if len(names) == 1 else "s")
    return Layer(label, MOUNT, zip_path, unzipped, zipped, seconds, compiled=False, verified=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: pack a repository and print its size."""
    parser = argparse.ArgumentParser(prog="python -m layers.models", description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "layers", help="default build/layers")
    parser.add_argument("--name", default="oclaw-models", help="zip name without .zip (default oclaw-models)")
    parser.add_argument(
        "--tree", type=Path, help="copy the layer's unzipped tree (models/...) here, no zip (sam build)"
    )
    args = parser.parse_args(argv)
    try:
        if args.tree is not None:
            names = copy_repository(args.repository, args.tree)
            print(f"{', '.join(names)}: {mb(tree_bytes(args.tree / MOUNT.name))} MB unzipped in {args.tree}")
            return 0
        layer = pack(args.repository, args.out / f"{args.name}.zip")
    except ValueError as exc:
        parser.error(str(exc))
    upload = "direct upload" if (layer.zip_bytes or 0) <= UPLOAD_LIMIT else "over 50 MB: publish it through S3"
    print(
        f"{layer.zip_path}: {layer.name}, {mb(layer.unzipped_bytes)} MB unzipped "
        f"({100 * layer.unzipped_bytes / UNZIPPED_LIMIT:.0f} % of Lambda's 250 MB), {mb(layer.zip_bytes)} MB zip "
        f"({upload}), {layer.seconds:.1f} s"
    )
    print(f"on the function: OCLAW_MODEL_REPOSITORY={MOUNT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
