"""The record contract: Kafka message values (UTF-8 JSON) become float32 feature rows and labels.

A value is {"features": [float, ...] | {"name": float, ...}, "label": ..., "weight": float?,
"ts": epoch-ms?, "id": str?}. A value that breaks the contract is rejected with an
InvalidReason; it never reaches the model. The same feature rules serve predict requests.
Every number must be a finite float32 (|x| <= 3.4e38). A key given twice in one object takes
its last value, as orjson, JavaScript and the server's request parser all do.

A micro-batch is decoded at once: msgspec checks each value against the record's types in C and
numpy checks the lengths and ranges of the whole batch. Only a batch holding a record that
fails those checks takes the exact per-record path, which says why each bad record is bad; both
paths accept and reject the same records (a property test holds them to it).
"""

import json
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import msgspec
import numpy as np
import orjson
import xxhash

from streamlearn.errors import ConfigError, InvalidReason, InvalidRecord
from streamlearn.faults import raise_on_marked
from streamlearn.tasks import Task

_NUMBER = (int, float)
FLOAT32_MAX = float(np.finfo(np.float32).max)  # about 3.4e38; anything larger becomes inf


def _previewer() -> reprlib.Repr:
    """A bounded repr for error details: a value from Kafka may be huge or deeply nested."""
    bounded = reprlib.Repr()
    bounded.maxstring = bounded.maxother = 40
    bounded.maxlist = bounded.maxdict = 4
    bounded.maxlevel = 2
    return bounded


_preview = _previewer().repr


def _is_number(value: Any) -> bool:
    # bool is an int subclass; a JSON true is not a number in our contract
    return isinstance(value, _NUMBER) and not isinstance(value, bool)


def fits_float32(value: int | float) -> bool:
    """Whether a JSON number is a finite float32: not NaN, not infinite, not beyond +-3.4e38.

    Comparing keeps Python's exact int semantics, so a 400-digit integer is simply too large
    (math.isfinite would raise OverflowError on it).
    """
    return -FLOAT32_MAX <= value <= FLOAT32_MAX


HASH_BUCKETS = 2**18  # rows of the hashed category table, by default
MAX_CATEGORIES = 32  # strings in one multi-valued feature, by default
MAX_CATEGORY_BYTES = 1024  # UTF-8 bytes of one category: a name, not a document (a bound on what is logged)
EMBEDDING_DIM = 8


def category_seed(name: str) -> int:
    """The seed a feature's categories are hashed with: the xxh3-64 of its name (UTF-8)."""
    return xxhash.xxh3_64_intdigest(name.encode())


def category_row(value: str, seed: int, buckets: int) -> int:
    """The table row of one category: xxh3-64 of its UTF-8 bytes, seeded by the feature, mod buckets.

    Stable across processes, restarts and platforms; the same string in two features lands in
    unrelated rows. A string that is not valid UTF-8 (a lone surrogate from JSON) hashes its
    code points as UTF-8 with surrogates passed through.
    """
    return xxhash.xxh3_64_intdigest(value.encode("utf-8", "surrogatepass"), seed) % buckets


@dataclass(frozen=True)
class FeatureKinds:
    """What the settings declare about features before the first record: names, kinds, encoding."""

    numeric: tuple[str, ...] = ()  # must be numbers (the rest: by the first record)
    categorical: tuple[str, ...] = ()  # one string each
    multi_valued: tuple[str, ...] = ()  # a list of strings each
    hash_buckets: int = HASH_BUCKETS
    max_categories: int = MAX_CATEGORIES
    embedding_dim: int = EMBEDDING_DIM
    min_count: int = 1

    def kind_of(self, name: str, value: Any) -> str:
        """`numeric`, `categorical` or `multi_valued`: as declared, else by the value's type."""
        for kind in ("numeric", "categorical", "multi_valued"):
            if name in getattr(self, kind):
                return kind
        if isinstance(value, str):
            return "categorical"
        if isinstance(value, list):
            return "multi_valued"
        return "numeric"


def feature_kinds(settings: Any) -> FeatureKinds:
    """The declaration of a trainer's settings (--numeric, --categorical, --hash-buckets...)."""
    s = settings
    return FeatureKinds(
        s.numeric, s.categorical, s.multi_categorical, s.hash_buckets, s.max_categories, s.embedding_dim,
        s.min_count,
    )  # fmt: skip


@dataclass(frozen=True)
class FeatureSpec:
    """The feature vector: numeric features (length, names, order) and categorical ones.

    A record's numbers become a float32 row; its categories become `slots` table rows (-1 for
    none): one slot per categorical feature, then `max_categories` per multi-valued one.
    """

    n_features: int
    names: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    multi_valued: tuple[str, ...] = ()
    hash_buckets: int = HASH_BUCKETS
    max_categories: int = MAX_CATEGORIES
    embedding_dim: int = EMBEDDING_DIM  # the MLP's width per category; the linear model's is its outputs
    min_count: int = 1  # categories whose row was seen fewer times share their feature's rare row

    def __post_init__(self) -> None:
        if self.names and len(self.names) != self.n_features:
            raise ConfigError("feature names and n_features disagree")
        named = [*self.names, *self.categorical, *self.multi_valued]
        if len(set(named)) != len(named):
            raise ConfigError("a feature is declared with two kinds")

    @property
    def slots(self) -> int:
        """Table rows per record: one per categorical feature, max_categories per multi-valued one."""
        return len(self.categorical) + self.max_categories * len(self.multi_valued)

    @property
    def category_features(self) -> tuple[str, ...]:
        return self.categorical + self.multi_valued

    @property
    def slot_features(self) -> np.ndarray:
        """For each slot, the index of its feature in category_features."""
        widths = [1] * len(self.categorical) + [self.max_categories] * len(self.multi_valued)
        return np.repeat(np.arange(len(widths)), widths)

    @cached_property
    def _seeds(self) -> tuple[int, ...]:
        return tuple(category_seed(name) for name in self.category_features)

    @cached_property
    def _keys(self) -> frozenset[str]:
        return frozenset((*self.names, *self.categorical, *self.multi_valued))

    def row(self, features: Any) -> tuple[list[float], list[int]]:
        """One record's numbers as finite floats and its categories as table rows, or InvalidRecord."""
        if isinstance(features, dict):
            if not self._keys:
                raise InvalidRecord(
                    InvalidReason.FEATURE_MISMATCH, "dict features need feature names (--feature-names)"
                )
            if not features.keys() <= self._keys or not features.keys() >= set(self.names):
                missing = sorted(set(self.names) - features.keys())[:3]
                extra = sorted(features.keys() - self._keys)[:3]
                raise InvalidRecord(
                    InvalidReason.FEATURE_MISMATCH,
                    f"feature names differ: missing {_preview(missing)}, unexpected {_preview(extra)}",
                )
            values = [features[name] for name in self.names]
            for name, value in zip(self.names, values, strict=True):
                if isinstance(value, str | list):
                    raise InvalidRecord(
                        InvalidReason.WRONG_KIND, f"feature {_preview(name)} is numeric, not {_kind(value)}"
                    )
            rows = self._category_rows(features)
        elif isinstance(features, list):
            if self.category_features:
                raise InvalidRecord(
                    InvalidReason.BAD_FEATURES, "features must be an object: the model has categorical ones"
                )
            values, rows = features, []
        else:
            raise InvalidRecord(InvalidReason.BAD_FEATURES, "features must be a list or an object of numbers")
        row = _finite_numbers(values)  # junk where numbers belong says more than a wrong length
        if len(row) != self.n_features:
            raise InvalidRecord(
                InvalidReason.WRONG_LENGTH, f"expected {self.n_features} features, got {len(row)}"
            )
        return row, rows

    def _category_rows(self, features: dict[str, Any]) -> list[int]:
        rows: list[int] = []
        buckets, seeds = self.hash_buckets, self._seeds
        for name, seed in zip(self.categorical, seeds, strict=False):
            value = features.get(name)
            if value is None:
                rows.append(-1)  # no category
            elif isinstance(value, str):
                _check_length(name, value)
                rows.append(category_row(value, seed, buckets))
            else:
                raise InvalidRecord(
                    InvalidReason.WRONG_KIND,
                    f"feature {_preview(name)} is one category (a string), not {_kind(value)}",
                )
        for name, seed in zip(self.multi_valued, seeds[len(self.categorical) :], strict=True):
            value = features.get(name)
            if value is None:
                value = []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidRecord(
                    InvalidReason.WRONG_KIND,
                    f"feature {_preview(name)} is a list of categories (strings), not {_kind(value)}",
                )
            if len(value) > self.max_categories:
                raise InvalidRecord(
                    InvalidReason.TOO_MANY_CATEGORIES,
                    f"feature {_preview(name)} has {len(value)} categories, "
                    f"the limit is {self.max_categories}",
                )
            for category in value:
                _check_length(name, category)
            rows += [category_row(v, seed, buckets) for v in value]
            rows += [-1] * (self.max_categories - len(value))
        return rows

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"n_features": self.n_features, "names": list(self.names)}
        if self.category_features:
            data |= {
                "categorical": list(self.categorical),
                "multi_valued": list(self.multi_valued),
                "hash_buckets": self.hash_buckets,
                "max_categories": self.max_categories,
                "embedding_dim": self.embedding_dim,
                "min_count": self.min_count,
                "hash": "xxh3-64",
            }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureSpec":
        return cls(
            int(data["n_features"]),
            tuple(data.get("names") or ()),
            tuple(data.get("categorical") or ()),
            tuple(data.get("multi_valued") or ()),
            int(data.get("hash_buckets", HASH_BUCKETS)),
            int(data.get("max_categories", MAX_CATEGORIES)),
            int(data.get("embedding_dim", EMBEDDING_DIM)),
            int(data.get("min_count", 1)),
        )

    @classmethod
    def infer(cls, features: Any, kinds: FeatureKinds | None = None) -> "FeatureSpec":
        """The spec a first valid record implies: its length, or its sorted keys with their kinds.

        A declared categorical feature the record lacks is still one; an undeclared one must be
        in the first record to be known.
        """
        kinds = kinds or FeatureKinds()
        if isinstance(features, dict) and features:
            by_kind: dict[str, set[str]] = {"numeric": set(), "categorical": set(), "multi_valued": set()}
            for name, value in features.items():
                by_kind[kinds.kind_of(name, value)].add(name)
            by_kind["categorical"] |= set(kinds.categorical)
            by_kind["multi_valued"] |= set(kinds.multi_valued)
            numeric = tuple(sorted(by_kind["numeric"]))
            return cls(
                len(numeric), numeric, tuple(sorted(by_kind["categorical"])),
                tuple(sorted(by_kind["multi_valued"])), kinds.hash_buckets, kinds.max_categories,
                kinds.embedding_dim, kinds.min_count,
            )  # fmt: skip
        if isinstance(features, list) and features:
            return cls(len(features))
        raise InvalidRecord(InvalidReason.BAD_FEATURES, "features must be a non-empty list or object")


def _too_long(category: str) -> bool:
    """Whether a category has more than MAX_CATEGORY_BYTES bytes of UTF-8 (encoded only if it may)."""
    if len(category) <= MAX_CATEGORY_BYTES // 4:  # 4 bytes per code point at most
        return False
    if len(category) > MAX_CATEGORY_BYTES:
        return True
    return len(category.encode("utf-8", "surrogatepass")) > MAX_CATEGORY_BYTES


def _check_length(name: str, category: str) -> None:
    if _too_long(category):
        raise InvalidRecord(
            InvalidReason.CATEGORY_TOO_LONG,
            f"feature {_preview(name)} has a category of more than {MAX_CATEGORY_BYTES} bytes",
        )


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number" if _is_number(value) else f"a {type(value).__name__}"


def _finite_numbers(values: Sequence[Any]) -> list[float]:
    for value in values:
        if not _is_number(value):
            raise InvalidRecord(InvalidReason.BAD_FEATURES, f"feature {_preview(value)} is not a number")
        if not fits_float32(value):
            raise InvalidRecord(
                InvalidReason.NON_FINITE, "features must be finite numbers within float32's range (+-3.4e38)"
            )
    return list(values)


@dataclass(frozen=True)
class LabelSpec:
    """What a label means for the task: a float, 0/1, or one of K classes."""

    task: Task
    classes: tuple[str, ...] = ()
    num_classes: int = 0

    @property
    def n_outputs(self) -> int:
        return self.num_classes if self.task == "multiclass" else 1

    @property
    def class_names(self) -> list[str]:
        if self.classes:
            return list(self.classes)
        return [str(k) for k in range(2 if self.task == "binary" else self.num_classes)]

    @classmethod
    def create(cls, task: Task, classes: tuple[str, ...] = (), num_classes: int | None = None) -> "LabelSpec":
        if task == "regression":
            return cls(task)
        if task == "binary":
            return cls(task, classes, 2)
        return cls(task, classes, num_classes or len(classes))

    def value(self, label: Any) -> float | int:
        """The label as a float (regression, binary) or a class index (multiclass)."""
        if label is None:
            raise InvalidRecord(InvalidReason.MISSING_LABEL, "label is missing")
        if _is_number(label) and not fits_float32(label):
            raise InvalidRecord(InvalidReason.NON_FINITE, "label must be finite and within +-3.4e38")
        if self.task == "regression":
            if not _is_number(label):
                raise InvalidRecord(InvalidReason.BAD_LABEL, "regression label must be a number")
            return float(label)
        if isinstance(label, bool):
            if self.task == "binary":
                return int(label)
            raise InvalidRecord(InvalidReason.BAD_LABEL, "multiclass label must be a class index or name")
        if isinstance(label, str):
            if label in self.classes:
                return self.classes.index(label)
            raise InvalidRecord(InvalidReason.UNKNOWN_CLASS, f"unknown class {_preview(label)}")
        if _is_number(label) and float(label).is_integer():
            index = int(label)
            if 0 <= index < self.num_classes:
                return index
            raise InvalidRecord(
                InvalidReason.UNKNOWN_CLASS, f"class index {index} not in 0..{self.num_classes - 1}"
            )
        raise InvalidRecord(InvalidReason.BAD_LABEL, f"label {_preview(label)} is not a valid class")

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "classes": list(self.classes), "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LabelSpec":
        return cls(data["task"], tuple(data.get("classes") or ()), int(data.get("num_classes") or 0))


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
        if not _is_number(weight) or not fits_float32(weight) or weight < 0:
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
    single = list(zip(spec.categorical, spec._seeds, strict=False))
    multi = list(zip(spec.multi_valued, spec._seeds[len(spec.categorical) :], strict=True))
    out: list[int] = []
    for row in rows:
        if not row.keys() <= keys:
            return None
        for name, seed in single:
            value = row.get(name)
            if value is None:
                out.append(-1)
            elif type(value) is str and not _too_long(value):
                out.append(category_row(value, seed, buckets))
            else:
                return None
        for name, seed in multi:
            value = row.get(name)
            if value is None:
                value = []
            elif type(value) is not list or len(value) > width or any(map(_too_long, value)):
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
