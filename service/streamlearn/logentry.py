"""The prediction log's entry: what the server writes for each prediction, and the label join reads.

One message value per predicted instance, JSON: {"id", "ts" (the server's receive time, epoch
ms), "model", "version", "features" (as the model used them, in the record contract's form),
"prediction", "probabilities"?}. The labels topic shares "id" and "ts", checked alike here.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from streamlearn.errors import InvalidReason, InvalidRecord

MAX_ID_CHARS = 256  # a prediction id's length at most: the server truncates to it, the join refuses past it
MAX_TS = 2**53  # epoch ms far beyond any real time, still exact in a float


@dataclass(frozen=True)
class PredictionEntry:
    """One prediction as logged: the server encodes it, the label join parses it back."""

    id: str
    ts: int
    model: str | None
    version: int
    features: Any
    prediction: Any = None
    probabilities: Any = None  # per class, for classifiers only

    def encode(self) -> bytes:
        """The message value (numpy features and probabilities are written as JSON lists)."""
        entry: dict[str, Any] = {
            "id": self.id,
            "ts": self.ts,
            "model": self.model,
            "version": self.version,
            "features": self.features,
            "prediction": self.prediction,
        }
        if self.probabilities is not None:
            entry["probabilities"] = self.probabilities
        return orjson.dumps(entry, option=orjson.OPT_SERIALIZE_NUMPY)

    @classmethod
    def parse(
        cls, fields: dict[str, Any], model: str, checked_ts: Callable[[int], int] = int
    ) -> "PredictionEntry | None":
        """The entry a decoded message holds, or None when it was logged for another model.

        Refuses (InvalidRecord, with its reason) in this order: the id, the ts (then `checked_ts`,
        e.g. against the clock), no features, the version; an entry of another model is never
        refused for its features or version."""
        key, ts = join_id(fields), checked_ts(join_ts(fields))
        logged_for = fields.get("model")
        if logged_for is not None and logged_for != model:
            return None
        features = fields.get("features")
        if features is None:
            raise InvalidRecord(InvalidReason.MISSING_FEATURES, "the logged prediction has no features")
        version = fields.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < MAX_TS:
            raise InvalidRecord(InvalidReason.BAD_JOIN_FIELD, "version must be a non-negative integer")
        prediction, probabilities = fields.get("prediction"), fields.get("probabilities")
        return cls(key, ts, logged_for, version, features, prediction, probabilities)


def join_id(entry: dict[str, Any]) -> str:
    """The id an entry or a label joins on."""
    key = entry.get("id")
    if not isinstance(key, str) or not 0 < len(key) <= MAX_ID_CHARS:
        detail = f"id must be a string of 1 to {MAX_ID_CHARS} characters"
        raise InvalidRecord(InvalidReason.BAD_JOIN_FIELD, detail)
    return key


def join_ts(entry: dict[str, Any]) -> int:
    """An entry's or a label's ts, epoch milliseconds (an integral float is taken as its integer)."""
    ts = entry.get("ts")
    if isinstance(ts, float) and math.isfinite(ts) and ts.is_integer():
        ts = int(ts)
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts < MAX_TS:
        detail = "ts must be epoch milliseconds (a non-negative integer)"
        raise InvalidRecord(InvalidReason.BAD_JOIN_FIELD, detail)
    return ts
