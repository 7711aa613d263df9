"""Test-then-train on micro-batches: prequential scores, learning, and numerical safety."""

import math

import numpy as np
import pytest
import torch

from streamlearn.decoding import DecodedBatch
from streamlearn.errors import ConfigError
from streamlearn.train.trainer import pick_device

from .conftest import concept_batch


def split(batch: DecodedBatch, size: int):
    for start in range(0, len(batch), size):
        end = start + size
        yield DecodedBatch(batch.features[start:end], batch.labels[start:end], batch.weights[start:end])


def test_prequential_loss_is_measured_before_the_model_learns_the_batch(make_trainer):
    trainer = make_trainer("binary")
    batch = concept_batch(64)
    x, y, w = (torch.from_numpy(a) for a in (batch.features, batch.labels, batch.weights))
    with torch.no_grad():
        expected = trainer.model.loss(trainer.model(x), y, w).item()
    result = trainer.step(batch)
    assert result.loss == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        after = trainer.model.loss(trainer.model(x), y, w).item()
    assert after < expected  # it did learn from the batch, after scoring it


@pytest.mark.parametrize(("task", "bar"), [("binary", 0.9), ("multiclass", 0.85)])
def test_classifiers_learn_a_concept_from_a_stream(make_trainer, task, bar):
    trainer = make_trainer(task, arch="mlp")
    for batch in split(concept_batch(6000, task), 64):
        trainer.step(batch)
    assert trainer.scores.faded_accuracy[1000] > bar
    assert trainer.scores.records == 6000


def test_regression_learns_a_linear_concept(make_trainer):
    trainer = make_trainer("regression", lr=0.05)
    losses = [trainer.step(batch).loss for batch in split(concept_batch(8000, "regression"), 64)]
    assert np.mean(losses[-10:]) < 0.05 * np.mean(losses[:3])


def test_a_batch_with_a_non_finite_loss_leaves_the_model_untouched(make_trainer):
    trainer = make_trainer("regression")
    trainer.step(concept_batch(64, "regression"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    poisoned = concept_batch(64, "regression", seed=1)
    poisoned.labels[3] = np.float32(3e38)  # finite input, overflowing squared error
    result = trainer.step(poisoned)
    assert not result.learned and trainer.skipped_batches == 1
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_gradient_norm_clipping_bounds_the_update(make_trainer):
    clipped = make_trainer("regression", optimizer="sgd", lr=1.0, clip_grad_norm=0.01, sub_batch=64)
    start = {k: v.clone() for k, v in clipped.model.named_parameters()}
    clipped.step(concept_batch(64, "regression"))
    moved = math.sqrt(sum(((p - start[k]) ** 2).sum().item() for k, p in clipped.model.named_parameters()))
    assert moved == pytest.approx(0.01, rel=1e-3)


def test_restored_state_continues_exactly_like_the_original(make_trainer):
    batches = list(split(concept_batch(1024, "binary"), 128))
    original = make_trainer("binary", arch="mlp")
    for batch in batches[:4]:
        original.step(batch)
    tensors, meta = original.state()
    resumed = make_trainer("binary", arch="mlp")
    resumed.restore(tensors, meta)
    for batch in batches[4:]:
        assert original.step(batch).loss == resumed.step(batch).loss
    for (name, a), b in zip(
        original.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert resumed.scores.records == original.scores.records == 1024


def test_a_model_with_non_finite_weights_is_never_snapshotted(make_trainer):
    from streamlearn.errors import SnapshotError
    from streamlearn.train.checkpoint import snapshot_content

    trainer = make_trainer("binary")
    trainer.step(concept_batch(64))
    with torch.no_grad():
        next(trainer.model.parameters())[0, 0] = float("nan")
    with pytest.raises(SnapshotError, match="non-finite"):
        snapshot_content(trainer, 64, {}, {})


def test_asking_for_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    with pytest.raises(ConfigError, match="--device cuda: no CUDA device"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"
