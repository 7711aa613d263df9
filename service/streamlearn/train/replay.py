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


class Reservoir:
    """A uniform sample of at most `capacity` learned records (features, labels, weights)."""

    def __init__(self, capacity: int, ratio: float, seed: int = 0) -> None:
        self.capacity = capacity
        self.ratio = ratio
        self.seen = 0  # records offered so far
        self.size = 0  # slots filled (fewer than `seen` until the reservoir is full)
        self.rng = np.random.default_rng(seed)
        self.features: np.ndarray | None = None  # allocated by reserve(), in the records' shape
        self.labels: np.ndarray | None = None
        self.weights: np.ndarray | None = None

    def sample(self, fresh: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """`ratio` times `fresh` records drawn from the reservoir (None while it is empty)."""
        count = round(fresh * self.ratio)
        if not self.size or not count:
            return None
        assert self.features is not None and self.labels is not None and self.weights is not None
        picks = self.rng.integers(0, self.size, count)
        return self.features[picks], self.labels[picks], self.weights[picks]

    def reserve(self, features: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> None:
        """Allocate the reservoir for records like these (before a step, so add() allocates nothing)."""
        if self.features is None:
            self.features = np.zeros((self.capacity, *features.shape[1:]), features.dtype)
            self.labels = np.zeros(self.capacity, labels.dtype)
            self.weights = np.zeros(self.capacity, weights.dtype)

    def add(self, features: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> None:
        """Offer learned records: empty slots fill first, then each is kept with probability
        capacity / records seen, replacing a random one (later records win a shared slot)."""
        self.reserve(features, labels, weights)
        assert self.features is not None and self.labels is not None and self.weights is not None
        n = len(labels)
        filling = min(n, self.capacity - self.size)
        slots = np.empty(n, np.int64)
        slots[:filling] = self.size + np.arange(filling)
        position = self.seen + np.arange(filling, n)  # each later record's place in the stream
        if n > filling:
            slots[filling:] = self.rng.integers(0, position + 1)
        keep = slots < self.capacity
        self.features[slots[keep]] = features[keep]
        self.labels[slots[keep]] = labels[keep]
        self.weights[slots[keep]] = weights[keep]
        self.size += filling
        self.seen += n

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {}
        if self.features is not None and self.size:
            assert self.labels is not None and self.weights is not None
            tensors = {
                "features": torch.from_numpy(self.features[: self.size].copy()),
                "labels": torch.from_numpy(self.labels[: self.size].copy()),
                "weights": torch.from_numpy(self.weights[: self.size].copy()),
            }
        return tensors, {"seen": self.seen, "rng": self.rng.bit_generator.state}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Continue from a saved reservoir (of this capacity or another: it keeps what fits)."""
        self.seen = int(meta["seen"])
        self.rng.bit_generator.state = meta["rng"]
        self.size = 0
        if "features" in tensors:
            features, labels, weights = (tensors[k].numpy() for k in ("features", "labels", "weights"))
            self.features = None
            self.reserve(features, labels, weights)
            assert self.features is not None and self.labels is not None and self.weights is not None
            self.size = size = min(len(labels), self.capacity)
            self.features[:size], self.labels[:size], self.weights[:size] = (
                features[:size],
                labels[:size],
                weights[:size],
            )
