"""Tensor helpers that a snapshot's writers and readers share: prefixed names and the finite check."""

from collections.abc import Iterable, Mapping
from typing import TypeVar

import torch
from torch import Tensor

MODEL_PREFIX = "model."  # the tensors of the weights file; the rest are the training state
T = TypeVar("T")


def unprefixed(tensors: Mapping[str, T], prefix: str = MODEL_PREFIX) -> dict[str, T]:
    """The entries whose names start with `prefix`, under their names without it."""
    return {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """No NaN or infinity in any floating-point tensor (other dtypes cannot hold one)."""
    return all(finite(t) for t in tensors if t.is_floating_point())


def finite(tensor: Tensor) -> bool:
    """No NaN or infinity in the tensor: its largest and smallest values are finite (a NaN makes
    both NaN). Two reductions, without the element-wise mask isfinite() would allocate."""
    if not tensor.numel():
        return True
    return bool(torch.isfinite(tensor.amax()) & torch.isfinite(tensor.amin()))
