"""Prequential accuracy on drifting streams: Streamlearn's trainer against River's online learners.

Every learner sees the same records in the same order and is scored test-then-train: River one
record at a time, Streamlearn one micro-batch at a time (each batch predicted before it is learned,
so a batch of 256 is judged by a model up to 256 records stale).
"""

import itertools
import time

import orjson
from river import forest, linear_model, preprocessing, tree

from common import table
from streamlearn.dev.streams import records
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import LabelSpec, RecordDecoder
from streamlearn.train.optim import OptimizerSettings, make_optimizer
from streamlearn.train.trainer import Trainer, pick_device

N_RECORDS = 20_000
DRIFT_EVERY = 5_000
STREAMS = ("sea", "hyperplane")


def streamlearn_accuracy(name: str, arch: str, batch_size: int) -> float:
    values = [
        orjson.dumps(r) for r in itertools.islice(records(name, seed=1, drift_every=DRIFT_EVERY), N_RECORDS)
    ]
    decoder = RecordDecoder(LabelSpec.create("binary"))
    trainer = None
    for start in range(0, N_RECORDS, batch_size):
        batch = decoder.decode(values[start : start + batch_size])
        if trainer is None:
            spec = ModelSpec(
                LabelSpec.create("binary"),
                decoder.features,
                arch,
                {"hidden": [64, 64]} if arch == "mlp" else {},
            )
            model = build_model(spec)
            trainer = Trainer(
                model, make_optimizer(model, OptimizerSettings("adam", 0.005)), pick_device("cpu")
            )
        trainer.step(batch)
    assert trainer is not None
    return trainer.scores.accuracy


def river_accuracy(name: str, make_model) -> float:
    model, correct = make_model(), 0
    for record in itertools.islice(records(name, seed=1, drift_every=DRIFT_EVERY), N_RECORDS):
        x = dict(enumerate(record["features"]))
        y = bool(record["label"])
        correct += model.predict_one(x) == y
        model.learn_one(x, y)
    return correct / N_RECORDS


RIVER = {
    "River StandardScaler + LogisticRegression": lambda: (
        preprocessing.StandardScaler() | linear_model.LogisticRegression()
    ),
    "River HoeffdingAdaptiveTree": lambda: tree.HoeffdingAdaptiveTreeClassifier(seed=1),
    "River ARF (10 trees, ADWIN)": lambda: forest.ARFClassifier(n_models=10, seed=1),
}
OURS = {
    "Streamlearn linear, batch 32": ("linear", 32),
    "Streamlearn MLP [64, 64], batch 32": ("mlp", 32),
    "Streamlearn MLP [64, 64], batch 256 (default)": ("mlp", 256),
}


def main() -> list[str]:
    rows = []
    for label, (arch, batch_size) in OURS.items():
        started = time.perf_counter()
        accuracies = [streamlearn_accuracy(name, arch, batch_size) for name in STREAMS]
        rows.append((label, *(f"{a:.3f}" for a in accuracies), f"{time.perf_counter() - started:.1f}"))
    for label, make_model in RIVER.items():
        started = time.perf_counter()
        accuracies = [river_accuracy(name, make_model) for name in STREAMS]
        rows.append((label, *(f"{a:.3f}" for a in accuracies), f"{time.perf_counter() - started:.1f}"))
    return [
        table(
            "Learning quality on drifting streams",
            ("learner", *(f"{name} accuracy" for name in STREAMS), "seconds"),
            rows,
            f"Prequential (test-then-train) accuracy over {N_RECORDS:,} records, concept change every "
            f"{DRIFT_EVERY:,} (sea: abrupt; hyperplane: gradual), seed 1; same records, same order. "
            "Needs `pip install -e '.[bench]'` (River).",
        )
    ]


if __name__ == "__main__":
    main()
