"""The snapshot-store contract: numbered versions per model, each visible whole or not at all.

A snapshot is two files in one version: the weights (safetensors) and meta.json, which carries
the weights' file name and SHA-256. A backend supplies the storage primitives (list, read,
publish, prune); saving, checking and choosing the newest good version live here, once.
"""

import hashlib
import logging
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from streamlearn.errors import SnapshotError
from streamlearn.snapshots.meta import SnapshotContent, SnapshotMeta

log = logging.getLogger(__name__)

META = "meta.json"
VERSION_DIGITS = 12  # versions are zero-padded, so names sort as numbers do
CLAIM_ATTEMPTS = 10  # writers racing for a version back off at random, 10 ms to 5 s


@dataclass(frozen=True)
class Snapshot:
    """One loaded snapshot: its metadata and its tensors."""

    model_name: str
    version: int
    meta: SnapshotMeta
    tensors: dict[str, Tensor]


def version_name(version: int) -> str:
    return f"{version:0{VERSION_DIGITS}d}"


class SnapshotStore(ABC):
    """Writes, lists, loads and prunes the snapshots of every model under one location."""

    def __init__(self, keep: int = 10) -> None:
        self.keep = keep

    # -- what a backend provides ------------------------------------------------------------------

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the snapshots are, as the user wrote it (a directory or a URL)."""

    @abstractmethod
    def ensure_writable(self) -> None:
        """Fail early, with a clear message, when the location cannot hold snapshots."""

    @abstractmethod
    def models(self) -> list[str]:
        """Names of the models that have snapshots here."""

    @abstractmethod
    def versions(self, model_name: str) -> list[int]:
        """Complete (published) versions of a model, oldest first."""

    @abstractmethod
    def prune(self, model_name: str) -> None:
        """Keep the newest `keep` versions; clear what a crashed writer left behind."""

    @abstractmethod
    def _weights_name(self) -> str:
        """The file name a new snapshot's weights get."""

    @abstractmethod
    def _publish(self, model_name: str, version: int, files: dict[str, bytes]) -> bool:
        """Make `version` visible with these files, all at once; False if another writer has it."""

    @abstractmethod
    def _read(self, model_name: str, version: int, name: str) -> bytes:
        """One file of a published version (OSError when it cannot be read)."""

    # -- the shared logic ---------------------------------------------------------------------------

    def latest_version(self, model_name: str) -> int | None:
        versions = self.versions(model_name)
        return versions[-1] if versions else None

    def save(self, model_name: str, tensors: dict[str, Tensor], content: SnapshotContent) -> Snapshot:
        """Write the next version of a model whole, then prune the old ones."""
        weights = save_safetensors(tensors)
        weights_name = self._weights_name()
        for attempt in range(CLAIM_ATTEMPTS):
            version = (self.latest_version(model_name) or 0) + 1
            created = time.time()
            meta = SnapshotMeta(
                **content.model_dump(),
                model_name=model_name,
                version=version,
                created_at=datetime.fromtimestamp(created, UTC).isoformat(),
                created_at_ms=int(created * 1000),
                weights_file=weights_name,
                weights_sha256=hashlib.sha256(weights).hexdigest(),
                weights_bytes=len(weights),
            )
            files = {weights_name: weights, META: meta.model_dump_json(indent=2).encode()}
            if self._publish(model_name, version, files):
                self.prune(model_name)
                return Snapshot(model_name, version, meta, tensors)
            # Another writer published this version first: back off a random while, take the next.
            time.sleep(random.uniform(0, 0.01 * 2**attempt))
        raise SnapshotError(f"could not claim a new snapshot version for {model_name}")

    def load(self, model_name: str, version: int) -> Snapshot:
        """One version, its weights checked against the SHA-256 in its metadata."""
        where = f"snapshot {model_name} v{version}"
        try:
            meta = SnapshotMeta.model_validate_json(self._read(model_name, version, META))
            weights = self._read(model_name, version, meta.weights_file)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "meta.json"
            raise SnapshotError(f"{where} is unreadable: {field}: {first['msg']}") from None
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"{where} is unreadable: {exc}") from None
        if hashlib.sha256(weights).hexdigest() != meta.weights_sha256:
            raise SnapshotError(f"{where} is corrupt: weights checksum mismatch")
        try:
            tensors = load_safetensors(weights)
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise SnapshotError(f"{where} has malformed weights: {exc}") from None
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
