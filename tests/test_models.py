"""The model contract: every architecture and task passes the same checks."""

import dataclasses

import numpy as np
import pytest
import torch

from streamlearn.errors import SnapshotMismatch
from streamlearn.models import ARCHITECTURES, HEADS, Normalizer, build_model, check_fits

from .conftest import make_spec

CASES = [(arch, task) for arch in ARCHITECTURES for task in HEADS]


@pytest.mark.parametrize(("arch", "task"), CASES)
def test_predict_batch_gives_one_prediction_per_row(arch, task):
    model = build_model(make_spec(task, n_features=4, arch=arch))
    prediction = model.predict_batch(torch.randn(7, 4))
    assert prediction.values.shape == (7,)
    if task == "regression":
        assert prediction.probabilities is None
    else:
        n_classes = 2 if task == "binary" else 3
        assert prediction.probabilities.shape == (7, n_classes)
        assert torch.allclose(prediction.probabilities.sum(dim=1), torch.ones(7))
        assert torch.equal(prediction.values, prediction.probabilities.argmax(dim=1))


@pytest.mark.parametrize(("arch", "task"), CASES)
def test_the_same_spec_and_seed_build_the_same_weights(arch, task):
    first, second = build_model(make_spec(task, arch=arch)), build_model(make_spec(task, arch=arch))
    for a, b in zip(first.state().values(), second.state().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("arch", "task"), CASES)
def test_state_round_trips_into_a_fresh_model(arch, task):
    model = build_model(make_spec(task, arch=arch))
    model.normalizer.update(torch.randn(50, 3) * 5 + 2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    clone = build_model(make_spec(task, arch=arch))
    clone.load_state(model.state())
    x = torch.randn(5, 3)
    assert torch.equal(model.predict_batch(x).scores, clone.predict_batch(x).scores)


def test_loading_weights_of_another_architecture_is_a_clear_error():
    mlp = build_model(make_spec("binary", arch="mlp"))
    linear = build_model(make_spec("binary", arch="linear"))
    with pytest.raises(SnapshotMismatch, match="do not fit a linear model"):
        linear.load_state(mlp.state())


def test_weights_are_checked_against_a_spec_without_building_it():
    spec = make_spec("binary", arch="mlp")
    weights = build_model(spec).state()
    check_fits(spec, weights)
    # 2**40 hidden units: built, the first layer alone would take 12 TiB; checked, nothing is allocated.
    huge = dataclasses.replace(spec, args={**spec.args, "hidden": [2**40]})
    with pytest.raises(SnapshotMismatch, match=r"do not fit a mlp model: .*1099511627776"):
        check_fits(huge, weights)
    with pytest.raises(SnapshotMismatch, match="do not fit a linear model"):
        check_fits(make_spec("binary", arch="linear"), weights)


@pytest.mark.parametrize(("arch", "task"), CASES)
def test_weighted_loss_ignores_zero_weight_records(arch, task):
    model = build_model(make_spec(task, arch=arch))
    x = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 1, 0], dtype=torch.int64 if task == "multiclass" else torch.float32)
    scores = model(x)
    full = model.loss(scores[:2], labels[:2], torch.ones(2))
    masked = model.loss(scores, labels, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(full, masked)


def test_normalizer_matches_numpy_over_many_batches():
    rng = np.random.default_rng(1)
    data = rng.normal(50, 7, size=(1000, 3))
    normalizer = Normalizer(3)
    for chunk in np.array_split(data, 13):
        normalizer.update(torch.from_numpy(chunk))
    assert normalizer.count.item() == 1000
    np.testing.assert_allclose(normalizer.mean.numpy(), data.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose((normalizer.m2 / normalizer.count).numpy(), data.var(axis=0), rtol=1e-10)
    standardized = normalizer(torch.from_numpy(data).float())
    np.testing.assert_allclose(standardized.mean(dim=0).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(standardized.std(dim=0, unbiased=False).numpy(), 1, atol=1e-4)


@pytest.mark.parametrize(("arch", "task"), CASES)
def test_every_architecture_learns_a_concept_and_is_served_from_its_snapshot(
    make_trainer, tmp_path, arch, task
):
    from streamlearn.serve.registry import ServedModel
    from streamlearn.snapshots import LocalSnapshotStore

    from .conftest import concept_batch, write_snapshot

    trainer = make_trainer(task, arch=arch, lr=0.02)
    losses = [trainer.step(concept_batch(64, task, seed=seed)).loss for seed in range(150)]
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:5]), f"{arch}/{task} did not learn"

    snapshot = write_snapshot(LocalSnapshotStore(tmp_path), "m", trainer, records=150 * 64)
    served = ServedModel.from_snapshot(LocalSnapshotStore(tmp_path).load("m", snapshot.version))
    x = torch.from_numpy(concept_batch(32, task, seed=999).features)
    trainer.model.eval()
    assert torch.equal(served.model.predict_batch(x).values, trainer.model.predict_batch(x).values)


def test_a_new_architecture_is_one_class():
    from streamlearn.config import TrainSettings
    from streamlearn.models import ModelSpec, OnlineModel
    from streamlearn.records import FeatureSpec, LabelSpec

    class Bilinear(OnlineModel, arch="bilinear-test"):
        uses = ("hidden",)

        def __init__(self, spec):
            super().__init__(spec)
            self.inner = torch.nn.Bilinear(
                spec.features.n_features, spec.features.n_features, spec.args["hidden"][0]
            )
            self.out = torch.nn.Linear(spec.args["hidden"][0], spec.labels.n_outputs)

        def scores(self, x, categories=None):  # this one ignores categorical features
            return self.out(self.inner(x, x))

    try:
        settings = TrainSettings(task="binary", arch="bilinear-test", hidden="5")
        spec = ModelSpec.create(LabelSpec.create("binary"), FeatureSpec(3), settings.arch, settings)
        model = build_model(ModelSpec.from_dict(spec.to_dict()))
        assert isinstance(model, Bilinear) and spec.args == {"hidden": [5]}
        assert model.predict_batch(torch.zeros(2, 3)).probabilities.shape == (2, 2)
    finally:
        ARCHITECTURES.pop("bilinear-test")


def test_a_spec_of_the_first_snapshot_format_still_loads():
    from streamlearn.models import ModelSpec

    old = {
        "labels": {"task": "binary", "classes": [], "num_classes": 2},
        "features": {"n_features": 3, "names": []},
        "arch": "mlp",
        "hidden": [8, 4],
        "seed": 1,
    }
    spec = ModelSpec.from_dict(old)
    assert spec.args == {"hidden": [8, 4], "dropout": 0.0} and spec.seed == 1  # arguments added later default
    assert ModelSpec.from_dict({**old, "arch": "linear"}).args == {}
    assert (
        spec.mismatch(ModelSpec.from_dict({**old, "hidden": [8]}))
        == "binary/mlp hidden=[8], not binary/mlp hidden=[8, 4]"
    )


def test_the_normalizer_standardizes_with_its_current_statistics_after_every_change():
    rng = np.random.default_rng(3)
    norm, other = Normalizer(4), Normalizer(4)
    x = torch.from_numpy(rng.normal(5, 3, size=(64, 4)).astype(np.float32))

    def expected(n: Normalizer) -> torch.Tensor:
        std = torch.sqrt(n.m2 / n.count + n.eps)
        return ((x.double() - n.mean) / std).float()

    assert torch.equal(norm(x), x)  # nothing seen: the identity
    norm.update(x[:32])
    first = norm(x)
    assert torch.allclose(first, expected(norm), atol=1e-5)
    norm.update(x[32:] * 10)  # in place: the next call sees the new statistics
    assert torch.allclose(norm(x), expected(norm), atol=1e-5) and not torch.allclose(norm(x), first)
    other.update(x[:32])
    norm.load_state_dict(other.state_dict())  # a restored snapshot
    assert torch.allclose(norm(x), first, atol=1e-6)
