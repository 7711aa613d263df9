"""Categorical features (issue 17): ingest rate, learning quality against Vowpal Wabbit and River,
and snapshots of a large category table.

1. Ingest: `streamlearn train` processes, as users start them, on two topics of N_INGEST records
   in the embedded broker (4 partitions): 4 numeric and 5 categorical features (cardinalities
   from 10 to 1,000,000, Zipf-distributed), and 9 numeric features (the same width, all
   numbers). Their rates alternate, RUNS each; medians. One more pair of runs learns the
   categorical stream with a 2^20 x 16 table, with snapshots every 2 s and with none, to show
   what writing a 192 MiB snapshot costs the loop.
2. Quality: the `payments` demo stream (per-merchant fraud risk that changes every DRIFT_EVERY
   records), N_QUALITY records, prequential (test-then-train) accuracy and log loss. Streamlearn's
   learning core gets micro-batches of 256; Vowpal Wabbit (logistic loss, 2^18 hashed weights,
   namespaces for the numeric, categorical and tag features) and River (StandardScaler on the
   numbers, OneHotEncoder on the categories, LogisticRegression) learn one record at a time.
3. Snapshots: one step of an MLP with a 2^20 x 16 table (adagrad), then the time the loop
   spends taking a snapshot's tensors, the writer's time, the longest another thread waited for
   Python's lock meanwhile, the loads by a trainer (all) and a server (weights only), and sizes.
"""

import itertools
import math
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from prometheus_client import CollectorRegistry

import bench_ingest as ingest
from common import table
from streamlearn import kafka
from streamlearn.config import TrainSettings
from streamlearn.decoding import RecordDecoder
from streamlearn.dev.broker import EmbeddedBroker, free_port
from streamlearn.dev.streams import records
from streamlearn.metrics import TrainerMetrics
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import FeatureSpec, LabelSpec, feature_kinds
from streamlearn.snapshots import LocalSnapshotStore
from streamlearn.train.checkpoint import snapshot_content
from streamlearn.train.learner import Learner
from streamlearn.train.optim import OptimizerSettings, make_optimizer
from streamlearn.train.telemetry import Telemetry
from streamlearn.train.trainer import Trainer

N_INGEST = 300_000
RUNS = 2
CARDINALITIES = (10, 1_000, 10_000, 100_000, 1_000_000)  # the five categorical features
ZIPF = 1.2
N_QUALITY = 40_000
DRIFT_EVERY = 10_000
BATCH = 256
BIG_TABLE = ("--hash-buckets", str(2**20), "--embedding-dim", "16")
SNAPSHOT_REPEATS = 3
SEED = 17


# -- 1. ingest ---------------------------------------------------------------------------------------


def ingest_values(n: int, categorical: bool) -> Iterator[bytes]:
    """label = a hyperplane over 9 inputs; with `categorical`, 5 of them are a category's value."""
    rng = np.random.default_rng(SEED)
    weights = rng.uniform(-1, 1, 9)
    effects = [rng.normal(size=min(c, 10_000)) for c in CARDINALITIES]  # a category's numeric value
    ts = int(time.time() * 1000)
    for start in range(0, n, 10_000):
        size = min(10_000, n - start)
        x = rng.uniform(0, 1, (size, 9)).round(4)
        ids = [(rng.zipf(ZIPF, size) - 1) % c for c in CARDINALITIES]
        if categorical:
            for f, column in enumerate(ids):
                x[:, 4 + f] = effects[f][column % len(effects[f])]
        labels = (x @ weights >= 0).astype(int).tolist()
        for i in range(size):
            if categorical:
                features: dict[str, Any] = {f"x{j}": float(x[i, j]) for j in range(4)}
                features |= {f"c{f}": f"v{ids[f][i]}" for f in range(5)}
            else:
                features = {f"x{j}": float(x[i, j]) for j in range(9)}
            yield orjson.dumps({"features": features, "label": labels[i], "ts": ts + start + i})


def ingest_rates() -> tuple[dict[str, list[float]], dict[str, int]]:
    runs: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    with EmbeddedBroker(port=free_port()) as broker, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, categorical in (("numeric", False), ("categorical", True)):
            kafka.ensure_topic(broker.bootstrap, {}, name, partitions=ingest.PARTITIONS)
            _, size = ingest.produce(broker.bootstrap, name, N_INGEST, ingest_values(N_INGEST, categorical))
            sizes[name] = size // N_INGEST
        plan = [
            ("9 numeric", "numeric", ()),
            ("4 numeric + 5 categorical", "categorical", ()),
            ("4 numeric + 5 categorical, 2^20 x 16 table", "categorical", BIG_TABLE),
            (
                "4 numeric + 5 categorical, 2^20 x 16 table, no snapshots",
                "categorical",
                (*BIG_TABLE, "--snapshot-interval-s", "3600"),
            ),
        ]
        for run in range(RUNS):
            for index, (label, topic, extra) in enumerate(plan if run % 2 == 0 else reversed(plan)):
                port = free_port()
                snapshots = str(root / f"snapshots-{run}-{index}")  # a fresh model each run
                command = ingest.streamlearn_command() + ingest.train_args(
                    broker.bootstrap, topic, snapshots, port, extra
                )
                log = root / f"trainer-{run}-{index}.log"
                result = ingest.run_trainer(command, port, log, N_INGEST, label)
                runs.setdefault(label, []).append(result.rate)
    return runs, sizes


# -- 2. quality --------------------------------------------------------------------------------------


def payments() -> list[dict[str, Any]]:
    return list(itertools.islice(records("payments", seed=SEED, drift_every=DRIFT_EVERY), N_QUALITY))


def log_loss(p: float, y: bool) -> float:
    p = min(max(p, 1e-15), 1 - 1e-15)
    return -math.log(p if y else 1 - p)


def streamlearn_scores(events: list[dict[str, Any]], arch: str) -> tuple[float, float]:
    settings = TrainSettings(task="binary", metrics_port=0, dlq_topic="", arch=arch)
    labels = LabelSpec.create("binary")
    decoder = RecordDecoder(labels, None, 100_000, feature_kinds(settings))
    learner = Learner(settings, labels, torch.device("cpu"), Telemetry(TrainerMetrics(CollectorRegistry())))
    values = [orjson.dumps(e) for e in events]
    for start in range(0, len(values), BATCH):
        batch = decoder.decode(values[start : start + BATCH])
        assert not batch.rejected and decoder.features is not None
        learner.learn(batch, decoder.features)
    assert learner.trainer is not None
    scores = learner.trainer.scores
    return scores.accuracy, scores.mean_loss


def vw_line(event: dict[str, Any]) -> str:
    f = event["features"]
    label = "1" if event["label"] else "-1"
    tags = " ".join(f["tags"])
    return (
        f"{label} |n amount:{f['amount']} hour:{f['hour']} "
        f"|c merchant={f['merchant']} country={f['country']} device={f['device']} |t {tags}"
    )


def vw_scores(events: list[dict[str, Any]]) -> tuple[float, float]:
    from vowpalwabbit import Workspace

    vw = Workspace("--loss_function logistic --link logistic -b 18 --quiet")
    correct, loss = 0, 0.0
    for event in events:
        example = vw_line(event)
        p = float(vw.predict(example))
        correct += (p > 0.5) == event["label"]
        loss += log_loss(p, event["label"])
        vw.learn(example)
    vw.finish()
    return correct / len(events), loss / len(events)


def river_scores(events: list[dict[str, Any]]) -> tuple[float, float]:
    from river import compose, linear_model, preprocessing

    model = (
        (compose.Select("amount", "hour") | preprocessing.StandardScaler())
        + (compose.Select("merchant", "country", "device", "tags") | preprocessing.OneHotEncoder())
    ) | linear_model.LogisticRegression()
    correct, loss = 0, 0.0
    for event in events:
        x, y = event["features"], event["label"]
        p = model.predict_proba_one(x).get(True, 0.5)
        correct += (p > 0.5) == y
        loss += log_loss(p, y)
        model.learn_one(x, y)
    return correct / len(events), loss / len(events)


# -- 3. snapshots ------------------------------------------------------------------------------------


def snapshot_figures() -> list[tuple[str, str]]:
    torch.set_num_threads(1)
    spec = ModelSpec(
        LabelSpec.create("binary"),
        FeatureSpec(1, ("x",), ("id",), hash_buckets=2**20, embedding_dim=16),
        "mlp",
        {"hidden": [64, 64]},
    )
    model = build_model(spec)
    trainer = Trainer(model, make_optimizer(model, OptimizerSettings()), torch.device("cpu"), policy="large")
    decoder = RecordDecoder(LabelSpec.create("binary"), spec.features)
    batch = decoder.decode(
        [orjson.dumps({"features": {"x": 1.0, "id": f"u{k}"}, "label": 1}) for k in range(256)]
    )
    trainer.step(batch)  # the optimizers' state now exists for the whole table
    gaps: list[float] = []
    stop = threading.Event()

    def ticker() -> None:  # another thread, as the loop is: how long must it wait for the GIL?
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    taking, writing, waits, loading_all, loading_weights = [], [], [], [], []
    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        with tempfile.TemporaryDirectory() as directory:
            store = LocalSnapshotStore(directory)
            for _ in range(SNAPSHOT_REPEATS):
                started = time.perf_counter()
                tensors, content = snapshot_content(trainer, 1, {}, {})
                taken = time.perf_counter()
                gaps.clear()
                snapshot = store.save("m", tensors, content)
                written = time.perf_counter()
                waits.append(max(gaps, default=0.0))
                store.load("m", snapshot.version)
                loaded = time.perf_counter()
                store.load("m", snapshot.version, training=False)
                taking.append(taken - started)
                writing.append(written - taken)
                loading_all.append(loaded - written)
                loading_weights.append(time.perf_counter() - loaded)
    finally:
        stop.set()
        thread.join()
    meta = snapshot.meta
    ms = lambda samples: f"{statistics.median(samples) * 1000:,.0f} ms"  # noqa: E731
    return [
        ("weights.safetensors (model: table, layers, normalizer)", f"{meta.weights_bytes / 2**20:,.0f} MiB"),
        (
            "training.safetensors (the table's adagrad sums, the layers' Adam moments)",
            f"{(meta.training_bytes or 0) / 2**20:,.0f} MiB",
        ),
        ("taking the tensors, on the loop (copy and finite check)", ms(taking)),
        ("writing, on the writer thread (serialize, SHA-256, fsync, rename)", ms(writing)),
        ("longest wait of another thread for the GIL while writing", ms(waits)),
        ("loading, trainer (both files, checked)", ms(loading_all)),
        ("loading, server (weights only, checked)", ms(loading_weights)),
    ]


def main() -> list[str]:
    events = payments()
    fraud = np.mean([e["label"] for e in events])
    quality = [
        ("Streamlearn MLP (default: wide and deep, 64,64, 8)", *streamlearn_scores(events, "mlp")),
        ("Streamlearn linear (hashed one-hot)", *streamlearn_scores(events, "linear")),
        ("Vowpal Wabbit (logistic, -b 18)", *vw_scores(events)),
        ("River OneHotEncoder + LogisticRegression", *river_scores(events)),
    ]
    vw_loss = quality[2][2]
    quality_rows = [
        (name, f"{accuracy:.4f}", f"{loss:.4f}", "" if name.startswith(("Vowpal", "River")) else
         ("met" if loss <= vw_loss else "missed") if "MLP" in name else "")
        for name, accuracy, loss in quality
    ]  # fmt: skip
    runs, sizes = ingest_rates()
    numeric = statistics.median(runs["9 numeric"])
    ingest_rows = []
    for label, rates in runs.items():
        ratio = statistics.median(rates) / numeric
        target = ">= 0.5" if label == "4 numeric + 5 categorical" else ""
        verdict = ("met" if ratio >= 0.5 else "missed") if target else ""
        shown = ", ".join(f"{r:,.0f}" for r in rates)
        ingest_rows.append(
            (label, f"{statistics.median(rates):,.0f}", shown, f"{ratio:.2f}", target, verdict)
        )
    snapshot_rows = snapshot_figures()
    return [
        table(
            "Categorical features: ingest",
            ("stream", "records/s (median)", "runs", "ratio to numeric", "target", ""),
            ingest_rows,
            f"{N_INGEST:,} records per topic in 4 partitions of the embedded broker; `streamlearn train` "
            "with its defaults (MLP 64,64, embeddings of 8, 2^18 rows), each run in a fresh group; "
            f"rates from the first record learned to the last, {RUNS} alternating runs. The categorical "
            f"features have {', '.join(f'{c:,}' for c in CARDINALITIES)} values, Zipf({ZIPF}); "
            f"values of {sizes['numeric']} and {sizes['categorical']} bytes of JSON.",
        ),
        table(
            "Categorical features: learning quality",
            ("learner", "prequential accuracy", "prequential log loss", "target (log loss <= VW's)"),
            quality_rows,
            f"The `payments` demo stream (seed {SEED}): {N_QUALITY:,} records, a third of the merchants "
            f"changing their fraud risk every {DRIFT_EVERY:,}; {fraud:.1%} fraud. Every learner is "
            f"scored test-then-train on the same records in the same order; Streamlearn's learning "
            f"core in micro-batches of {BATCH} (each predicted before it is learned).",
        ),
        table(
            "Categorical features: snapshots of a 2^20 x 16 table",
            ("what", "figure"),
            snapshot_rows,
            "An MLP (64,64) with one categorical feature in 2^20 rows of 16 embedding numbers and "
            "the wide part's weight (68 MiB), after one step (adagrad on the table); medians of "
            f"{SNAPSHOT_REPEATS} snapshots to a local directory.",
        ),
    ]


if __name__ == "__main__":
    main()
