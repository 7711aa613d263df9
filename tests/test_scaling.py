"""One record, however far out, never spoils the normalizer: its bounds, its fading, its snapshots."""

import itertools

import numpy as np
import pytest
import torch

from streamlearn.decoding import DecodedBatch
from streamlearn.dev.streams import records
from streamlearn.models import ModelSpec, Normalizer, build_model
from streamlearn.records import FeatureSpec, LabelSpec

from .test_learning_options import learner_for


def sea(n: int, seed: int) -> DecodedBatch:
    """SEA records (three uniform features on [0, 10], label x0 + x1 <= 8) as one batch."""
    rows = list(itertools.islice(records("sea", seed=seed, drift_every=0), n))
    x = np.array([r["features"] for r in rows], np.float32)
    y = np.array([r["label"] for r in rows], np.float32)
    return DecodedBatch(x, y, np.ones(n, np.float32))


def learn(learner, batch: DecodedBatch, size: int = 256) -> None:
    for start in range(0, len(batch), size):
        part = slice(start, start + size)
        part_batch = DecodedBatch(batch.features[part], batch.labels[part], batch.weights[part])
        learner.learn(part_batch, FeatureSpec(3))


@pytest.mark.parametrize("outlier", [1e5, 1e10, 1e30])
def test_one_outlier_among_clean_records_does_not_blind_the_model(tmp_path, outlier):
    """Issue 25: one finite outlier made the variance 2.5e5 for good, and the model one class."""
    learner = learner_for(tmp_path, arch="linear", lr=0.02, sub_batch_size=32, on_drift="none")
    learn(learner, sea(4000, seed=1))
    one = np.ones(1, np.float32)
    learner.learn(DecodedBatch(np.array([[outlier, outlier, 0.5]], np.float32), one, one), FeatureSpec(3))
    learn(learner, sea(4000, seed=2))

    normalizer = learner.trainer.model.normalizer
    variance = (normalizer.m2 / normalizer.count).numpy()
    assert (variance < 8.34 * 1.2).all(), variance  # U(0, 10): 8.33
    held_out = sea(2000, seed=3)
    predicted = learner.trainer.model.predict_batch(torch.from_numpy(held_out.features)).values.numpy()
    majority = max(held_out.labels.mean(), 1 - held_out.labels.mean())
    accuracy = float((predicted == held_out.labels).mean())
    assert majority < 0.7 and accuracy > 0.95, (accuracy, majority)


def test_one_record_moves_the_variance_by_a_bounded_factor_and_the_model_sees_it_clipped():
    from streamlearn.models import Scaling

    rng = np.random.default_rng(0)
    normalizer = Normalizer(2, Scaling(clip=5.0))
    normalizer.update(torch.from_numpy(rng.normal(3, 2, size=(1000, 2))))
    before = normalizer.m2 / normalizer.count
    normalizer.update(torch.tensor([[1e30, -1e30]], dtype=torch.float64))
    after = normalizer.m2 / normalizer.count
    assert (after <= before * (1 + 5.0**2 / 1000)).all(), (before, after)
    assert normalizer(torch.tensor([[1e30, -1e30]])).tolist() == [[5.0, -5.0]]
    assert normalizer.standardize(torch.tensor([[1e30, 3.0]]))[0, 0] > 1e28  # unclipped, for the server


def test_without_scaling_it_is_the_plain_running_standardizer_of_earlier_releases():
    data = np.random.default_rng(1).normal(50, 7, size=(500, 3))
    data[-1] = 1e10
    normalizer = Normalizer(3)
    for chunk in np.array_split(data, 7):
        normalizer.update(torch.from_numpy(chunk))
    np.testing.assert_allclose((normalizer.m2 / normalizer.count).numpy(), data.var(axis=0), rtol=1e-10)
    assert normalizer(torch.tensor([[1e10, 1e10, 1e10]])).max() > 10


def test_the_statistics_fade_over_the_horizon_and_follow_a_changed_scale():
    """Spoiled before a scale was known (the first two records), they mend as the horizon fades
    them: the excess variance decays by exp(-records / horizon), 1e20 times within 50 horizons."""
    from streamlearn.models import Scaling

    rng = np.random.default_rng(2)
    normalizer = Normalizer(1, Scaling(clip=5.0, horizon=1000))
    normalizer.update(torch.tensor([[1e10], [0.0]], dtype=torch.float64))

    def variance_after(batches: int, sd: float) -> float:
        for _ in range(batches):
            normalizer.update(torch.from_numpy(rng.normal(0, sd, size=(100, 1))))
        return (normalizer.m2 / normalizer.count).item()

    assert variance_after(10, 1.0) > 1e15  # 1,000 records: nothing faded yet
    assert 0.8 < variance_after(490, 1.0) < 1.2 and normalizer.count.item() == 1000
    assert 0.8e4 < variance_after(30, 100.0) < 1.2e4  # the unit changes: 3 horizons to follow it


def test_a_snapshot_keeps_the_scaling_and_one_of_an_earlier_release_loads_without_it():
    from streamlearn.models import Scaling

    spec = ModelSpec(LabelSpec.create("binary"), FeatureSpec(3), "linear", scaling=Scaling(4.0, 5000))
    again = ModelSpec.from_dict(spec.to_dict())
    assert again.scaling == Scaling(4.0, 5000) and build_model(again).normalizer.clip == 4.0
    old = {k: v for k, v in spec.to_dict().items() if k != "scaling"}
    assert ModelSpec.from_dict(old).scaling == Scaling(0.0, 0)  # served as it was trained: unclipped


def test_a_resumed_trainer_takes_the_scaling_of_its_settings(tmp_path):
    from streamlearn.models import Scaling
    from streamlearn.snapshots import LocalSnapshotStore

    store = LocalSnapshotStore(tmp_path / "store")
    first = learner_for(tmp_path / "a", arch="linear", scale_clip=0, scale_horizon=0)
    learn(first, sea(256, seed=1))
    tensors, content = first.content({})
    saved = store.save("m", tensors, content)
    assert content.model["scaling"] == {"clip": 0.0, "horizon": 0}

    resumed = learner_for(tmp_path / "b", arch="linear", scale_clip=6, scale_horizon=9000)
    resumed.restore(store.load("m", saved.version), FeatureSpec(3))
    normalizer = resumed.trainer.model.normalizer
    assert (normalizer.clip, normalizer.horizon) == (6.0, 9000) and normalizer.count.item() == 256
    assert resumed.trainer.model.spec.scaling == Scaling(6.0, 9000)  # and its snapshots say so
