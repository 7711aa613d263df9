"""Predict latency and hot-reload delay of a real `streamlearn serve` process."""

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from common import percentiles, table
from streamlearn.dev.broker import free_port
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import DecodedBatch, FeatureSpec, LabelSpec
from streamlearn.snapshots import LocalSnapshotStore, SnapshotStore
from streamlearn.train.checkpoint import snapshot_content
from streamlearn.train.optim import OptimizerSettings, make_optimizer
from streamlearn.train.trainer import Trainer, pick_device

REQUESTS = 2000
RELOADS = 30
SPEC = ModelSpec(LabelSpec.create("binary"), FeatureSpec(10), "mlp", {"hidden": [64, 64]})


def make_trainer() -> Trainer:
    model = build_model(SPEC)
    trainer = Trainer(model, make_optimizer(model, OptimizerSettings("adam", 0.005)), pick_device("cpu"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 10)).astype(np.float32)
    trainer.step(DecodedBatch(x, (x[:, 0] > 0).astype(np.float32), np.ones(256, np.float32)))
    return trainer


def save(store: SnapshotStore, trainer: Trainer) -> int:
    tensors, meta = snapshot_content(trainer, 256, {}, {})
    return store.save("default", tensors, meta).version


def bench_latency(base: str) -> str:
    rows = []
    with httpx.Client(base_url=base, timeout=10) as http:
        for n_instances in (1, 64, 1024):
            body = {"instances": np.random.default_rng(1).normal(size=(n_instances, 10)).round(4).tolist()}
            for _ in range(50):  # warm up
                http.post("/v1/models/default:predict", json=body)
            samples = []
            for _ in range(REQUESTS if n_instances < 1024 else REQUESTS // 4):
                started = time.perf_counter()
                response = http.post("/v1/models/default:predict", json=body)
                samples.append(time.perf_counter() - started)
                assert response.status_code == 200
            p50, p95, p99 = percentiles(samples)
            rows.append(
                (
                    n_instances,
                    f"{p50:.2f}",
                    f"{p95:.2f}",
                    f"{p99:.2f}",
                    f"{1 / statistics.mean(samples):,.0f}",
                )
            )
    return table(
        "Predict latency",
        ("instances/request", "p50 ms", "p95 ms", "p99 ms", "requests/s (1 client)"),
        rows,
        "One sequential keep-alive client on loopback; MLP [64, 64], 10 features; one uvicorn worker.",
    )


def bench_reload(base: str, store: SnapshotStore, trainer: Trainer) -> str:
    delays = []
    with httpx.Client(base_url=base, timeout=10) as http:
        for _ in range(RELOADS):
            version = save(store, trainer)
            written = time.perf_counter()
            while http.get("/v1/models/default").json()["version"] != version:
                time.sleep(0.002)
            delays.append(time.perf_counter() - written)
    p50, p95, _ = percentiles(delays)
    return table(
        "Hot reload",
        ("snapshots", "p50 ms", "p95 ms", "max ms"),
        [(RELOADS, f"{p50:.0f}", f"{p95:.0f}", f"{max(delays) * 1000:.0f}")],
        "From a snapshot's rename into place to the server answering with its version "
        "(default --reload-interval-s 0.2).",
    )


def main() -> list[str]:
    with tempfile.TemporaryDirectory() as root:
        store, trainer = LocalSnapshotStore(Path(root)), make_trainer()
        save(store, trainer)
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlearn",
                "serve",
                "--snapshot-dir",
                root,
                "--port",
                str(port),
                "--log-level",
                "warning",
            ]
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(base + "/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            return [bench_latency(base), bench_reload(base, store, trainer)]
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
