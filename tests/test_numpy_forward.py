"""The numpy path of small predicts gives torch's answers, and is used only where it applies."""

import numpy as np
import pytest
import torch

from streamlearn.models import ModelSpec, build_model
from streamlearn.records import FeatureSpec, LabelSpec
from streamlearn.serve.numpy_forward import MAX_WORK, NumpyForward
from streamlearn.serve.quantize import quantized

from .test_server import trained

SPECS = {
    "binary linear": ModelSpec(LabelSpec.create("binary"), FeatureSpec(3), "linear"),
    "binary mlp": ModelSpec(LabelSpec.create("binary"), FeatureSpec(3), "mlp", {"hidden": [16, 8]}),
    "multiclass mlp": ModelSpec(
        LabelSpec.create("multiclass", num_classes=4), FeatureSpec(3), "mlp", {"hidden": [32], "dropout": 0.2}
    ),
    "regression mlp": ModelSpec(LabelSpec.create("regression"), FeatureSpec(3), "mlp", {"hidden": [8]}),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_numpy_and_torch_predict_the_same(name):
    model = trained(SPECS[name]).model.eval()
    fast = NumpyForward.of(model)
    assert fast is not None
    x = np.random.default_rng(0).normal(0, 3, size=(fast.max_rows, 3)).astype(np.float32)
    expected = model.predict_batch(torch.from_numpy(x))
    got = fast.predict(fast.standardize(x))
    np.testing.assert_allclose(got.scores.numpy(), expected.scores.numpy(), rtol=1e-5, atol=1e-5)
    if expected.probabilities is None:
        np.testing.assert_allclose(got.values.numpy(), expected.values.numpy(), rtol=1e-5, atol=1e-5)
        return
    assert got.values.dtype == expected.values.dtype == torch.int64
    np.testing.assert_allclose(got.probabilities.numpy(), expected.probabilities.numpy(), atol=1e-6)
    assert (got.values == expected.values).all()
    np.testing.assert_allclose(got.probabilities.numpy().sum(axis=1), 1, atol=1e-6)


def test_models_numpy_does_not_do_here_predict_through_torch():
    categorical = FeatureSpec(2, ("a", "b"), ("city",))
    with_categories = build_model(ModelSpec(LabelSpec.create("binary"), categorical, "mlp", {"hidden": [8]}))
    assert NumpyForward.of(with_categories) is None
    wide = ModelSpec(LabelSpec.create("binary"), FeatureSpec(4), "mlp", {"hidden": [16, 16, 8]})
    assert NumpyForward.of(build_model(wide).eval()) is not None  # unquantized: numpy
    assert NumpyForward.of(quantized(build_model(wide).eval(), "int8")) is None  # (in place)


def test_large_batches_of_wide_models_stay_with_torch():
    narrow = NumpyForward.of(build_model(SPECS["binary mlp"]))
    wide = NumpyForward.of(
        build_model(ModelSpec(LabelSpec.create("binary"), FeatureSpec(64), "mlp", {"hidden": [512, 512]}))
    )
    assert narrow is not None and wide is not None
    assert narrow.max_rows * (3 * 16 + 16 * 8 + 8) <= MAX_WORK and narrow.max_rows > 1024
    assert wide.max_rows == MAX_WORK // (64 * 512 + 512 * 512 + 512) == 6


def test_a_fresh_model_without_statistics_only_shifts():
    model = build_model(SPECS["binary linear"]).eval()
    fast = NumpyForward.of(model)
    assert fast is not None and fast.scale is None
    x = np.ones((2, 3), dtype=np.float32)
    np.testing.assert_allclose(
        fast.predict(fast.standardize(x)).probabilities.numpy(),
        model.predict_batch(torch.from_numpy(x)).probabilities.numpy(),
        atol=1e-6,
    )


def test_both_paths_clip_standardized_features_as_training_does():
    from streamlearn.models import Scaling

    spec = ModelSpec(LabelSpec.create("binary"), FeatureSpec(3), "mlp", {"hidden": [8]}, scaling=Scaling(2.0))
    model = trained(spec).model.eval()
    fast = NumpyForward.of(model)
    assert fast is not None and fast.clip == 2.0
    x = np.array([[1e3, -1e3, 1e3], [1e6, -1e6, 1e6], [1e30, -1e30, 1e30]], dtype=np.float32)
    expected = model.predict_batch(torch.from_numpy(x))
    got = fast.predict(fast.standardize(x))
    np.testing.assert_allclose(got.scores.numpy(), expected.scores.numpy(), rtol=1e-5, atol=1e-5)
    assert len(set(expected.scores[:, 0].tolist())) == 1  # all three clipped alike: z = +-2
