"""The decoding engine: micro-batches of Kafka message values become arrays, or rejections.

A micro-batch is decoded at once: msgspec checks each value against the record's types in C and
numpy checks the lengths and ranges of the whole batch. Only a batch holding a record that
fails those checks takes the exact per-record path, which says why each bad record is bad; both
paths accept and reject the same records (a property test holds them to it). The rules
themselves (specs, kinds, hashing) are the record contract, records.py.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import orjson

from streamlearn.errors import InvalidReason, InvalidRecord
from streamlearn.faults import raise_on_marked
from streamlearn.records import (
    FLOAT32_MAX,
    FeatureKinds,
    FeatureSpec,
    LabelSpec,
    category_row,
    fits_float32,
    is_number,
    too_long_category,
)
from streamlearn.tasks import Task


@dataclass
class Rejected:
    """A record that broke the contract: its position in the decoded batch and why."""

    index: int
    reason: InvalidReason
    detail: str


@dataclass
class DecodedBatch:
    """The valid records of a micro-batch as arrays, and the rejected ones."""

    features: np.ndarray  # float32 [n, n_features]
    labels: np.ndarray  # float32 [n] (regression, binary) or int64 [n] (multiclass)
    weights: np.ndarray  # float32 [n]
    rejected: list[Rejected] = field(default_factory=list)
    categories: np.ndarray | None = None  # int64 [n, slots]: table rows, -1 for none (FeatureSpec)

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "DecodedBatch":
        """The first `n` valid records (and none of the rejected)."""
        if n == len(self):
            return self
        categories = None if self.categories is None else self.categories[:n]
        return DecodedBatch(self.features[:n], self.labels[:n], self.weights[:n], categories=categories)


def parse_json(value: bytes | None, max_bytes: int) -> dict[str, Any]:
    """A message value as a JSON object, or InvalidRecord."""
    if not value:
        raise InvalidRecord(InvalidReason.EMPTY, "value is empty or null")
    if len(value) > max_bytes:
        raise InvalidRecord(
            InvalidReason.TOO_LARGE, f"value has {len(value)} bytes, the limit is {max_bytes}"
        )
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        data = _parse_lenient(value)
    if not isinstance(data, dict):
        raise InvalidRecord(InvalidReason.NOT_AN_OBJECT, "value must be a JSON object")
    return data


def _parse_lenient(value: bytes) -> Any:
    """Tell non-UTF-8, NaN/Infinity literals and plain bad JSON apart, after orjson refused the value."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRecord(InvalidReason.NOT_UTF8, "value is not UTF-8") from None
    try:
        # Python's json accepts NaN and Infinity, which orjson rejects; they fail later as non_finite.
        # An integer too long for Python to parse is beyond float32 anyway: a stand-in that is too
        # large keeps it from costing the record when it is in a field we ignore.
        return json.loads(text, parse_int=_integer)
    except (ValueError, RecursionError) as exc:
        raise InvalidRecord(InvalidReason.BAD_JSON, f"value is not JSON: {str(exc)[:80]}") from None


TOO_LARGE = 10**40  # beyond float32's range


def _integer(digits: str) -> int:
    return int(digits) if len(digits) <= 4000 else TOO_LARGE if digits[0] != "-" else -TOO_LARGE


class RecordDecoder:
    """Decodes micro-batches of message values; fixes the feature spec from the first valid record.

    A spec given up front (from --n-features / --feature-names) may still lack names: the first
    valid record with dict features then names them, in sorted key order. `kinds` declares which
    features are categorical before that record is seen.
    """

    def __init__(
        self,
        labels: LabelSpec,
        features: FeatureSpec | None = None,
        max_bytes: int = 1_000_000,
        kinds: FeatureKinds | None = None,
    ):
        self.labels = labels
        self.features = features
        self.fixed = features is not None and bool(features.names or features.category_features)
        self.max_bytes = max_bytes
        self.kinds = kinds or FeatureKinds()

    def fix(self, features: FeatureSpec) -> None:
        """Adopt a spec for good (restored from a snapshot)."""
        self.features, self.fixed = features, True

    def decode(self, values: Sequence[bytes | None]) -> DecodedBatch:
        raise_on_marked(values)
        batch = self._decode_fast(values) if self.fixed and values else None
        return batch if batch is not None else self._decode_exact(values)

    def _decode_fast(self, values: Sequence[bytes | None]) -> DecodedBatch | None:
        """The whole batch at once, or None when some record breaks the contract (or may)."""
        if not all(values) or max(map(len, values)) > self.max_bytes:  # type: ignore[arg-type]
            return None
        try:  # msgspec skips the fields it does not read without checking their bytes
            b"".join(values).decode("utf-8")  # type: ignore[arg-type]
        except UnicodeDecodeError:
            return None
        spec = self.features
        assert spec is not None
        decode = _fast_decoder(self.labels.task, bool(spec.category_features)).decode
        try:
            records = [decode(value) for value in values]  # type: ignore[arg-type]
            rows = [r.features for r in records]
            categories = _fast_categories(rows, spec) if spec.category_features else None
            features = _fast_features(rows, spec)
            labels = _fast_labels([r.label for r in records], self.labels)
            weights = np.array([r.weight for r in records], dtype=np.float64)
        except (msgspec.MsgspecError, RecursionError, KeyError, ValueError, TypeError, OverflowError):
            return None
        if features is None or labels is None or not _in_float32(weights) or (weights < 0).any():
            return None
        if spec.category_features and categories is None:
            return None
        return DecodedBatch(
            features.astype(np.float32), labels, weights.astype(np.float32), categories=categories
        )

    def _decode_exact(self, values: Sequence[bytes | None]) -> DecodedBatch:
        rows: list[list[float]] = []
        categories: list[list[int]] = []
        targets: list[float | int] = []
        weights: list[float] = []
        rejected: list[Rejected] = []
        for index, value in enumerate(values):
            try:
                row, rows_of_categories, target, weight = self._decode_one(value)
            except InvalidRecord as exc:
                rejected.append(Rejected(index, exc.reason, exc.detail))
                continue
            rows.append(row)
            categories.append(rows_of_categories)
            targets.append(target)
            weights.append(weight)
        spec = self.features
        width = spec.n_features if spec else 0
        label_dtype = np.int64 if self.labels.task == "multiclass" else np.float32
        return DecodedBatch(
            features=np.array(rows, dtype=np.float32).reshape(len(rows), width),
            labels=np.array(targets, dtype=label_dtype),
            weights=np.array(weights, dtype=np.float32),
            rejected=rejected,
            categories=(
                np.array(categories, dtype=np.int64).reshape(len(rows), spec.slots)
                if spec is not None and spec.category_features
                else None
            ),
        )

    def _decode_one(self, value: bytes | None) -> tuple[list[float], list[int], float | int, float]:
        record = parse_json(value, self.max_bytes)
        if "features" not in record or record["features"] is None:
            raise InvalidRecord(InvalidReason.MISSING_FEATURES, "features are missing")
        spec = self.features if self.fixed else self._candidate_spec(record["features"])
        assert spec is not None
        row, categories = spec.row(record["features"])
        target = self.labels.value(record.get("label"))
        weight = record.get("weight", 1.0)
        if not is_number(weight) or not fits_float32(weight) or weight < 0:
            raise InvalidRecord(InvalidReason.BAD_WEIGHT, "weight must be a finite number >= 0 (float32)")
        if not self.fixed:
            self.fix(spec)  # the first valid record fixes the feature vector for good
        return row, categories, target, float(weight)

    def _candidate_spec(self, features: Any) -> FeatureSpec:
        given, kinds = self.features, self.kinds
        if isinstance(features, dict) and features:
            spec = FeatureSpec.infer(features, kinds)
            return spec if given is None or spec.n_features == given.n_features else given
        if kinds.categorical or kinds.multi_valued:
            raise InvalidRecord(
                InvalidReason.BAD_FEATURES, "features must be an object: categorical features are declared"
            )
        return given if given is not None else FeatureSpec.infer(features)


# -- the batch path -------------------------------------------------------------------------------


class _ValueLabel(msgspec.Struct):
    """A record as the batch path reads it; unknown fields (ts, id, ...) are ignored."""

    features: list[float] | dict[str, float]
    label: float
    weight: float = 1.0


class _ClassLabel(msgspec.Struct):
    features: list[float] | dict[str, float]
    label: int | str | bool
    weight: float = 1.0


# With categorical features a value may be a number, a string, a list of strings or null; which
# one each feature takes is checked below.
_Mixed = dict[str, float | str | list[str] | None]


class _MixedValueLabel(msgspec.Struct):
    features: _Mixed
    label: float
    weight: float = 1.0


class _MixedClassLabel(msgspec.Struct):
    features: _Mixed
    label: int | str | bool
    weight: float = 1.0


_DECODERS: dict[tuple[bool, bool], msgspec.json.Decoder[Any]] = {
    (False, False): msgspec.json.Decoder(_ValueLabel),
    (True, False): msgspec.json.Decoder(_ClassLabel),
    (False, True): msgspec.json.Decoder(_MixedValueLabel),
    (True, True): msgspec.json.Decoder(_MixedClassLabel),
}


def _fast_decoder(task: Task, categorical: bool) -> msgspec.json.Decoder[Any]:
    return _DECODERS[(task != "regression", categorical)]


def _in_float32(array: np.ndarray) -> bool:
    # Strictly below: an integer just above float32's range can round down to exactly its
    # largest value in float64; the exact path decides such records.
    return bool((np.abs(array) < FLOAT32_MAX).all())


def _fast_features(rows: list[Any], spec: FeatureSpec) -> np.ndarray | None:
    if spec.category_features:  # a dict each (msgspec checked), numbers where numbers belong
        names = spec.names
        values = [[row[name] for name in names] for row in rows]
        if any(type(v) is not float for row in values for v in row):
            return None
        array = np.array(values, dtype=np.float64).reshape(len(rows), spec.n_features)
        return array if _in_float32(array) else None
    if spec.names:
        names, width = spec.names, spec.n_features
        rows = [row if type(row) is list else [row[name] for name in names] if len(row) == width else None
                for row in rows]  # fmt: skip
    elif any(type(row) is not list for row in rows):
        return None
    array = np.array(rows, dtype=np.float64)  # ragged rows or a None raise ValueError / TypeError
    if array.shape != (len(rows), spec.n_features) or not _in_float32(array):
        return None
    return array


def _fast_categories(rows: list[dict[str, Any]], spec: FeatureSpec) -> np.ndarray | None:
    """The table rows of every record's categories, or None when one breaks the contract."""
    keys, buckets, width = spec._keys, spec.hash_buckets, spec.max_categories
    single = list(zip(spec.categorical, spec.seeds, strict=False))
    multi = list(zip(spec.multi_valued, spec.seeds[len(spec.categorical) :], strict=True))
    out: list[int] = []
    for row in rows:
        if not row.keys() <= keys:
            return None
        for name, seed in single:
            value = row.get(name)
            if value is None:
                out.append(-1)
            elif type(value) is str and not too_long_category(value):
                out.append(category_row(value, seed, buckets))
            else:
                return None
        for name, seed in multi:
            value = row.get(name)
            if value is None:
                value = []
            elif type(value) is not list or len(value) > width or any(map(too_long_category, value)):
                return None
            out += [category_row(v, seed, buckets) for v in value]
            out += [-1] * (width - len(value))
    return np.array(out, dtype=np.int64).reshape(len(rows), spec.slots)


def _fast_labels(labels: list[Any], spec: LabelSpec) -> np.ndarray | None:
    if spec.task == "regression":
        values = np.array(labels, dtype=np.float64)
        return values.astype(np.float32) if _in_float32(values) else None
    kinds = set(map(type, labels))
    if bool in kinds and spec.task != "binary":
        return None
    if str in kinds:
        index = {name: k for k, name in enumerate(spec.classes)}
        labels = [index[label] if type(label) is str else label for label in labels]
    classes = np.array(labels, dtype=np.int64)
    if len(classes) and (classes.min() < 0 or classes.max() >= spec.num_classes):
        return None
    return classes if spec.task == "multiclass" else classes.astype(np.float32)
