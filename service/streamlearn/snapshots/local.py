"""Snapshots in a local (or network-mounted) directory: <root>/<model>/<version>/{weights, meta.json}.

A snapshot is assembled in a hidden temporary directory, fsynced, and renamed into place, so a
reader sees a whole snapshot or none, and a crash leaves at most a temporary directory behind.
A version's number is claimed first, with an empty file <root>/<model>/.claimed-<version>
created exclusively (O_EXCL), so no two writers, and no writer after a deletion, share one.
"""

import errno
import os
import shutil
import time
import uuid
from pathlib import Path

from streamlearn.errors import SnapshotError
from streamlearn.faults import crash_point
from streamlearn.snapshots.meta import WEIGHTS
from streamlearn.snapshots.store import (
    SERVING,
    SnapshotStore,
    claim_name,
    claimed_version,
    stale_claims,
    version_name,
)

STALE_TMP_S = 60  # a temporary directory this old belongs to a crashed writer


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


class LocalSnapshotStore(SnapshotStore):
    """A snapshot store in a directory; the rename of a whole directory publishes a version."""

    def __init__(self, root: Path | str, keep: int = 10) -> None:
        super().__init__(keep)
        self.root = Path(root)

    @property
    def location(self) -> str:
        return str(self.root)

    def ensure_writable(self) -> None:
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
        try:
            entries = os.scandir(self.root / model_name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        with entries:
            return sorted(int(entry.name) for entry in entries if entry.name.isdigit())

    def prune(self, model_name: str) -> None:
        model_dir = self.root / model_name
        published = self.versions(model_name)
        kept = self.kept(model_name, published)
        for version in published:
            if version not in kept:
                shutil.rmtree(model_dir / version_name(version), ignore_errors=True)
        claims: dict[int, float | None] = {}
        for entry in os.scandir(model_dir):
            claimed = claimed_version(entry.name)
            if claimed is None and not entry.name.startswith(".tmp-"):
                continue
            try:
                age = time.time() - entry.stat().st_mtime
            except FileNotFoundError:  # a concurrent writer just published (renamed) or removed it
                continue
            if claimed is not None:
                claims[claimed] = age
            elif age > STALE_TMP_S:
                shutil.rmtree(entry.path, ignore_errors=True)
        for version in stale_claims(claims):
            (model_dir / claim_name(version)).unlink(missing_ok=True)

    def _taken(self, model_name: str) -> int:
        try:
            entries = os.scandir(self.root / model_name)
        except (FileNotFoundError, NotADirectoryError):
            return 0
        with entries:
            names = [entry.name for entry in entries]
        published = (int(name) for name in names if name.isdigit())
        claimed = (claimed_version(name) or 0 for name in names)
        return max([*published, *claimed, 0])

    def _claim(self, model_name: str, version: int) -> bool:
        model_dir = self.root / model_name
        model_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(model_dir / claim_name(version), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        _fsync_dir(model_dir)  # the claim is durable before the version it takes can be
        return True

    def _weights_name(self) -> str:
        return WEIGHTS

    def _publish(self, model_name: str, version: int, files: dict[str, bytes]) -> bool:
        model_dir = self.root / model_name
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = model_dir / f".tmp-{version}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for name, data in files.items():
                _write_durably(tmp / name, data)
            _fsync_dir(tmp)
            crash_point("snapshot.before_publish")
            tmp.rename(model_dir / version_name(version))
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):  # Linux says ENOTEMPTY for a taken version
                return False
            raise
        _fsync_dir(model_dir)
        crash_point("snapshot.after_publish")
        return True

    def _read(self, model_name: str, version: int, name: str) -> bytes:
        return (self.root / model_name / version_name(version) / name).read_bytes()

    def _read_serving(self, model_name: str) -> bytes | None:
        try:
            return (self.root / model_name / SERVING).read_bytes()
        except FileNotFoundError:
            return None

    def _write_serving(self, model_name: str, data: bytes) -> None:
        model_dir = self.root / model_name
        tmp = model_dir / f".tmp-{SERVING}-{uuid.uuid4().hex}"
        try:
            _write_durably(tmp, data)
            tmp.rename(model_dir / SERVING)  # atomic: a reader sees the old file or the new one
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(model_dir)
