"""``.oclaw`` model packs: one zip file holding a model directory and the sha256 of every file in it.

Members: ``oclaw-pack.json`` (format, model, versions, ``files``: member -> sha256), the model directory's top-level
files (``oclaw.json``, labels, ...) and ``<version>/<file>`` (``model.onnx``, ``optimization.json``, ...). Graphs
are stored, not deflated: ONNX weights shrink by less than a tenth while inflating runs at ~100 MB/s, against copy
speed for a stored member. A served pack is unpacked into the model cache, every member checked against its
sha256 first; an unpacked copy is reused while the archive's own sha256 is unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    import zipfile  # imported where a pack is read or written: a repository of directories never needs it (nor hashlib)

PACK_SUFFIX = ".oclaw"
#: The member that lists every other member's sha256.
PACK_INDEX = "oclaw-pack.json"
FORMAT = 1
#: Where packs are unpacked inside the model cache (a bucket name never starts with a dot).
PACKS_DIR = ".packs"
_VERIFIED = ".oclaw-verified"
_STORED = (".onnx", ".npz", ".npy", ".data", ".bin")
_CHUNK = 1 << 20
#: Fixed member timestamps: the same files always make the same archive (and the same cache key).
_EPOCH = (1980, 1, 1, 0, 0, 0)


def member_problem(member: str) -> str | None:
    """Why a member name has no place in a pack (a path leaving the model directory, hidden, nested), else None."""
    parts = member.split("/")
    if member.startswith("/") or "\\" in member or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
        return "is not a relative path inside the model directory"
    if any(p.startswith(".") for p in parts):
        return "is a hidden file"
    if len(parts) > 2 or (len(parts) == 2 and not (parts[0].isdigit() and int(parts[0]) > 0)):
        return "is neither a top-level file nor <version>/<file> with a positive integer version"
    if member == PACK_INDEX:
        return "is the pack's own index"
    return None


def pack_members(model_dir: Path, versions: Sequence[int]) -> dict[str, Path]:
    """The files a pack of ``model_dir`` holds: its top-level files and those of the given version folders."""
    members: dict[str, Path] = {}
    folders = [model_dir, *(model_dir / str(v) for v in sorted(set(versions)))]
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                member = path.relative_to(model_dir).as_posix()
                if member_problem(member) is None:
                    members[member] = path
    return members


def _sha256_copy(src: Any, dst: Any) -> str:
    import hashlib

    digest = hashlib.sha256()
    while block := src.read(_CHUNK):
        digest.update(block)
        dst.write(block)
    return digest.hexdigest()


def write_pack(model_dir: Path, out: Path, *, name: str, versions: Sequence[int]) -> dict[str, Any]:
    """Write ``out`` (temporary file, then rename) from a model directory's given versions; what was written."""
    import zipfile

    members = pack_members(model_dir, versions)
    checksums: dict[str, str] = {}
    tmp = out.with_name(f".{out.name}.{os.urandom(4).hex()}.part")
    try:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            for member, path in members.items():
                info = zipfile.ZipInfo(member, _EPOCH)
                info.compress_type = zipfile.ZIP_STORED if member.endswith(_STORED) else zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                info.file_size = path.stat().st_size
                with path.open("rb") as src, zf.open(info, "w", force_zip64=info.file_size > 1 << 31) as dst:
                    checksums[member] = _sha256_copy(src, dst)
            index = {"format": FORMAT, "model": name, "versions": sorted(set(versions)), "files": checksums}
            info = zipfile.ZipInfo(PACK_INDEX, _EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, json.dumps(index, indent=1, sort_keys=True))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    import hashlib

    digest = hashlib.sha256()
    with out.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return {
        "pack": str(out),
        "model": name,
        "versions": sorted(set(versions)),
        "members": len(members),
        "bytes": out.stat().st_size,
        "sha256": digest.hexdigest(),
    }


def _read_index(zf: zipfile.ZipFile, where: str) -> dict[str, str]:
    import zipfile

    try:
        raw = json.loads(zf.read(PACK_INDEX))
    except KeyError:
        raise ModelLoadError(f"{where}: not an oclaw pack (no {PACK_INDEX}); make one with `oclaw pack`") from None
    except (ValueError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"{where}: {PACK_INDEX} is unreadable: {exc}") from None
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(files, dict):
        raise ModelLoadError(f"{where}: {PACK_INDEX} is not format {FORMAT} with a 'files' object of sha256 sums")
    return {str(k): str(v).lower() for k, v in files.items()}


#: Unpacked bytes a pack may declare per byte of archive: graphs are stored (1x), text compresses ~5-10x; a member
#: inflating far past that is a decompression bomb, refused before anything is written.
MAX_RATIO = 100


def _check_sizes(zf: zipfile.ZipFile, archive_bytes: int, where: str) -> None:
    """Refuse a pack whose members declare more bytes than ``MAX_RATIO`` times the archive (plus 1 MiB)."""
    declared = sum(info.file_size for info in zf.infolist())
    if declared > MAX_RATIO * archive_bytes + (1 << 20):
        raise ModelLoadError(
            f"{where}: its members unpack to {declared} bytes, over {MAX_RATIO}x the archive's {archive_bytes}; "
            "the pack was refused"
        )


def _extract(zf: zipfile.ZipFile, into: Path, where: str) -> None:
    """Check every member's name against the layout and its bytes against the index, writing it under ``into``."""
    import zipfile

    _check_sizes(zf, sum(info.compress_size for info in zf.infolist()), where)
    checksums = _read_index(zf, where)
    infos = [i for i in zf.infolist() if i.filename != PACK_INDEX]
    names = [i.filename for i in infos]
    for member in names:
        if (problem := member_problem(member)) is not None:
            raise ModelLoadError(f"{where}: member {member!r} {problem}; the pack was refused")
    if len(set(names)) != len(names) or zf.namelist().count(PACK_INDEX) != 1:
        raise ModelLoadError(f"{where}: a member name appears twice; the pack was refused")
    if missing := sorted(set(names) - set(checksums)):
        raise ModelLoadError(f"{where}: member {missing[0]!r} has no sha256 in {PACK_INDEX}; the pack was refused")
    if absent := sorted(set(checksums) - set(names)):
        raise ModelLoadError(f"{where}: {PACK_INDEX} lists {absent[0]!r}, which the pack does not hold")
    for info in infos:
        dest = into / info.filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with zf.open(info) as src, dest.open("wb") as dst:
                actual = _sha256_copy(src, dst)
        except zipfile.BadZipFile as exc:
            raise ModelLoadError(f"{where}: member {info.filename!r} fails its checksum ({exc})") from None
        if actual != checksums[info.filename]:
            raise ModelLoadError(
                f"{where}: member {info.filename!r} fails its checksum: sha256 {actual}, "
                f"{PACK_INDEX} says {checksums[info.filename]}"
            )


def unpack(archive: Path, cache: Path, name: str) -> Path:
    """The verified, unpacked copy of ``archive`` under ``cache`` (reused while the archive's index is unchanged).

    The copy is named by the sha256 of the pack's index, which lists every member's sha256: the same index means
    the same content, so a cold start reads the archive once (each member hashed as it is written), not twice.
    """
    import hashlib
    import shutil
    import zipfile

    try:
        with zipfile.ZipFile(archive) as zf:
            index = zf.read(PACK_INDEX)
    except KeyError:
        raise ModelLoadError(f"{archive}: not an oclaw pack (no {PACK_INDEX}); make one with `oclaw pack`") from None
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"{archive}: not a readable zip archive ({exc})") from None
    except OSError as exc:
        raise ModelLoadError(f"{archive}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(index)
    dest = cache / PACKS_DIR / f"{name}-{digest.hexdigest()[:16]}"
    if (dest / _VERIFIED).is_file():
        return dest
    tmp = dest.with_name(f".{dest.name}.{os.urandom(4).hex()}.part")
    try:
        tmp.mkdir(parents=True)
        with zipfile.ZipFile(archive) as zf:
            if zf.read(PACK_INDEX) != index:
                raise ModelLoadError(f"{archive}: the pack changed while it was being unpacked; load it again")
            _extract(zf, tmp, str(archive))
        (tmp / _VERIFIED).write_text(digest.hexdigest(), encoding="utf-8")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / _VERIFIED).is_file():  # another process unpacking the same archive got there first
                raise
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"{archive}: not a readable zip archive ({exc})") from None
    except OSError as exc:
        raise ModelLoadError(f"unpacking {archive} into {tmp.parent} (OCLAW_MODEL_CACHE): {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
