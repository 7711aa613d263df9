"""The drifting streams the learning benchmark scores learners on, as records and as arrays.

- the four demo streams (streamlearn.dev.streams), a concept change every DRIFT_EVERY records;
- River's synthetic generators with abrupt concept changes at known positions (SEA, Agrawal,
  RandomRBFDrift, FriedmanDrift) and a gradually drifting Hyperplane;
- real datasets shipped inside the river wheel (no download): Phishing, ImageSegments and a
  slice of Shuttle; their drifts, if any, are unknown.

Every stream is materialised once: the same records, in the same order, for every learner.
"""

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from river import datasets
from river.datasets import synth

from streamlearn.dev.streams import records, stream_info

N_RECORDS = 40_000
DRIFT_EVERY = 10_000
# River's ConceptDriftStream switches over a sigmoid of this many records; narrower overflows its exp.
ABRUPT_WIDTH = 100


@dataclass
class Stream:
    name: str
    task: str  # regression, binary or multiclass
    x: np.ndarray  # float32 [n, n_features]
    y: np.ndarray  # float32 labels (regression, binary) or int64 class indices
    classes: tuple[str, ...] = ()
    drifts: list[int] = field(default_factory=list)  # positions of abrupt concept changes
    kind: str = "synthetic"

    def events(self) -> list[dict[str, Any]]:
        """The records as the record contract has them (what is published to Kafka)."""
        if self.task == "multiclass":
            labels: list[Any] = [self.classes[int(v)] for v in self.y]
        elif self.task == "binary":
            labels = [int(v) for v in self.y]
        else:
            labels = [float(v) for v in self.y]
        return [{"features": row, "label": label} for row, label in zip(self.x.tolist(), labels, strict=True)]


def _demo(name: str, n: int) -> Stream:
    info = stream_info(name)
    rows, labels = [], []
    for record in itertools.islice(records(name, seed=1, drift_every=DRIFT_EVERY), n):
        features = record["features"]
        rows.append([features[k] for k in sorted(features)] if isinstance(features, dict) else features)
        labels.append(info.classes.index(record["label"]) if info.classes else record["label"])
    drifts = [] if name == "hyperplane" or name == "blobs" else list(range(DRIFT_EVERY, n, DRIFT_EVERY))
    return _stream(f"{name} (demo)", info.task, rows, labels, info.classes, drifts)


def _river(name: str, task: str, generator: Any, n: int, drifts: list[int], classes: int = 0) -> Stream:
    rows, labels = [], []
    keys: list[Any] | None = None
    for x, y in generator.take(n):
        keys = keys or sorted(x)
        rows.append([float(x[k]) for k in keys])
        labels.append(y)
    names = tuple(str(i) for i in range(classes)) if task == "multiclass" else ()
    return _stream(name, task, rows, labels, names, drifts)


def _stream(
    name: str, task: str, rows: list, labels: list, classes: tuple, drifts: list[int], kind: str = "synthetic"
) -> Stream:
    dtype = np.int64 if task == "multiclass" else np.float32
    return Stream(
        name,
        task,
        np.asarray(rows, np.float32),
        np.asarray(labels, dtype=dtype),
        tuple(classes),
        drifts,
        kind,
    )


def _real(dataset: Any, name: str, task: str, n: int | None = None) -> Stream:
    rows, labels = [], []
    keys: list[Any] | None = None
    classes: list[Any] = []
    for x, y in itertools.islice(dataset, n):
        keys = keys or sorted(x)
        rows.append([float(x[k]) for k in keys])
        if task == "multiclass":
            if y not in classes:
                classes.append(y)
            labels.append(classes.index(y))
        else:
            labels.append(y)
    return _stream(name, task, rows, labels, tuple(map(str, classes)), [], kind="real")


def all_streams(n: int = N_RECORDS) -> list[Stream]:
    """Every stream of the benchmark, `n` records each (fewer for the small real datasets)."""

    # River's ConceptDriftStream nests: the innermost stream is the first concept.
    def nested(make: Any, variants: list[Any], seed: int) -> tuple[Any, list[int]]:
        stream = make(variants[-1])
        count = min(len(variants), (n - 1) // DRIFT_EVERY + 1)
        positions = [i * DRIFT_EVERY for i in range(1, count)]
        for i in range(count - 2, -1, -1):
            stream = synth.ConceptDriftStream(
                make(variants[i]), stream, position=DRIFT_EVERY, width=ABRUPT_WIDTH, seed=seed
            )
        return stream, positions

    sea, sea_drifts = nested(lambda v: synth.SEA(variant=v, seed=7), [0, 1, 2, 3], 7)
    agrawal, agrawal_drifts = nested(
        lambda f: synth.Agrawal(classification_function=f, seed=7), [0, 2, 5, 8], 7
    )
    return [
        *(_demo(name, n) for name in ("sea", "hyperplane", "friedman", "blobs")),
        _river("SEA (River)", "binary", sea, n, sea_drifts),
        _river("Agrawal (River)", "binary", agrawal, n, agrawal_drifts),
        _river(
            "Hyperplane (River, gradual)",
            "binary",
            synth.Hyperplane(seed=7, n_features=10, n_drift_features=5, mag_change=0.001),
            n,
            [],
        ),
        _river(
            "RandomRBFDrift (River, gradual)",
            "multiclass",
            synth.RandomRBFDrift(
                seed_model=7,
                seed_sample=7,
                n_classes=3,
                n_features=10,
                n_centroids=20,
                change_speed=0.0001,
                n_drift_centroids=10,
            ),
            n,
            [],
            classes=3,
        ),
        _river(
            "FriedmanDrift (River)",
            "regression",
            synth.FriedmanDrift(drift_type="gra", position=(n // 4, n // 2), seed=7),
            n,
            [n // 4, n // 2],
        ),
        _real(datasets.Phishing(), "Phishing (real)", "binary"),
        _real(datasets.ImageSegments(), "ImageSegments (real)", "multiclass"),
        _real(datasets.Shuttle(), "Shuttle (real)", "binary", n),
    ]
