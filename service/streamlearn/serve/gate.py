"""Quality-gated promotion: a new snapshot is served only if it predicts about as well as the served one.

Each snapshot carries the trainer's prequential scores: every record was predicted before it was
learned, so the loss faded over the last WINDOW records is an honest, recent measure of the
model. A candidate whose recent loss exceeds the served one's by more than `tolerance` (relative)
is held: the server keeps the served version, and says so in its metrics and status, until a
newer snapshot passes or an operator pins a version.
"""

import math
from dataclasses import dataclass

from streamlearn.snapshots import SnapshotMeta

WINDOW = "1000"  # records: the trainer's shorter fading window (trainer.WINDOWS)


def recent_loss(meta: SnapshotMeta) -> float | None:
    """The snapshot's prequential loss over about its last WINDOW records, if it has one."""
    try:
        value = float((meta.training or {})["prequential"]["faded_loss"][WINDOW])
    except (KeyError, TypeError, ValueError, OverflowError):  # absent, or not what a trainer writes
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Verdict:
    """Whether a candidate may be served, and the losses that decided it."""

    promote: bool
    candidate_loss: float | None
    served_loss: float | None

    @property
    def reason(self) -> str:
        if self.promote:
            return "passes the promotion gate"
        return f"recent loss {self.candidate_loss:.4g} is worse than the served {self.served_loss:.4g}"


@dataclass(frozen=True)
class PromotionGate:
    """Holds back a candidate whose recent loss is worse than the served one's by over `tolerance`."""

    tolerance: float  # relative: 0.05 lets a candidate be up to 5% worse

    def judge(self, candidate: SnapshotMeta, served: SnapshotMeta) -> Verdict:
        new, old = recent_loss(candidate), recent_loss(served)
        if new is None or old is None:  # nothing to compare (a fresh model): serve it
            return Verdict(True, new, old)
        return Verdict(new <= old * (1 + self.tolerance) + 1e-12, new, old)
