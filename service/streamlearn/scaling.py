"""The online standardizer every model starts with, and the rules that keep one record from breaking it.

A plain running mean and variance is at the mercy of one value: after 20,000 records of a
feature with variance 8, a single 1e5 makes it 2.5e5, every later value standardizes to about
0, and since the statistics never forget, the model is blind to that feature for good. So
(Scaling) each standardized value is clipped to +-clip before the model sees it, and the
statistics take in each value winsorized to the same bound around the mean as it stood before
the batch: one record moves the variance by at most clip^2 / count times itself. And they
cover about the last `horizon` records, older ones fading exponentially, so a scale that truly
changes is followed (winsorizing alone would follow it ever more slowly), and statistics spoiled
before any scale could be known (an outlier in a model's first micro-batch, taken in before the
statistics held two records) mend, their excess shrinking by exp(-records / horizon).
"""

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Scaling:
    """How the normalizer bounds outliers and forgets; in every snapshot, so serving does as training.

    `clip`: the bound on a standardized value (0: none); `horizon`: the records the statistics
    cover (0: all). Both 0 is the standardizer of snapshots written before these existed.
    """

    clip: float = 0.0
    horizon: int = 0

    @classmethod
    def of(cls, settings: "DeclaresScaling") -> "Scaling":
        """The trainer's --scale-clip and --scale-horizon."""
        return cls(float(settings.scale_clip), int(settings.scale_horizon))

    def to_dict(self) -> dict[str, Any]:
        return {"clip": self.clip, "horizon": self.horizon}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Scaling":
        data = data or {}  # an earlier release's snapshot: neither rule
        return cls(float(data.get("clip", 0.0)), int(data.get("horizon", 0)))


class Normalizer(nn.Module):
    """Standardizes features with a running mean and variance (Chan et al.'s parallel update),
    bounded and fading as `scaling` says."""

    count: Tensor
    mean: Tensor
    m2: Tensor

    def __init__(self, n_features: int, scaling: Scaling | None = None, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        scaling = scaling or Scaling()
        self.clip = scaling.clip
        self.horizon = scaling.horizon
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(n_features, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        batch = x.to(torch.float64)
        n_b = batch.shape[0]
        if n_b == 0:
            return
        if self.clip:  # winsorize against the statistics before this batch (known from 2 records)
            bound = self.clip * torch.sqrt(self.m2 / self.count.clamp_min(1) + self.eps)
            clipped = torch.minimum(torch.maximum(batch, self.mean - bound), self.mean + bound)
            batch = torch.where(self.count >= 2, clipped, batch)
        if self.horizon:  # the old records weigh at most horizon - n_b: an exponential fade
            kept = self.count.clamp(max=float(max(self.horizon - n_b, 0)))
            self.m2 *= kept / self.count.clamp_min(1)
            self.count.copy_(kept)
        var_b, mean_b = torch.var_mean(batch, dim=0, correction=0)
        m2_b = var_b * n_b
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / total)
        self.m2 += m2_b + delta**2 * (self.count * n_b / total)
        self.count.copy_(total)

    def stats(self) -> tuple[Tensor, Tensor, Tensor]:
        """A copy of the statistics, to put back with set_stats."""
        return self.count.clone(), self.mean.clone(), self.m2.clone()

    def set_stats(self, stats: tuple[Tensor, Tensor, Tensor]) -> None:
        for mine, saved in zip((self.count, self.mean, self.m2), stats, strict=True):
            mine.copy_(saved)

    def forward(self, x: Tensor) -> Tensor:
        return self.bound(self.standardize(x))

    def standardize(self, x: Tensor) -> Tensor:
        """(x - mean) / std, unclipped: the server refuses what overflows float32 here."""
        shift, scale = self._affine(x.dtype)
        return x - shift if scale is None else (x - shift) / scale

    def bound(self, z: Tensor) -> Tensor:
        """Standardized values clipped to +-clip, once there is a scale to clip in."""
        if not self.clip or self._affine(z.dtype)[1] is None:
            return z
        return z.clamp(-self.clip, self.clip)

    def _affine(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """The mean and standard deviation in `dtype`, computed once per change of the statistics."""
        stats = (self.count, self.mean, self.m2)  # replaced by .to(), changed in place by updates
        key = (*(id(t) for t in stats), *(t._version for t in stats), self.mean.device, dtype)
        cached = getattr(self, "_cached", None)
        if cached is None or cached[0] != key:
            shift = self.mean.to(dtype)
            scale = torch.sqrt(self.m2 / self.count + self.eps).to(dtype) if self.count >= 2 else None
            cached = self._cached = (key, shift, scale)
        return cached[1], cached[2]


class DeclaresScaling(Protocol):
    """What declares the input scaling: a trainer's --scale-clip and --scale-horizon."""

    @property
    def scale_clip(self) -> float: ...
    @property
    def scale_horizon(self) -> int: ...
