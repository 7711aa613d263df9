"""Decode and train-step throughput on the CPU, without Kafka: the trainer's ceiling."""

import itertools
import time

import orjson

from common import table
from streamlearn.decoding import RecordDecoder
from streamlearn.dev.streams import records
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import FeatureSpec, LabelSpec
from streamlearn.train.optim import OptimizerSettings, make_optimizer
from streamlearn.train.trainer import Trainer, pick_device

N_RECORDS = 50_000
BATCH_SIZES = (64, 256, 1024)
ARCHS = (("linear", ()), ("mlp", (64, 64)))


def values(stream: str, n: int) -> list[bytes]:
    return [orjson.dumps(r) for r in itertools.islice(records(stream, seed=0), n)]


def bench_decode() -> str:
    rows = []
    for stream, task in (("sea", "binary"), ("hyperplane", "binary"), ("blobs", "multiclass")):
        data = values(stream, N_RECORDS)
        labels = LabelSpec.create(task, ("red", "green", "blue") if task == "multiclass" else ())
        decoder = RecordDecoder(labels)
        started = time.perf_counter()
        for start in range(0, len(data), 256):
            decoder.decode(data[start : start + 256])
        elapsed = time.perf_counter() - started
        rows.append((stream, decoder.features.n_features, f"{len(data) / elapsed:,.0f}"))
    return table(
        "Decoding",
        ("stream", "features", "records/s"),
        rows,
        "JSON bytes to float32 arrays, 256-record batches.",
    )


def bench_steps() -> str:
    data = values("hyperplane", N_RECORDS)
    decoder = RecordDecoder(LabelSpec.create("binary"))
    rows = []
    for (arch, hidden), batch_size in itertools.product(ARCHS, BATCH_SIZES):
        batches = [decoder.decode(data[i : i + batch_size]) for i in range(0, len(data), batch_size)]
        spec = ModelSpec(
            LabelSpec.create("binary"),
            FeatureSpec(10),
            arch,
            {"hidden": list(hidden)} if arch == "mlp" else {},
        )
        model = build_model(spec)
        trainer = Trainer(model, make_optimizer(model, OptimizerSettings("adam", 0.005)), pick_device("cpu"))
        started = time.perf_counter()
        for batch in batches:
            trainer.step(batch)
        elapsed = time.perf_counter() - started
        rows.append((arch + (f" {list(hidden)}" if hidden else ""), batch_size,
                     f"{elapsed / len(batches) * 1000:.2f}", f"{N_RECORDS / elapsed:,.0f}"))  # fmt: skip
    return table(
        "Test-then-train steps",
        ("model", "batch", "ms/batch", "records/s"),
        rows,
        "One prequential predict plus one Adam step per micro-batch; hyperplane stream, 10 features, CPU.",
    )


def main() -> list[str]:
    return [bench_decode(), bench_steps()]


if __name__ == "__main__":
    main()
