"""Snapshots: versioned, self-describing model files that the trainer writes and the server reads.

open_store() picks the backend from the location: a directory (LocalSnapshotStore, atomic
rename) or an object-store URL such as s3://bucket/prefix (ObjectSnapshotStore, through fsspec),
so a trainer and servers on different hosts can share snapshots.
"""

from pathlib import Path

from streamlearn.snapshots.local import LocalSnapshotStore
from streamlearn.snapshots.meta import (
    FORMAT,
    WEIGHTS,
    DeadLetterMarks,
    ServingState,
    SnapshotContent,
    SnapshotMeta,
)
from streamlearn.snapshots.store import META, Snapshot, SnapshotStore
from streamlearn.snapshots.writer import BackgroundWriter

__all__ = [
    "FORMAT",
    "META",
    "WEIGHTS",
    "BackgroundWriter",
    "DeadLetterMarks",
    "LocalSnapshotStore",
    "ServingState",
    "Snapshot",
    "SnapshotContent",
    "SnapshotMeta",
    "SnapshotStore",
    "open_store",
]


def _is_url(location: str | Path) -> bool:
    """Whether a snapshot location names an object store rather than a directory."""
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and scheme not in ("", "file", "local")


def open_store(location: str | Path, keep: int = 10) -> SnapshotStore:
    """The snapshot store at a directory path or an fsspec URL (s3://bucket/prefix)."""
    if not _is_url(location):
        text = str(location)
        return LocalSnapshotStore(text.partition("://")[2] if "://" in text else text, keep)
    from streamlearn.snapshots.objects import ObjectSnapshotStore  # imports fsspec

    return ObjectSnapshotStore(str(location), keep)
