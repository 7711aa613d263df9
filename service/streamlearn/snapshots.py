"""SnapshotStore: versioned, self-describing, atomically written model snapshots.

Layout: <root>/<model_name>/<version>/{weights.safetensors, meta.json}, version a zero-padded
monotonic integer. A snapshot is assembled in a hidden temporary directory, fsynced, and renamed
into place, so a reader sees a whole snapshot or none. meta.json carries the weights' SHA-256;
a snapshot whose weights do not match is skipped by readers in favour of the previous one.
"""

import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from streamlearn.errors import SnapshotError
from streamlearn.faults import crash_point

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
META = "meta.json"
FORMAT = "streamlearn-snapshot/1"


@dataclass(frozen=True)
class Snapshot:
    """One loaded snapshot: its metadata and its tensors."""

    model_name: str
    version: int
    meta: dict[str, Any]
    tensors: dict[str, Tensor]


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotStore:
    """Writes, lists, loads and prunes the snapshots under one root directory."""

    def __init__(self, root: Path | str, keep: int = 10) -> None:
        self.root = Path(root)
        self.keep = keep

    def ensure_writable(self) -> None:
        """Fail early, with a clear message, when the root cannot hold snapshots."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SnapshotError(f"snapshot directory {self.root} is not writable: {exc.strerror}") from None

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name for entry in os.scandir(self.root) if entry.is_dir() and entry.name[0] != "."
        )

    def versions(self, model_name: str) -> list[int]:
        """Complete snapshot versions of a model, oldest first."""
        try:
            entries = os.scandir(self.root / model_name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        with entries:
            return sorted(int(entry.name) for entry in entries if entry.name.isdigit())

    def latest_version(self, model_name: str) -> int | None:
        versions = self.versions(model_name)
        return versions[-1] if versions else None

    def save(self, model_name: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Snapshot:
        """Write a new version atomically (temporary directory, fsync, rename), then prune old ones."""
        model_dir = self.root / model_name
        model_dir.mkdir(parents=True, exist_ok=True)
        weights = save_safetensors(tensors)
        for _attempt in range(5):
            version = (self.latest_version(model_name) or 0) + 1
            created = time.time()
            full_meta = {
                **meta,
                "format": FORMAT,
                "model_name": model_name,
                "version": version,
                "created_at": datetime.fromtimestamp(created, UTC).isoformat(),
                "created_at_ms": int(created * 1000),
                "weights_sha256": hashlib.sha256(weights).hexdigest(),
                "weights_bytes": len(weights),
            }
            tmp = model_dir / f".tmp-{version}-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                _write_durably(tmp / WEIGHTS, weights)
                _write_durably(tmp / META, orjson.dumps(full_meta, option=orjson.OPT_INDENT_2))
                _fsync_dir(tmp)
                crash_point("snapshot.before_rename")
                tmp.rename(model_dir / f"{version:012d}")
            except FileExistsError:
                shutil.rmtree(tmp, ignore_errors=True)
                continue  # another writer took this version; take the next one
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _fsync_dir(model_dir)
            crash_point("snapshot.after_rename")
            self.prune(model_name)
            return Snapshot(model_name, version, full_meta, tensors)
        raise SnapshotError(f"could not claim a new snapshot version for {model_name}")

    def load(self, model_name: str, version: int) -> Snapshot:
        """One version, its weights checked against the SHA-256 in its metadata."""
        path = self.root / model_name / f"{version:012d}"
        try:
            meta = orjson.loads((path / META).read_bytes())
            weights = (path / WEIGHTS).read_bytes()
        except (OSError, orjson.JSONDecodeError) as exc:
            raise SnapshotError(f"snapshot {model_name} v{version} is unreadable: {exc}") from None
        if hashlib.sha256(weights).hexdigest() != meta.get("weights_sha256"):
            raise SnapshotError(f"snapshot {model_name} v{version} is corrupt: weights checksum mismatch")
        try:
            tensors = load_safetensors(weights)
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise SnapshotError(f"snapshot {model_name} v{version} has malformed weights: {exc}") from None
        return Snapshot(model_name, version, meta, tensors)

    def load_latest(self, model_name: str, newer_than: int = 0) -> Snapshot | None:
        """The newest snapshot that loads and checks out; corrupt ones are skipped with a warning."""
        for version in reversed(self.versions(model_name)):
            if version <= newer_than:
                return None
            try:
                return self.load(model_name, version)
            except SnapshotError as exc:
                log.warning("skipping snapshot: %s", exc)
        return None

    def prune(self, model_name: str) -> None:
        """Keep the newest `keep` versions; also clear temporary directories left by a crash."""
        model_dir = self.root / model_name
        for version in self.versions(model_name)[: -self.keep]:
            shutil.rmtree(model_dir / f"{version:012d}", ignore_errors=True)
        for entry in os.scandir(model_dir):
            if entry.name.startswith(".tmp-") and time.time() - entry.stat().st_mtime > 60:
                shutil.rmtree(entry.path, ignore_errors=True)


class BackgroundWriter:
    """Writes snapshots on one background thread, so the consumer loop never waits on the disk."""

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-writer")

    def submit(
        self,
        model_name: str,
        tensors: dict[str, Tensor],
        meta: dict[str, Any],
        prepare: Callable[[], dict[str, Any]] | None = None,
    ) -> "Future[Snapshot]":
        """Save on the writer thread; `prepare` runs there first and adds to the metadata (or raises)."""

        def save() -> Snapshot:
            extra = prepare() if prepare is not None else {}
            return self.store.save(model_name, tensors, {**meta, **extra})

        return self._pool.submit(save)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
