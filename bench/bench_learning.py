"""Learning quality on drifting streams: Streamlearn's trainer against River's online learners.

Every learner sees the same records in the same order and is scored test-then-train: River one
record at a time, Streamlearn one micro-batch at a time (each batch predicted before it is
learned). Streamlearn runs twice:

- the learning core (train/learner.py, as the pipeline drives it) fed micro-batches of 256 with
  time to spare between them, as when the trainer keeps up with a stream;
- the whole trainer (pipeline.py) reading the stream from the embedded broker, produced
  beforehand to a 4-partition topic (record i to partition i mod 4, its timestamp its index):
  a backlog, learned in event-time order with the step policy's choice under load.

Scores per stream: prequential accuracy (MAE for regression), the same over the last concept
(after the last abrupt change; the last quarter where there is none), and the records to recover
after each abrupt change: until the accuracy over the 500 records before is back within 2 points
of its level over the 500 records before the change (for MAE: within 5%).

River's learners are slow (ARF needs minutes per stream) and do not change with our code: their
scores are cached in bench/river_scores.json, keyed by River's version and the streams' records,
and recomputed (on every core) when the key changes or with --river.
"""

import hashlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import river
from prometheus_client import CollectorRegistry
from river import forest, linear_model, preprocessing, tree

from common import table
from learning_streams import DRIFT_EVERY, N_RECORDS, Stream, all_streams
from streamlearn import kafka
from streamlearn.config import TrainSettings
from streamlearn.decoding import DecodedBatch
from streamlearn.dev.broker import EmbeddedBroker
from streamlearn.metrics import TrainerMetrics
from streamlearn.records import FeatureSpec, LabelSpec
from streamlearn.train.learner import Learner
from streamlearn.train.telemetry import Telemetry
from streamlearn.train.trainer import StepResult, Trainer, pick_device

BATCH = 256
RECOVERY_WINDOW = 500
RIVER_CACHE = Path(__file__).with_name("river_scores.json")
BASE_TIMESTAMP_MS = 1_700_000_000_000
PARTITIONS = 4

# Streamlearn configurations scored by the learning core: the default and its main alternatives.
CONFIGS: dict[str, dict[str, Any]] = {
    "Streamlearn default (MLP 64,64, auto steps of 8, boost-lr on drift)": {},
    "Streamlearn default, micro-batches of 32": {"batch": 32},
    "Streamlearn MLP, one step per micro-batch": {"step_policy": "large"},
    "Streamlearn MLP, no drift response": {"on_drift": "none"},
    "Streamlearn MLP, on drift reset-optimizer": {"on_drift": "reset-optimizer"},
    "Streamlearn linear, auto steps": {"arch": "linear"},
}


# -- scoring -----------------------------------------------------------------------------------


def scores(stream: Stream, errors: np.ndarray) -> tuple[float, float, list[int | None]]:
    """Prequential accuracy (or MAE), the same over the last concept, and records to recover."""
    regression = stream.task == "regression"
    value = (lambda e: float(e.mean())) if regression else (lambda e: 1 - float(e.mean()))
    last = stream.drifts[-1] if stream.drifts else 3 * len(errors) // 4
    cumulative = np.concatenate([[0.0], np.cumsum(errors)])
    recoveries: list[int | None] = []
    for i, at in enumerate(stream.drifts):
        end = stream.drifts[i + 1] if i + 1 < len(stream.drifts) else len(errors)
        before = (cumulative[at] - cumulative[at - RECOVERY_WINDOW]) / RECOVERY_WINDOW
        ends = np.arange(at + RECOVERY_WINDOW, end + 1)
        rolling = (cumulative[ends] - cumulative[ends - RECOVERY_WINDOW]) / RECOVERY_WINDOW
        back = rolling <= (before * 1.05 if regression else before + 0.02)
        recoveries.append(int(ends[back.argmax()] - at) if back.any() else None)
    return value(errors), value(errors[last:]), recoveries


def settings_for(stream: Stream, overrides: dict[str, Any], **extra: Any) -> TrainSettings:
    return TrainSettings(
        task=stream.task,
        classes=stream.classes,
        n_features=stream.x.shape[1],
        metrics_port=0,
        dlq_topic="",
        **{**overrides, **extra},
    )


class Recording:
    """Every learned record's prequential error, in the order learned (bench instrumentation)."""

    def __init__(self) -> None:
        self.errors: list[np.ndarray] = []
        self.steps = 0
        self._step = Trainer.step

    def __enter__(self) -> "Recording":
        original = self._step

        def recorded(
            trainer: Trainer, batch: DecodedBatch, pressed: Callable[[], bool] | None = None
        ) -> StepResult:
            result = original(trainer, batch, pressed)
            self.errors.append(result.errors)
            self.steps += result.steps
            return result

        Trainer.step = recorded  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Trainer.step = self._step  # type: ignore[method-assign]

    def per_record(self, task: str) -> np.ndarray:
        errors = np.concatenate(self.errors)
        return np.sqrt(errors) if task == "regression" else errors  # squared error -> absolute


def core_errors(stream: Stream, overrides: dict[str, Any]) -> tuple[np.ndarray, int]:
    """The learning core's per-record errors on the stream, micro-batches of BATCH records.

    `overrides` are trainer settings, and `batch` another micro-batch size.
    """
    overrides = dict(overrides)
    size = overrides.pop("batch", BATCH)
    settings = settings_for(stream, overrides)
    labels = LabelSpec.create(stream.task, stream.classes)
    learner = Learner(settings, labels, pick_device("cpu"), Telemetry(TrainerMetrics(CollectorRegistry())))
    features = FeatureSpec(stream.x.shape[1])
    weights = np.ones(size, np.float32)
    with Recording() as recording:
        for start in range(0, len(stream.y), size):
            x, y = stream.x[start : start + size], stream.y[start : start + size]
            learner.learn(DecodedBatch(x, y, weights[: len(y)]), features)
    return recording.per_record(stream.task), recording.steps


def kafka_errors(
    stream: Stream, bootstrap: str, directory: str, overrides: dict[str, Any] | None = None
) -> tuple[np.ndarray, int, float]:
    """The whole trainer's per-record errors, learning the stream as a 4-partition backlog.

    Also the optimizer steps it took and its records per second from the first record learned.
    """
    from bench_order import make_producer  # one producer configuration for every benchmark
    from streamlearn.train.pipeline import Pipeline

    topic = "learn-" + hashlib.sha1(f"{stream.name} {overrides}".encode()).hexdigest()[:10]
    kafka.ensure_topic(bootstrap, {}, topic, partitions=PARTITIONS)
    producer = make_producer(bootstrap)
    for index, event in enumerate(stream.events()):
        producer.produce(
            topic, orjson.dumps(event), partition=index % PARTITIONS, timestamp=BASE_TIMESTAMP_MS + index
        )
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError(f"{topic}: records left undelivered")
    settings = settings_for(
        stream,
        overrides or {},
        bootstrap=bootstrap,
        topic=topic,
        group=topic,
        snapshot_dir=f"{directory}/{topic}",
    )
    pipeline = Pipeline(settings, TrainerMetrics(CollectorRegistry()))
    with Recording() as recording:
        runner = threading.Thread(target=pipeline.run, daemon=True)
        runner.start()
        deadline = time.monotonic() + 300
        started = None  # from the first record learned: the group join is not learning
        while pipeline.records_learned < len(stream.y):
            if time.monotonic() > deadline or not runner.is_alive():
                raise RuntimeError(f"{stream.name}: {pipeline.records_learned} records learned")
            if started is None and pipeline.records_learned:
                started = time.monotonic()
            time.sleep(0.01)
        seconds = time.monotonic() - (started or deadline)
        pipeline.stop()
        runner.join(60)
    return recording.per_record(stream.task), recording.steps, seconds


# -- River, cached -----------------------------------------------------------------------------


def river_learners(task: str) -> dict[str, Callable[[], Any]]:
    if task == "regression":
        return {
            "River StandardScaler + LinearRegression": lambda: (
                preprocessing.StandardScaler() | linear_model.LinearRegression()
            ),
            "River Hoeffding Adaptive Tree": lambda: (
                preprocessing.StandardScaler() | tree.HoeffdingAdaptiveTreeRegressor(seed=1)
            ),
            "River ARF (10 trees)": lambda: forest.ARFRegressor(n_models=10, seed=1),
        }
    linear = linear_model.LogisticRegression if task == "binary" else linear_model.SoftmaxRegression
    return {
        "River StandardScaler + LogisticRegression": lambda: preprocessing.StandardScaler() | linear(),
        "River Hoeffding Adaptive Tree": lambda: tree.HoeffdingAdaptiveTreeClassifier(seed=1),
        "River ARF (10 trees)": lambda: forest.ARFClassifier(n_models=10, seed=1),
    }


def river_errors(stream: Stream, learner: str) -> np.ndarray:
    model = river_learners(stream.task)[learner]()
    errors = np.zeros(len(stream.y))
    for i, (row, label) in enumerate(zip(stream.x.tolist(), stream.y.tolist(), strict=True)):
        x = dict(enumerate(row))
        y: Any = (
            bool(label) if stream.task == "binary" else int(label) if stream.task == "multiclass" else label
        )
        predicted = model.predict_one(x)
        errors[i] = abs((predicted or 0.0) - y) if stream.task == "regression" else float(predicted != y)
        model.learn_one(x, y)
    return errors


Scores = tuple[float, float, list[int | None]]


def _river_job(args: tuple[int, str]) -> tuple[str, Scores]:
    index, learner = args
    stream = all_streams()[index]
    return f"{stream.name}|{learner}", scores(stream, river_errors(stream, learner))


def river_key(streams: list[Stream]) -> str:
    digest = hashlib.sha256(f"{river.__version__} {N_RECORDS} {DRIFT_EVERY}".encode())
    for stream in streams:
        digest.update(stream.x.tobytes() + stream.y.tobytes())
    return digest.hexdigest()


def river_results(streams: list[Stream], refresh: bool) -> dict[str, Scores]:
    """Each River learner's scores on each stream, by "stream|learner"."""
    key = river_key(streams)
    if not refresh and RIVER_CACHE.exists():
        cached = orjson.loads(RIVER_CACHE.read_bytes())
        if cached["key"] == key:
            return {name: (a, b, list(r)) for name, (a, b, r) in cached["scores"].items()}
    jobs = [(i, name) for i, stream in enumerate(streams) for name in river_learners(stream.task)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        results = dict(pool.map(_river_job, jobs))
    RIVER_CACHE.write_bytes(orjson.dumps({"key": key, "scores": results}, option=orjson.OPT_INDENT_2))
    return results


# -- tables ------------------------------------------------------------------------------------


def _cell(stream: Stream, errors: np.ndarray | Scores) -> tuple[str, str, str]:
    overall, last, recoveries = scores(stream, errors) if isinstance(errors, np.ndarray) else errors
    recovered = ", ".join("never" if r is None else f"{r:,}" for r in recoveries) or "-"
    return f"{overall:.3f}", f"{last:.3f}", recovered


MLP_FRIENDLY = ("Agrawal (River)", "RandomRBFDrift (River, gradual)")


def verdicts(stream: Stream, ours: Scores, linear: Scores, best: float) -> tuple[str, str, str]:
    """The issue's targets on one stream: overall (and against the best River learner where
    MLP-friendly), last concept, recovery after each abrupt change; 'met' or 'missed'."""
    regression = stream.task == "regression"

    def at_least(a: float, b: float, slack: float = 0.0) -> bool:
        return a <= b + slack if regression else a >= b - slack

    overall = at_least(ours[0], linear[0])
    if stream.name in MLP_FRIENDLY:
        overall = overall and at_least(ours[0], best, 0.01)
    recoveries = [o is not None and (r is None or o <= r) for o, r in zip(ours[2], linear[2], strict=True)]
    word = {True: "met", False: "missed"}
    recovery = " ".join(word[ok] for ok in recoveries) or "-"
    return word[overall], word[at_least(ours[1], linear[1])], recovery


def main(refresh_river: bool = False) -> list[str]:
    logging.getLogger("streamlearn").setLevel(logging.ERROR)  # each drift detection logs a warning
    streams = all_streams()
    rivers = river_results(streams, refresh_river)
    core_rows, kafka_rows, target_rows = [], [], []
    with tempfile.TemporaryDirectory() as directory, EmbeddedBroker() as broker:
        for stream in streams:
            for label, overrides in CONFIGS.items():
                errors, steps = core_errors(stream, overrides)
                core_rows.append((stream.name, label, *_cell(stream, errors), f"{steps / len(errors):.3f}"))
            for learner in river_learners(stream.task):
                core_rows.append(
                    (stream.name, learner, *_cell(stream, rivers[f"{stream.name}|{learner}"]), "1")
                )
            small, _, small_seconds = kafka_errors(
                stream, broker.bootstrap, directory, {"step_policy": "small"}
            )
            errors, steps, seconds = kafka_errors(stream, broker.bootstrap, directory)
            linear = next(iter(river_learners(stream.task)))
            best = min if stream.task == "regression" else max
            river_best = best(
                (rivers[f"{stream.name}|{name}"][0], name) for name in river_learners(stream.task)
            )
            linear_scores = rivers[f"{stream.name}|{linear}"]
            target_rows.append(
                (
                    stream.name,
                    *verdicts(stream, scores(stream, errors), linear_scores, river_best[0]),
                    *verdicts(stream, scores(stream, small), linear_scores, river_best[0]),
                )
            )
            kafka_rows.append(
                (
                    stream.name,
                    *_cell(stream, errors),
                    f"{steps / len(errors):.3f}",
                    f"{len(errors) / seconds:,.0f}",
                    _cell(stream, small)[0],
                    f"{len(small) / small_seconds:,.0f}",
                    *_cell(stream, rivers[f"{stream.name}|{linear}"]),
                    f"{river_best[0]:.3f} ({river_best[1].removeprefix('River ')})",
                )
            )
    measure = "accuracy (MAE for regression)"
    return [
        table(
            "Learning quality: the learning core against River",
            ("stream", "learner", measure, "last concept", "records to recover", "steps per record"),
            core_rows,
            f"{N_RECORDS:,} records per synthetic stream (abrupt changes every {DRIFT_EVERY:,} where "
            "listed), test-then-train; Streamlearn in micro-batches of 256 with time to spare. "
            "Needs `pip install -e '.[bench]'` (River).",
        ),
        table(
            "Learning quality through Kafka: a 4-partition backlog",
            (
                "stream",
                measure,
                "last concept",
                "records to recover",
                "steps per record",
                "records/s",
                "--step-policy small",
                "its records/s",
                "River linear",
                "its last concept",
                "its recovery",
                "best River learner",
            ),
            kafka_rows,
            "The default trainer (the whole pipeline, in-process) learning each stream from the "
            "embedded broker, produced beforehand to a 4-partition topic (records/s from the first "
            "record learned); the same with `--step-policy small` (always steps of 8); River's "
            "linear model beside them (the same records, one at a time).",
        ),
        table(
            "Learning quality targets through Kafka",
            (
                "stream",
                "default: accuracy",
                "last concept",
                "recovery per change",
                "small steps: accuracy",
                "last concept",
                "recovery per change",
            ),
            target_rows,
            "Against River's linear model (StandardScaler + LogisticRegression, SoftmaxRegression or "
            "LinearRegression): accuracy at least its own (MAE at most), and within 1 point of the "
            "best River learner on the MLP-friendly Agrawal and RandomRBFDrift; the same over the "
            "last concept; each recovery in no more records than its own.",
        ),
    ]


if __name__ == "__main__":
    main(refresh_river="--river" in sys.argv)
