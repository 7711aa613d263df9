"""Rehearsal against forgetting: a reservoir of past records mixed into every optimizer step.

The reservoir holds a uniform sample of every record learned so far (Vitter's algorithm R), so
a concept that recurs after a long absence is still represented. Each step learns its fresh
records plus `ratio` times as many drawn from the reservoir. The reservoir, its count and its
random generator's state are part of the snapshot, so a restart replays exactly as before.
"""

from typing import Any

import numpy as np
import torch
from torch import Tensor

NAMES = ("features", "labels", "weights", "categories")  # the arrays of a record, in order


class Reservoir:
    """A uniform sample of at most `capacity` learned records: features, labels, weights and, for
    a model with categorical features, their table rows."""

    def __init__(self, capacity: int, ratio: float, seed: int = 0) -> None:
        self.capacity = capacity
        self.ratio = ratio
        self.seen = 0  # records offered so far
        self.size = 0  # slots filled (fewer than `seen` until the reservoir is full)
        self.rng = np.random.default_rng(seed)
        self.arrays: list[np.ndarray] = []  # allocated by reserve(), in the records' shapes

    @property
    def features(self) -> np.ndarray | None:
        return self.arrays[0] if self.arrays else None

    @property
    def labels(self) -> np.ndarray | None:
        return self.arrays[1] if self.arrays else None

    def sample(self, fresh: int) -> tuple[np.ndarray, ...] | None:
        """`ratio` times `fresh` records drawn from the reservoir (None while it is empty)."""
        count = round(fresh * self.ratio)
        if not self.size or not count:
            return None
        picks = self.rng.integers(0, self.size, count)
        return tuple(array[picks] for array in self.arrays)

    def reserve(self, *records: np.ndarray) -> None:
        """Allocate the reservoir for records like these (before a step, so add() allocates nothing)."""
        if not self.arrays:
            self.arrays = [np.zeros((self.capacity, *a.shape[1:]), a.dtype) for a in records]

    def add(self, *records: np.ndarray) -> None:
        """Offer learned records: empty slots fill first, then each is kept with probability
        capacity / records seen, replacing a random one (later records win a shared slot)."""
        self.reserve(*records)
        n = len(records[0])
        filling = min(n, self.capacity - self.size)
        slots = np.empty(n, np.int64)
        slots[:filling] = self.size + np.arange(filling)
        position = self.seen + np.arange(filling, n)  # each later record's place in the stream
        if n > filling:
            slots[filling:] = self.rng.integers(0, position + 1)
        keep = slots < self.capacity
        for array, values in zip(self.arrays, records, strict=True):
            array[slots[keep]] = values[keep]
        self.size += filling
        self.seen += n

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {}
        if self.arrays and self.size:
            tensors = {
                name: torch.from_numpy(array[: self.size].copy())
                for name, array in zip(NAMES, self.arrays, strict=False)
            }
        return tensors, {"seen": self.seen, "rng": self.rng.bit_generator.state}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Continue from a saved reservoir (of this capacity or another: it keeps what fits)."""
        self.seen = int(meta["seen"])
        self.rng.bit_generator.state = meta["rng"]
        self.size = 0
        if "features" in tensors:
            saved = [tensors[name].numpy() for name in NAMES if name in tensors]
            self.arrays = []
            self.reserve(*saved)
            self.size = size = min(len(saved[0]), self.capacity)
            for array, values in zip(self.arrays, saved, strict=True):
                array[:size] = values[:size]
