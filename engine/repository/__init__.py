"""Model repositories: the Triton layout on a local directory (``local``), ``s3://`` repositories fetched into a
local cache (``s3``), the ``oclaw.json`` manifest (``manifest``), ``.oclaw`` single-file packs (``pack``) and
``oclaw publish`` (``publish``).

May import: ``engine.errors``, ``engine.config`` and ``engine.aws`` (boto3 on first use) only — never the
sessions, the pool or metering, so a repository can be read without onnxruntime doing anything.
"""

from __future__ import annotations

from engine.repository.local import LocalRepository


def open_repository(source: str, *, cache: str, concurrency: int = 8) -> LocalRepository:
    """The repository at ``source`` (a directory, or ``s3://bucket/prefix``); fetches and packs go to ``cache``."""
    if source.startswith("s3:"):
        from engine.repository.s3 import S3Repository  # boto3 only for an s3:// repository

        return S3Repository(source, cache=cache, concurrency=concurrency)
    return LocalRepository(source, cache=cache)
