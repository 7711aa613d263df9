"""Snapshot store latency: a save (what the trainer's background writer does), the newest-version
lookup (what each server poll does) and a load (a hot reload), in a directory and in S3.

The S3 figures are against moto's server on loopback: they show the protocol's round trips
(a save is two PUTs, a LIST and a prune; a poll is a LIST), not a real object store's latency,
which adds some tens of milliseconds per request.
"""

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import fsspec
import torch

from common import percentiles, table
from streamlearn.dev.broker import free_port
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import FeatureSpec, LabelSpec
from streamlearn.snapshots import SnapshotContent, SnapshotStore, open_store

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


def main() -> list[str]:
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
        )
    ]


if __name__ == "__main__":
    main()
