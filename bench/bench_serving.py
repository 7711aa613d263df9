"""Predict latency and hot-reload delay of a real `streamlearn serve` process, and V2 (JSON
tensors) against V1 latency for the same batches.

    PYTHONPATH=service python bench/bench_serving.py [v2]   # v2: only the V2 against V1 table
"""

import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson

from common import percentiles, table
from streamlearn.decoding import DecodedBatch
from streamlearn.dev.broker import free_port
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import FeatureSpec, LabelSpec
from streamlearn.snapshots import LocalSnapshotStore, SnapshotStore
from streamlearn.train.checkpoint import snapshot_content
from streamlearn.train.optim import OptimizerSettings, make_optimizer
from streamlearn.train.trainer import Trainer, pick_device

REQUESTS = 2000
RELOADS = 30
V2_LIMIT = 1.2  # V2 JSON p99 over V1's, for the same batch
JSON = {"content-type": "application/json"}
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


def bench_v2_against_v1(base: str) -> str:
    """The same batch as a V1 predict and as a V2 infer with JSON tensors, requests alternating so
    that both see the same machine; p99 is the figure the limit is set on."""
    rows = []
    with httpx.Client(base_url=base, timeout=10) as http:
        for n_instances in (1, 64, 1024):
            x = np.random.default_rng(1).normal(size=(n_instances, 10)).round(4)
            tensor = {"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel()}
            bodies = {  # encoded once: the client's own JSON encoding is not timed
                "/v1/models/default:predict": orjson.dumps({"instances": x.tolist()}),
                "/v2/models/default/infer": orjson.dumps(
                    {"inputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY
                ),
            }
            v1, v2 = _alternate(http, bodies, REQUESTS if n_instances < 1024 else REQUESTS // 4)
            ratio = v2[2] / v1[2]
            cells = [f"{ms:.2f}" for ms in (v1[0], v1[2], v2[0], v2[2])]
            rows.append((n_instances, *cells, f"{ratio:.2f}x", "met" if ratio <= V2_LIMIT else "MISSED"))
    return table(
        "V2 (Open Inference Protocol, JSON tensors) against V1",
        (
            "instances/request",
            "V1 p50 ms",
            "V1 p99 ms",
            "V2 p50 ms",
            "V2 p99 ms",
            "V2/V1 p99",
            f"<= {V2_LIMIT}x",
        ),
        rows,
        "The same batch as V1 instances and as one V2 FP32 tensor (flat JSON data), the two requests "
        "alternating on one sequential keep-alive client; MLP [64, 64], 10 features.",
    )


def _alternate(http: httpx.Client, bodies: dict[str, bytes], count: int) -> list[tuple[float, float, float]]:
    """Percentiles (p50, p95, p99 ms) of each path's latency, its requests taking turns with the others'."""
    samples: dict[str, list[float]] = {path: [] for path in bodies}
    for i in range(50 + count):  # the first 50 rounds warm up
        for path, body in bodies.items():
            started = time.perf_counter()
            response = http.post(path, content=body, headers=JSON)
            if i >= 50:
                samples[path].append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
    return [percentiles(latencies) for latencies in samples.values()]


@contextlib.contextmanager
def serving(root: str) -> Iterator[str]:
    """A `streamlearn serve` process over the snapshots in `root`, once ready; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "streamlearn", "serve", "--snapshot-dir", root, "--port", str(port)]
    server = subprocess.Popen([*command, "--log-level", "warning"])
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
        yield base
    finally:
        server.terminate()
        server.wait(30)


def main(only_v2: bool = False) -> list[str]:
    with tempfile.TemporaryDirectory() as root:
        store, trainer = LocalSnapshotStore(Path(root)), make_trainer()
        save(store, trainer)
        with serving(root) as base:
            if only_v2:
                return [bench_v2_against_v1(base)]
            return [bench_latency(base), bench_v2_against_v1(base), bench_reload(base, store, trainer)]


if __name__ == "__main__":
    main(only_v2=sys.argv[1:] == ["v2"])
