"""The record contract: Kafka message values (UTF-8 JSON) become float32 feature rows and labels.

A value is {"features": [float, ...] | {"name": float, ...}, "label": ..., "weight": float?,
"ts": epoch-ms?, "id": str?}. A value that breaks the contract is rejected with an
InvalidReason; it never reaches the model. The same feature rules serve predict requests.
Every number must be a finite float32 (|x| <= 3.4e38). A key given twice in one object takes
its last value, as orjson, JavaScript and the server's request parser all do.

Decoding whole micro-batches by these rules is decoding.py's work.
"""

import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import xxhash

from streamlearn.errors import ConfigError, InvalidReason, InvalidRecord
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


def is_number(value: Any) -> bool:
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


class DeclaresFeatures(Protocol):
    """What declares the features' kinds: a trainer's settings (--numeric, --categorical, ...)."""

    @property
    def numeric(self) -> tuple[str, ...]: ...
    @property
    def categorical(self) -> tuple[str, ...]: ...
    @property
    def multi_categorical(self) -> tuple[str, ...]: ...
    @property
    def hash_buckets(self) -> int: ...
    @property
    def max_categories(self) -> int: ...
    @property
    def embedding_dim(self) -> int: ...
    @property
    def min_count(self) -> int: ...


def feature_kinds(s: DeclaresFeatures) -> FeatureKinds:
    """The features' kinds as a trainer's settings declare them."""
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
    def seeds(self) -> tuple[int, ...]:
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
        buckets, seeds = self.hash_buckets, self.seeds
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


def too_long_category(category: str) -> bool:
    """Whether a category has more than MAX_CATEGORY_BYTES bytes of UTF-8 (encoded only if it may)."""
    if len(category) <= MAX_CATEGORY_BYTES // 4:  # 4 bytes per code point at most
        return False
    if len(category) > MAX_CATEGORY_BYTES:
        return True
    return len(category.encode("utf-8", "surrogatepass")) > MAX_CATEGORY_BYTES


def _check_length(name: str, category: str) -> None:
    if too_long_category(category):
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
    return "a number" if is_number(value) else f"a {type(value).__name__}"


def _finite_numbers(values: Sequence[Any]) -> list[float]:
    for value in values:
        if not is_number(value):
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
        if is_number(label) and not fits_float32(label):
            raise InvalidRecord(InvalidReason.NON_FINITE, "label must be finite and within +-3.4e38")
        if self.task == "regression":
            if not is_number(label):
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
        if is_number(label) and float(label).is_integer():
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
