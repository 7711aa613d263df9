"""Snapshot store latency: a save (what the trainer's background writer does), the newest-version
lookup (what each server poll does) and a load (a hot reload), in a directory and in S3; and what
taking a snapshot costs the training loop itself.

The S3 figures are against moto's server on loopback: they show the protocol's round trips
(a save is a LIST, three PUTs: the version's claim, its weights and its meta.json, and a prune;
a poll is a LIST), not a real object store's latency, which adds some tens of milliseconds per
request.
"""

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import fsspec
import numpy as np
import torch
from prometheus_client import CollectorRegistry

from common import percentiles, table
from streamlearn.config import TrainSettings
from streamlearn.decoding import DecodedBatch
from streamlearn.dev.broker import free_port
from streamlearn.metrics import TrainerMetrics
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import FeatureSpec, LabelSpec
from streamlearn.snapshots import SnapshotContent, SnapshotStore, open_store
from streamlearn.train.checkpoint import Checkpointer
from streamlearn.train.learner import Learner
from streamlearn.train.partitions import Partitions
from streamlearn.train.telemetry import Telemetry

REPEATS = 30
MODELS = (("mlp [64, 64], 10 features", 10, (64, 64)), ("mlp [1024, 1024], 256 features", 256, (1024, 1024)))


def model_tensors(n_features: int, hidden: tuple[int, ...]) -> dict[str, torch.Tensor]:
    model = build_model(
        ModelSpec(LabelSpec.create("binary"), FeatureSpec(n_features), "mlp", {"hidden": list(hidden)})
    )
    return {f"model.{name}": tensor for name, tensor in model.state_dict().items()}


def timed(call, repeats: int = REPEATS) -> tuple[float, float, float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def measure(store: SnapshotStore, tensors: dict[str, torch.Tensor]) -> list[str]:
    save = timed(lambda: store.save("m", tensors, SnapshotContent(records_trained=0)))
    latest = timed(lambda: store.latest_version("m"))
    load = timed(lambda: store.load_latest("m"))
    return [
        f"{save[0]:.1f} / {save[2]:.1f}",
        f"{latest[0]:.1f} / {latest[2]:.1f}",
        f"{load[0]:.1f} / {load[2]:.1f}",
    ]


def start_s3() -> subprocess.Popen:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(
        AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            return server
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


LOOP_STEPS, SNAPSHOT_EVERY = 200, 10  # micro-batches of 256, and one snapshot per this many


def loop_cost(n_features: int, hidden: tuple[int, ...], root: str) -> list[str]:
    """Train steps with and without a snapshot being written, and the snapshot's cost on the loop."""
    settings = TrainSettings(task="binary", topic="t", hidden=hidden, snapshot_dir=root)
    metrics = TrainerMetrics(CollectorRegistry())
    labels = LabelSpec.create("binary")
    learner = Learner(settings, labels, torch.device("cpu"), Telemetry(metrics))
    checkpoints = Checkpointer(open_store(root), "m", metrics, Partitions(), learner.content, interval_s=0.0)
    rng = np.random.default_rng(0)
    features = FeatureSpec(n_features)

    def batch() -> DecodedBatch:
        x = rng.normal(size=(256, n_features)).astype(np.float32)
        return DecodedBatch(x, (x[:, 0] > 0).astype(np.float32), np.ones(256, np.float32))

    quiet, writing, capture = [], [], []
    for step in range(LOOP_STEPS):
        in_flight = checkpoints.pending is not None and not checkpoints.pending.future.done()
        started = time.perf_counter()
        learner.learn(batch(), features)
        (writing if in_flight else quiet).append(time.perf_counter() - started)
        checkpoints.dirty = True
        if step % SNAPSHOT_EVERY == 0:
            started = time.perf_counter()
            checkpoints.commit(None)  # commits the last write, starts the next one: the loop's share
            capture.append(time.perf_counter() - started)
    checkpoints.commit(None, force=True)
    checkpoints.close()
    (q50, _, _), (w50, _, _), (c50, _, c99) = (
        percentiles(quiet),
        percentiles(writing or [0.0]),
        percentiles(capture),
    )
    return [f"{q50:.1f}", f"{w50:.1f}" if writing else "-", f"{c50:.1f} / {c99:.1f}"]


def main() -> list[str]:
    loop_rows = []
    for label, n_features, hidden in MODELS:
        with tempfile.TemporaryDirectory() as root:
            loop_rows.append([label, *loop_cost(n_features, hidden, root)])
    server = start_s3()
    rows = []
    try:
        for label, n_features, hidden in MODELS:
            tensors = model_tensors(n_features, hidden)
            size_kb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1024
            with tempfile.TemporaryDirectory() as root:
                rows.append([label, f"{size_kb:,.0f}", "directory", *measure(open_store(root), tensors)])
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
            rows.append(
                [label, f"{size_kb:,.0f}", "S3 (moto)", *measure(open_store(f"s3://{bucket}/s"), tensors)]
            )
    finally:
        server.terminate()
        server.wait(10)
    return [
        table(
            "Snapshot stores",
            ("model", "weights KiB", "store", "save ms", "newest-version lookup ms", "load ms"),
            rows,
            f"Each cell: p50 / p99 of {REPEATS} repetitions, keeping the default 10 versions. A save is "
            "what the trainer's background writer does every --snapshot-interval-s; the lookup is one server "
            "poll; a load is one hot reload. S3 is moto's server on loopback: its round trips, "
            "not a real store's network latency.",
        ),
        table(
            "What a snapshot costs the training loop",
            (
                "model",
                "train step p50 ms",
                "step p50 ms while a snapshot is written",
                "snapshot on the loop p50 / p99 ms",
            ),
            loop_rows,
            f"{LOOP_STEPS} micro-batches of 256 through the trainer's Learner, one snapshot (into a "
            f"directory) started every {SNAPSHOT_EVERY}. The loop only copies the tensors and hands them "
            "to the background writer; serialising, fsync and rename happen there.",
        ),
    ]


if __name__ == "__main__":
    main()
