"""The snapshot-store contract: numbered versions per model, each visible whole or not at all.

A snapshot is up to three files in one version: the model's weights (safetensors), the rest of
the training state (optimizer, replay, drift detectors; safetensors, which the server never
reads) and meta.json, which carries both files' names and SHA-256. A backend supplies the
storage primitives (list, claim, read, publish, prune); saving, checking and choosing the newest
good version live here, once.

A version number is never reused, even after its snapshot is deleted: a writer first claims the
next number by creating <model>/.claimed-<version> only if absent, and the next number is one
more than the highest claimed or published. Pruning keeps the newest claim for good, so deleting
the newest version (or all of them) by hand leaves the count where it was.
"""

import hashlib
import logging
import random
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file as save_safetensors_file
from torch import Tensor

from streamlearn.errors import SnapshotError
from streamlearn.snapshots.meta import ServingState, SnapshotContent, SnapshotMeta
from streamlearn.snapshots.tensors import MODEL_PREFIX

log = logging.getLogger(__name__)

META = "meta.json"
SERVING = "serving.json"  # per model, beside its versions: pins and the promotion gate's baseline
VERSION_DIGITS = 12  # versions are zero-padded, so names sort as numbers do
CLAIM_ATTEMPTS = 10  # writers racing for a version back off at random, 10 ms to 5 s
CLAIM_PREFIX = ".claimed-"  # + a version's name: that number is taken for good, published or not
STALE_CLAIM_S = 60.0  # an older claim below the newest is deleted: no writer still acts on it


@dataclass(frozen=True)
class Snapshot:
    """One loaded snapshot: its metadata and its tensors."""

    model_name: str
    version: int
    meta: SnapshotMeta
    tensors: dict[str, Tensor]


def version_name(version: int) -> str:
    return f"{version:0{VERSION_DIGITS}d}"


def claim_name(version: int) -> str:
    return CLAIM_PREFIX + version_name(version)


def claimed_version(name: str) -> int | None:
    """The version a claim's file name takes; None for any other name."""
    number = name[len(CLAIM_PREFIX) :]
    if name.startswith(CLAIM_PREFIX) and len(number) == VERSION_DIGITS and number.isdigit():
        return int(number)
    return None


def stale_claims(ages: dict[int, float | None]) -> list[int]:
    """The claims pruning deletes, from each claim's age in seconds: never the newest (it holds
    the count), and an older one only once no writer can still be deciding on its number
    (a writer that listed before it was made and claims after it was deleted would reuse it)."""
    newest = max(ages, default=0)
    return [v for v, age in ages.items() if v < newest and age is not None and age > STALE_CLAIM_S]


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
    def _taken(self, model_name: str) -> int:
        """The highest version ever claimed or published that is still on record; 0 for none."""

    @abstractmethod
    def _claim(self, model_name: str, version: int) -> bool:
        """Take `version` for good if no writer ever has (False if one has), durably."""

    @abstractmethod
    def _weights_name(self) -> str:
        """The file name a new snapshot's weights get."""

    @abstractmethod
    def _publish(self, model_name: str, version: int, files: dict[str, bytes]) -> bool:
        """Make `version` visible with these files, all at once; False if another writer has it."""

    @abstractmethod
    def _read(self, model_name: str, version: int, name: str) -> bytes:
        """One file of a published version (OSError when it cannot be read)."""

    @abstractmethod
    def _read_serving(self, model_name: str) -> bytes | None:
        """The model's serving.json, None when there is none."""

    @abstractmethod
    def _write_serving(self, model_name: str, data: bytes) -> None:
        """Replace the model's serving.json whole (readers see the old or the new one)."""

    # -- the shared logic ---------------------------------------------------------------------------

    def serving_state(self, model_name: str) -> ServingState:
        """What the servers are told about this model: nothing when there is no serving.json;
        SnapshotError when it cannot be read or is corrupt (never taken as "nothing pinned")."""
        try:
            data = self._read_serving(model_name)
            return ServingState() if data is None else ServingState.model_validate_json(data)
        except (OSError, ValidationError) as exc:
            raise SnapshotError(f"{SERVING} of {model_name} is unreadable: {exc}") from None

    def save_serving_state(self, model_name: str, state: ServingState) -> None:
        try:
            self._write_serving(model_name, state.model_dump_json(exclude_none=True).encode())
        except OSError as exc:
            raise SnapshotError(f"cannot write {SERVING} of {model_name}: {exc}") from None

    def kept(self, model_name: str, published: list[int]) -> set[int]:
        """The versions pruning keeps: the newest `keep`, and any the serving state names (all of
        them while the serving state cannot be read: a pin must never be pruned)."""
        try:
            protected = self.serving_state(model_name).protected
        except SnapshotError as exc:
            log.warning("not pruning: %s", exc)
            return set(published)
        return set(published[-self.keep :]) | (protected & set(published))

    def latest_version(self, model_name: str) -> int | None:
        versions = self.versions(model_name)
        return versions[-1] if versions else None

    def save(self, model_name: str, tensors: dict[str, Tensor], content: SnapshotContent) -> Snapshot:
        """Write the next version of a model whole, then prune the old ones.

        The model's tensors ("model.*") go to the weights file, the rest to the training file.
        """
        weights = serialize({k: t for k, t in tensors.items() if k.startswith(MODEL_PREFIX)})
        rest = {k: t for k, t in tensors.items() if not k.startswith(MODEL_PREFIX)}
        training = serialize(rest) if rest else None
        weights_name = self._weights_name()
        training_name = weights_name.replace("weights", "training", 1)
        for attempt in range(CLAIM_ATTEMPTS):
            # Claimed before it is written: a crash in between leaves a gap, never a reused number.
            version = self._taken(model_name) + 1
            if not self._claim(model_name, version):
                time.sleep(random.uniform(0, 0.01 * 2**attempt))  # another writer took it first
                continue
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
                **(
                    {}
                    if training is None
                    else {
                        "training_file": training_name,
                        "training_sha256": hashlib.sha256(training).hexdigest(),
                        "training_bytes": len(training),
                    }
                ),
            )
            files = {weights_name: weights, META: meta.model_dump_json(indent=2).encode()}
            if training is not None:
                files[training_name] = training
            if self._publish(model_name, version, files):
                self.prune(model_name)
                return Snapshot(model_name, version, meta, tensors)
            # A writer that does not claim (an older release) published it first: take the next.
            time.sleep(random.uniform(0, 0.01 * 2**attempt))
        raise SnapshotError(f"could not claim a new snapshot version for {model_name}")

    def meta(self, model_name: str, version: int) -> SnapshotMeta:
        """One version's meta.json alone (SnapshotError when it is missing or unreadable)."""
        where = f"snapshot {model_name} v{version}"
        try:
            return SnapshotMeta.model_validate_json(self._read(model_name, version, META))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "meta.json"
            raise SnapshotError(f"{where} is unreadable: {field}: {first['msg']}") from None
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"{where} is unreadable: {exc}") from None

    def load(
        self, model_name: str, version: int, training: bool = True, meta: SnapshotMeta | None = None
    ) -> Snapshot:
        """One version, its files checked against the SHA-256 in its metadata; without `training`
        only the model's weights (what serving and warm starts need). `meta`: its meta.json, if
        already read (one round trip fewer)."""
        where = f"snapshot {model_name} v{version}"
        meta = meta if meta is not None and meta.version == version else self.meta(model_name, version)
        tensors = self._load_file(
            where, model_name, version, meta.weights_file, meta.weights_sha256, "weights"
        )
        if training and meta.training_file is not None:
            assert meta.training_sha256 is not None  # the meta validator requires both
            tensors |= self._load_file(
                where, model_name, version, meta.training_file, meta.training_sha256, "training state"
            )
        return Snapshot(model_name, version, meta, tensors)

    def _load_file(
        self, where: str, model_name: str, version: int, name: str, sha256: str, what: str
    ) -> dict[str, Tensor]:
        try:
            data = self._read(model_name, version, name)
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"{where} is unreadable: {exc}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise SnapshotError(f"{where} is corrupt: {what} checksum mismatch")
        try:
            return load_safetensors(data)
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise SnapshotError(f"{where} has malformed {what}: {exc}") from None

    def load_latest(self, model_name: str, newer_than: int = 0, training: bool = True) -> Snapshot | None:
        """The newest snapshot that loads and checks out; corrupt ones are skipped with a warning."""
        for version in reversed(self.versions(model_name)):
            if version <= newer_than:
                return None
            try:
                return self.load(model_name, version, training)
            except SnapshotError as exc:
                log.warning("skipping snapshot: %s", exc)
        return None


def serialize(tensors: dict[str, Tensor]) -> bytes:
    """The safetensors bytes of `tensors`, through a temporary file: safetensors' save_file works
    without Python's global lock, while save() holds it for the whole copy, which stalls the
    trainer's loop for hundreds of milliseconds on a large category table."""
    with tempfile.TemporaryDirectory(prefix="streamlearn-snapshot-") as directory:
        path = Path(directory) / "tensors.safetensors"
        save_safetensors_file(tensors, path)
        return path.read_bytes()
