"""Int8 serving (`streamlearn serve --quantize int8`) against float: predict latency and accuracy.

Each MLP over 64 features learns a binary stream through the trainer, is written as a snapshot
and loaded as the server loads it, float and int8 (ServedModel.from_snapshot); predicts go
through the data plane's predict_finite with one torch thread, as `streamlearn serve` runs them.
The demo streams have at most 10 features, so the stream is made here: standard-normal features
(scaled and shifted, for the normalizer) labelled by a fixed random tanh network, with label
noise. Held-out records come from the same stream.
"""

import io
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import table
from streamlearn.decoding import DecodedBatch
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import FeatureSpec, LabelSpec
from streamlearn.serve.dataplane import predict_finite
from streamlearn.serve.registry import ServedModel
from streamlearn.snapshots import LocalSnapshotStore
from streamlearn.train.checkpoint import snapshot_content
from streamlearn.train.optim import OptimizerSettings, make_optimizer
from streamlearn.train.trainer import Trainer, pick_device

N_FEATURES = 64
WIDTHS = ([64, 64], [512, 512], [1024, 1024])
TRAIN_RECORDS = 30_000
HELD_OUT = 5_000
BATCH = 256  # records per training step, and instances per predict in the accuracy table
PREDICTS = {1: 2000, 256: 300}  # timed predicts per instance count, per variant
ROUNDS = 10  # float and int8 alternate in rounds, so a busy moment hits both


def stream(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n records of the binary stream: float32 features and 0/1 labels."""
    teacher = np.random.default_rng(7)  # the concept: the same for every seed
    w_in, w_out = teacher.normal(size=(N_FEATURES, 32)) / np.sqrt(N_FEATURES), teacher.normal(size=32)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_FEATURES))
    positive = 1 / (1 + np.exp(-3 * (np.tanh(2 * x @ w_in) @ w_out)))
    return (5 * x + 50).astype(np.float32), (rng.random(n) < positive).astype(np.float32)


def served_both_ways(root: Path, hidden: list[int]) -> tuple[ServedModel, ServedModel]:
    """A trained MLP's snapshot, loaded as float and as int8."""
    model = build_model(
        ModelSpec(LabelSpec.create("binary"), FeatureSpec(N_FEATURES), "mlp", {"hidden": hidden})
    )
    trainer = Trainer(model, make_optimizer(model, OptimizerSettings("adam", 0.001)), pick_device("cpu"))
    x, y = stream(TRAIN_RECORDS, seed=1)
    for start in range(0, TRAIN_RECORDS, BATCH):
        part = slice(start, start + BATCH)
        trainer.step(DecodedBatch(x[part], y[part], np.ones(len(y[part]), np.float32)))
    store = LocalSnapshotStore(root)
    tensors, meta = snapshot_content(trainer, TRAIN_RECORDS, {}, {})
    version = store.save("m", tensors, meta).version
    loaded = [
        ServedModel.from_snapshot(store.load("m", version, training=False), q) for q in ("none", "int8")
    ]
    return loaded[0], loaded[1]


def every_layer_int8(served: ServedModel) -> ServedModel:
    """The float model with its input and output layers quantized too (what --quantize leaves out)."""
    model = build_model(served.model.spec)
    model.load_state(served.model.state())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation (serve/quantize.py)
        torch.ao.quantization.quantize_dynamic(
            model.layers.eval(), {nn.Linear}, dtype=torch.qint8, inplace=True
        )
    return ServedModel(served.name, served.version, model.eval(), served.meta)


def weights_kib(served: ServedModel) -> float:
    buffer = io.BytesIO()
    torch.save(served.model.layers.state_dict(), buffer)
    return buffer.tell() / 1024


def latencies_ms(models: dict[str, ServedModel], n_instances: int) -> dict[str, float]:
    """Median milliseconds per predict of `n_instances`, per model."""
    x = torch.from_numpy(stream(n_instances, seed=3)[0])
    samples: dict[str, list[float]] = {name: [] for name in models}
    for served in models.values():
        for _ in range(20):  # warm up
            predict_finite(served, x)
    for _ in range(ROUNDS):
        for name, served in models.items():
            for _ in range(PREDICTS[n_instances] // ROUNDS):
                started = time.perf_counter()
                predict_finite(served, x)
                samples[name].append(time.perf_counter() - started)
    return {name: float(np.median(times)) * 1000 for name, times in samples.items()}


def positives(served: ServedModel, per_predict: int) -> np.ndarray:
    """The held-out records' probabilities of the positive class, `per_predict` instances at a time."""
    x = torch.from_numpy(stream(HELD_OUT, seed=2)[0])
    parts = [predict_finite(served, x[i : i + per_predict]) for i in range(0, HELD_OUT, per_predict)]
    return np.concatenate([part.probabilities[:, 1].numpy() for part in parts])  # type: ignore[index]


def quality(served: ServedModel, baseline: np.ndarray, per_predict: int) -> tuple[str, ...]:
    """Log loss, accuracy, and the probabilities' distance and class agreement with `baseline`."""
    y = stream(HELD_OUT, seed=2)[1]
    positive = positives(served, per_predict)
    clipped = np.clip(positive, 1e-7, 1 - 1e-7)
    log_loss = -np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))
    difference = np.abs(positive - baseline)
    return (
        f"{log_loss:.4f}",
        f"{np.mean((positive > 0.5) == y):.4f}",
        f"{difference.max():.3f}",
        f"{difference.mean():.4f}",
        f"{np.mean((positive > 0.5) == (baseline > 0.5)):.2%}",
    )


def cpu_int8_instructions() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    found = [name for name in ("avx512_vnni", "avx_vnni", "amx_int8") if name in flags]
    return ", ".join(found) if found else "none (AVX2 only)" if "avx2" in flags else "none"


def main() -> list[str]:
    speed_rows, quality_rows = [], []
    threads = torch.get_num_threads()
    for hidden in WIDTHS:
        with tempfile.TemporaryDirectory() as root:
            float_model, int8_model = served_both_ways(Path(root), hidden)
        label = f"mlp {hidden}"
        weights = f"{weights_kib(float_model):,.0f} / {weights_kib(int8_model):,.0f}"
        torch.set_num_threads(1)  # as `streamlearn serve` runs (--torch-threads 1)
        try:
            for n_instances in PREDICTS:
                ms = latencies_ms({"float": float_model, "int8": int8_model}, n_instances)
                ratio = ms["float"] / ms["int8"]
                speed_rows.append(
                    (label, weights, n_instances, f"{ms['float']:.3f}", f"{ms['int8']:.3f}", f"{ratio:.2f}x")
                )
            baseline = positives(float_model, BATCH)
            quality_rows.append((label, "float", *quality(float_model, baseline, BATCH)))
            quality_rows.append((label, f"int8, {BATCH} per predict", *quality(int8_model, baseline, BATCH)))
            quality_rows.append((label, "int8, 1 per predict", *quality(int8_model, baseline, 1)))
            every = every_layer_int8(float_model)
            quality_rows.append((label, "every layer int8 (not served)", *quality(every, baseline, BATCH)))
        finally:
            torch.set_num_threads(threads)
    engine = torch.backends.quantized.engine
    return [
        table(
            "Quantized serving: predict latency",
            (
                "model",
                "layer weights KiB float / int8",
                "instances",
                "float p50 ms",
                "int8 p50 ms",
                "speed-up",
            ),
            speed_rows,
            f"`--quantize int8` against float: {N_FEATURES} features, one torch thread, the data plane's "
            f"predict (predict_finite) without HTTP; {PREDICTS[1]} predicts of 1 instance and "
            f"{PREDICTS[256]} of 256 per variant, alternating. Quantized engine {engine}; the CPU's int8 "
            f"dot-product instructions: {cpu_int8_instructions()}.",
        ),
        table(
            "Quantized serving: accuracy",
            (
                "model",
                "served as",
                "log loss",
                "accuracy",
                "max abs. prob. change",
                "mean abs. prob. change",
                "same class",
            ),
            quality_rows,
            f"{TRAIN_RECORDS:,} records learned (batches of {BATCH}), {HELD_OUT:,} held-out records of the "
            "same binary stream (a random tanh network over 64 features, with label noise). Changes are "
            "against the float model's probabilities. int8 quantizes each predict's activations from that "
            "predict's range, hence two int8 rows; the last row quantizes the input and output layers too.",
        ),
    ]


if __name__ == "__main__":
    main()
