"""Synthetic, seeded, drifting streams for demos, tests and benchmarks.

- sea (binary, 3 features, abrupt drift): label = x0 + x1 <= theta, theta cycling through
  8, 9, 7, 9.5 every `drift_every` records (Street & Kim, 2001); x2 is noise.
- hyperplane (binary, 10 features, gradual drift): label = w.x >= sum(w)/2, with w rotating a
  little every record and the rotation reversing on some features every `drift_every` records.
- friedman (regression, 10 features, abrupt drift): Friedman #1,
  y = 10 sin(pi a b) + 20 (c - 0.5)^2 + 10 d + 5 e + N(0, 1), where (a..e) is a subset of the
  features re-drawn every `drift_every` records.
- blobs (multiclass red/green/blue, dict features f0..f3, incremental drift): Gaussian classes
  whose centres move slowly, reversing direction every `drift_every` records.
- payments (binary fraud, categorical features, abrupt drift): card payments with an amount and
  an hour, a merchant (10,000, Zipf-distributed), a country (30), a device (3) and a list of 0-3
  tags (12). Fraud depends on per-merchant and per-country risk, large amounts at night and one
  tag; no numeric feature carries the merchant's risk. Every `drift_every` records a third of
  the merchants change their risk.
"""

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamlearn.config import StreamName
from streamlearn.tasks import Task

Record = dict[str, Any]


@dataclass(frozen=True)
class StreamInfo:
    """What a trainer needs to know to learn a stream."""

    name: StreamName
    task: Task
    n_features: int  # numeric features
    classes: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    multi_categorical: tuple[str, ...] = ()


def _sea(rng: np.random.Generator, drift_every: int) -> Iterator[tuple[list[float], Any]]:
    thetas = (8.0, 9.0, 7.0, 9.5)
    for i in itertools.count():
        theta = thetas[(i // drift_every) % len(thetas)] if drift_every else thetas[0]
        x = rng.uniform(0, 10, 3)
        yield x.round(4).tolist(), bool(x[0] + x[1] <= theta)


def _hyperplane(rng: np.random.Generator, drift_every: int) -> Iterator[tuple[list[float], Any]]:
    d, step = 10, 0.001
    weights = rng.uniform(0, 1, d)
    direction = np.ones(d)
    for i in itertools.count():
        if drift_every and i and i % drift_every == 0:
            direction[rng.random(d) < 0.5] *= -1  # reverse the rotation on about half the features
        weights = np.clip(weights + direction * step, 0, 1) if drift_every else weights
        x = rng.uniform(0, 1, d)
        yield x.round(4).tolist(), int(x @ weights >= weights.sum() / 2)


def _friedman(rng: np.random.Generator, drift_every: int) -> Iterator[tuple[list[float], Any]]:
    relevant = np.arange(5)
    for i in itertools.count():
        if drift_every and i and i % drift_every == 0:
            relevant = rng.permutation(10)[:5]
        x = rng.uniform(0, 1, 10)
        a, b, c, d, e = x[relevant]
        y = 10 * np.sin(np.pi * a * b) + 20 * (c - 0.5) ** 2 + 10 * d + 5 * e + rng.normal(0, 1)
        yield x.round(4).tolist(), round(float(y), 4)


def _blobs(rng: np.random.Generator, drift_every: int) -> Iterator[tuple[dict[str, float], Any]]:
    names = ("red", "green", "blue")
    centres = rng.normal(0, 2.5, (3, 4))
    velocity = rng.normal(0, 0.0005, (3, 4))
    for i in itertools.count():
        if drift_every and i and i % drift_every == 0:
            velocity = -velocity
        centres = centres + velocity if drift_every else centres
        k = int(rng.integers(3))
        x = centres[k] + rng.normal(0, 1, 4)
        yield {f"f{j}": round(float(v), 4) for j, v in enumerate(x)}, names[k]


PAYMENT_MERCHANTS, PAYMENT_COUNTRIES = 10_000, 30
PAYMENT_TAGS = ("new_card", "contactless", "online", "recurring", "gift", "travel", "fuel", "grocery",
                "electronics", "luxury", "cash_advance", "subscription")  # fmt: skip


def _payments(rng: np.random.Generator, drift_every: int) -> Iterator[tuple[dict[str, Any], Any]]:
    merchant_risk = rng.normal(-1.0, 1.5, PAYMENT_MERCHANTS)
    country_risk = rng.normal(0.0, 0.8, PAYMENT_COUNTRIES)
    popularity = rng.permutation(PAYMENT_MERCHANTS)  # which merchant is the k-th most frequent
    for i in itertools.count():
        if drift_every and i and i % drift_every == 0:
            changed = rng.random(PAYMENT_MERCHANTS) < 1 / 3
            merchant_risk[changed] = rng.normal(-1.0, 1.5, int(changed.sum()))
        merchant = int(popularity[(rng.zipf(1.2) - 1) % PAYMENT_MERCHANTS])
        country = int(min(rng.geometric(0.25) - 1, PAYMENT_COUNTRIES - 1))
        amount = float(rng.lognormal(3.5, 1.0))
        hour = int(rng.integers(24))
        tags = [PAYMENT_TAGS[k] for k in rng.choice(len(PAYMENT_TAGS), int(rng.integers(4)), replace=False)]
        logit = (
            merchant_risk[merchant] + country_risk[country] - 1.5
            + (1.5 if amount > 150 and (hour < 6 or hour >= 22) else 0.0)
            + (1.0 if "cash_advance" in tags else 0.0)
        )  # fmt: skip
        features = {
            "amount": round(amount, 2),
            "hour": hour,
            "merchant": f"m-{merchant:05d}",
            "country": f"c{country:02d}",
            "device": ("mobile", "web", "pos")[int(rng.integers(3))],
            "tags": tags,
        }
        yield features, bool(rng.random() < 1 / (1 + np.exp(-logit)))


STREAMS: dict[str, tuple[StreamInfo, Callable[..., Iterator[tuple[Any, Any]]]]] = {
    "sea": (StreamInfo("sea", "binary", 3), _sea),
    "hyperplane": (StreamInfo("hyperplane", "binary", 10), _hyperplane),
    "friedman": (StreamInfo("friedman", "regression", 10), _friedman),
    "blobs": (StreamInfo("blobs", "multiclass", 4, ("red", "green", "blue")), _blobs),
    "payments": (
        StreamInfo("payments", "binary", 2, (), ("country", "device", "merchant"), ("tags",)),
        _payments,
    ),
}

# Invalid values cycled through by `produce --invalid-every`: one per rejection reason family.
INVALID_VALUES: tuple[bytes, ...] = (
    b'{"features": [1.0, 2.0',
    b'{"features": "abc", "label": 1}',
    b'{"features": [1e999, 0, 0], "label": 1}',
    b'{"label": 1}',
    b'{"features": [1, 2, 3]}',
    b"\xff\xfe not utf-8",
    b"",
)


def stream_info(name: str) -> StreamInfo:
    return STREAMS[name][0]


def records(name: str, seed: int = 0, drift_every: int = 5000) -> Iterator[Record]:
    """The stream's records as dicts following the record contract, forever."""
    rng = np.random.default_rng(seed)
    for i, (features, label) in enumerate(STREAMS[name][1](rng, drift_every)):
        yield {
            "features": features,
            "label": label,
            "ts": int(time.time() * 1000),
            "id": f"{name}-{seed}-{i}",
        }
