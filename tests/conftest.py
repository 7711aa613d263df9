"""Factory fixtures shared by the unit tests."""

from collections.abc import Callable

import numpy as np
import pytest

from streamlearn.models import ModelSpec, build_model
from streamlearn.records import DecodedBatch, FeatureSpec, LabelSpec
from streamlearn.trainer import Trainer, make_optimizer, pick_device


def make_spec(task: str = "binary", n_features: int = 3, arch: str = "linear", **labels) -> ModelSpec:
    if task == "multiclass" and not labels:
        labels = {"num_classes": 3}
    label_spec = LabelSpec.create(task, **labels)
    return ModelSpec(label_spec, FeatureSpec(n_features), arch=arch, hidden=(16,))


def concept_batch(n: int, task: str = "binary", n_features: int = 3, seed: int = 0) -> DecodedBatch:
    """A learnable concept: a fixed linear rule on standard-normal features (scaled and shifted)."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n, n_features))
    score = raw @ np.linspace(1.0, -1.0, n_features)
    if task == "regression":
        labels = (3 * score + 1).astype(np.float32)
    elif task == "binary":
        labels = (score > 0).astype(np.float32)
    else:
        labels = np.digitize(score, [-0.5, 0.5]).astype(np.int64)
    features = (raw * 10 + 100).astype(np.float32)  # far from standardized: the normalizer must work
    return DecodedBatch(features, labels, np.ones(n, dtype=np.float32))


@pytest.fixture
def make_trainer() -> Callable[..., Trainer]:
    def factory(
        task: str = "binary", arch: str = "linear", lr: float = 0.05, optimizer: str = "adam", **kw
    ) -> Trainer:
        model = build_model(make_spec(task, arch=arch))
        return Trainer(model, make_optimizer(optimizer, model, lr), pick_device("cpu"), **kw)

    return factory


def write_snapshot(store, name: str, trainer: Trainer, records: int = 0, offsets=None):
    """Write a snapshot exactly as the pipeline does."""
    from streamlearn.pipeline import snapshot_content

    tensors, meta = snapshot_content(trainer, records, offsets or {}, {"test": True})
    return store.save(name, tensors, meta)


def wait_for(condition, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition"):
    """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)
