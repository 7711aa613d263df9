"""A joined example as a record to learn, and the contract of the join's two topics.

JoinedRecord is what the label join hands the pipeline: the logged features with the label, in
the record contract's JSON, handled like a consumed message. parsed reads a message of either
topic as JSON (logentry.py then reads its fields); fingerprint tells whether two runs learned the
same pairs.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import xxhash

from streamlearn.decoding import parse_json
from streamlearn.errors import InvalidReason, InvalidRecord

FINGERPRINT_SPACE = 2**64


@dataclass
class JoinedRecord:
    """A joined example, handled as a message: a record to decode and learn, and its source."""

    id: str
    features: Any
    label: Any
    weight: float
    source: tuple[str, int, int]  # (topic, partition, offset) of the label, or of the entry imputed
    imputed: bool = False
    _value: bytes | None = field(default=None, repr=False, compare=False)

    def topic(self) -> str:
        return self.source[0]

    def partition(self) -> int:
        return self.source[1]

    def offset(self) -> int:
        return self.source[2]

    def key(self) -> bytes:
        return self.id.encode()

    def headers(self) -> None:
        return None

    def value(self) -> bytes:
        """The record the decoder reads: {"features", "label", "weight"}."""
        if self._value is None:
            record = {"features": self.features, "label": self.label, "weight": self.weight}
            self._value = orjson.dumps(record)
        return self._value

    def to_json(self) -> list[Any]:
        return [self.id, self.features, self.label, self.weight, list(self.source), self.imputed]

    @classmethod
    def from_json(cls, data: list[Any]) -> "JoinedRecord":
        key, features, label, weight, (topic, partition, offset), imputed = data
        return cls(key, features, label, float(weight), (topic, int(partition), int(offset)), bool(imputed))


def fingerprint(pairs: Sequence[tuple[str, Any]]) -> int:
    """An order-independent fingerprint of (id, label) pairs: the sum of their 64-bit hashes.

    Two runs learned the same pairs (each as often) exactly when their fingerprints and counts
    agree, whatever order they learned them in."""
    total = 0
    for key, label in pairs:
        total += xxhash.xxh3_64_intdigest(orjson.dumps([key, label]))
    return total % FINGERPRINT_SPACE


def parsed(value: bytes | None, max_bytes: int) -> dict[str, Any]:
    """A message value as a JSON object that can be written back as JSON: what the join keeps is
    written into snapshots, records and dead letters, and the lenient reader takes what orjson
    does not write (integers beyond 64 bits, lone surrogates, nesting deeper than 254)."""
    entry = parse_json(value, max_bytes)
    try:
        orjson.dumps(entry)
    except (orjson.JSONEncodeError, RecursionError):
        detail = "value holds an integer beyond 64 bits, a lone surrogate or too deep a nesting"
        raise InvalidRecord(InvalidReason.BAD_JSON, detail) from None
    return entry
