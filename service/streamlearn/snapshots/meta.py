"""The snapshot contract between trainer and server: what meta.json holds, typed.

The trainer says what a snapshot holds (SnapshotContent); the store adds where and when it was
published and the weights' checksum (SnapshotMeta), in one place, store.save. Readers use the
fields, never string keys. Unknown fields are kept, so a newer writer's additions survive.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMAT = "streamlearn-snapshot/1"
WEIGHTS = "weights.safetensors"


class DeadLetterMarks(BaseModel):
    """Where the dead-letter topic stood when the snapshot was taken."""

    model_config = ConfigDict(frozen=True)

    topic: str
    marks: dict[int, int]  # dead-letter partition -> the offset after the last letter before it


class SnapshotContent(BaseModel):
    """What the trainer puts in a snapshot beside the weights."""

    model_config = ConfigDict(frozen=True, extra="allow")

    records_trained: int = 0
    offsets: dict[str, dict[int, int]] = Field(default_factory=dict)  # topic -> partition -> next offset
    model: dict[str, Any] | None = None  # ModelSpec.to_dict(); None before the first valid record
    training: dict[str, Any] | None = None  # optimizer scalars and the prequential scores
    normalizer: dict[str, Any] | None = None  # the feature means and variances, for a human
    drift: dict[str, Any] | None = None  # detector state and the newest detections
    dlq: DeadLetterMarks | None = None
    origin: dict[str, Any] | None = None  # the model a warm start began from (--init-from)
    join: dict[str, Any] | None = None  # the label join's counts, coverage and served scores
    world: dict[str, Any] | None = None  # many ranks: their number, and the digest of their weights
    config: dict[str, Any] = Field(default_factory=dict)  # the trainer's settings, credentials excluded


class SnapshotMeta(SnapshotContent):
    """meta.json: the content, and what the store adds when it publishes a version."""

    format: str = FORMAT
    model_name: str
    version: int
    created_at: str  # ISO 8601, UTC
    created_at_ms: int
    weights_file: str = WEIGHTS
    weights_sha256: str
    weights_bytes: int
    training_file: str | None = None  # the optimizer, replay and drift state; older releases: in weights
    training_sha256: str | None = None
    training_bytes: int | None = None

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value != FORMAT:
            raise ValueError(f"format {value!r} is not {FORMAT!r}, the one this version reads")
        return value

    @field_validator("weights_file", "training_file")
    @classmethod
    def _plain_file(cls, name: str | None) -> str | None:
        """A plain file name in the same version, nothing else."""
        if name is not None and (not name.endswith(".safetensors") or "/" in name or "\\" in name):
            raise ValueError(f"meta.json names no valid safetensors file ({name!r})")
        return name

    @model_validator(mode="after")
    def _training_checked(self) -> "SnapshotMeta":
        if self.training_file is not None and self.training_sha256 is None:
            raise ValueError("meta.json names a training file without its SHA-256")
        return self


class ServingState(BaseModel):
    """serving.json beside a model's versions: what the servers are told to serve, shared by
    every replica and kept across restarts. The versions it names are never pruned."""

    model_config = ConfigDict(frozen=True, extra="allow")

    pinned: int | None = Field(None, ge=1)  # serve this version and no other, until unpinned
    held_against: int | None = Field(None, ge=1)  # the promotion gate holds newer versions against this one

    @property
    def protected(self) -> set[int]:
        return {v for v in (self.pinned, self.held_against) if v is not None}
