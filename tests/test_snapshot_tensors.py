"""The tensor helpers a snapshot's writers and readers share."""

import math

import pytest
import torch

from streamlearn.snapshots.tensors import MODEL_PREFIX, all_finite, unprefixed


def test_unprefixed_keeps_only_the_prefixed_entries_without_their_prefix() -> None:
    tensors = {"model.w": 1, "model.layer.b": 2, "optim.0.step": 3, "drift.model.x": 4, "model": 5}
    assert MODEL_PREFIX == "model."
    assert unprefixed(tensors) == {"w": 1, "layer.b": 2}
    assert unprefixed(tensors, "drift.") == {"model.x": 4}
    assert unprefixed(tensors, "absent.") == {}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_all_finite_refuses_one_non_finite_float_anywhere(bad: float) -> None:
    fine = [torch.zeros(3), torch.arange(4), torch.empty(0)]
    assert all_finite(fine)
    assert not all_finite([*fine, torch.tensor([[1.0, 2.0], [bad, 3.0]])])
    assert not all_finite([torch.tensor([bad], dtype=torch.float16)])


def test_all_finite_ignores_integer_and_boolean_tensors() -> None:
    assert all_finite([torch.tensor([True, False]), torch.tensor([2**62], dtype=torch.int64)])
