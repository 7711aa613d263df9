"""The loss a model learns by, per task, and online class-imbalance weighting.

The prequential score stays the task's natural loss (squared error, log loss, cross-entropy) so
that runs with different training losses are compared on the same scale; only learning uses the
loss chosen here.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

from streamlearn.config import LOSSES

DEFAULT_LOSS = {task: names[0] for task, names in LOSSES.items()}
IMBALANCE_WINDOW = 10_000  # records over which class frequencies fade, for --class-weighting balanced


@dataclass(frozen=True)
class LossSettings:
    loss: str | None = None  # None: the task's default
    huber_delta: float = 1.0
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    class_weighting: str = "none"

    @classmethod
    def of(cls, settings: Any) -> "LossSettings":
        return cls(*(getattr(settings, name) for name in cls.__dataclass_fields__))


class Loss:
    """Per-record training loss of a task, and the weight each record gets by its class."""

    def __init__(self, task: str, n_outputs: int, settings: LossSettings, device: torch.device) -> None:
        self.task = task
        self.name = settings.loss or DEFAULT_LOSS[task]
        if self.name not in LOSSES[task]:
            raise ValueError(f"--loss {self.name} does not fit --task {task}; it takes {LOSSES[task]}")
        self.s = settings
        n_classes = 2 if task == "binary" else n_outputs
        self.balanced = settings.class_weighting == "balanced" and task != "regression"
        # faded count of each class, for balanced weights: the state this loss carries
        self.class_counts = torch.zeros(n_classes if self.balanced else 0, dtype=torch.float64, device=device)

    def per_record(self, scores: Tensor, labels: Tensor) -> Tensor:
        s = self.s
        if self.task == "regression":
            values = scores.squeeze(1)
            if self.name == "huber":
                return functional.huber_loss(values, labels, reduction="none", delta=s.huber_delta)
            return (values - labels) ** 2
        if self.task == "binary":
            logits = scores.squeeze(1)
            log_loss = functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
            if self.name == "focal":  # Lin et al. 2017: (1 - p_t)^gamma times the log loss
                p = torch.sigmoid(logits)
                p_true = p * labels + (1 - p) * (1 - labels)
                # clamped: for 0 < gamma < 1 the gradient of x**gamma at x = 0 is infinite
                return (1 - p_true).clamp_min(1e-12) ** s.focal_gamma * log_loss
            return log_loss
        targets = labels.long()
        if self.name == "focal":
            log_p = functional.log_softmax(scores, dim=1).gather(1, targets[:, None]).squeeze(1)
            return -((1 - log_p.exp()).clamp_min(1e-12) ** s.focal_gamma) * log_p
        return functional.cross_entropy(scores, targets, reduction="none", label_smoothing=s.label_smoothing)

    def weights(self, labels: Tensor, weights: Tensor) -> Tensor:
        """The records' weights, times their class's inverse frequency when balanced.

        A class seen at frequency f (fading over IMBALANCE_WINDOW records, these records
        included) weighs 1 / (k f), so every class weighs the same in total.
        """
        if not self.balanced:
            return weights
        classes = labels.long()
        frequency = self._counts_with(classes)
        frequency = frequency / frequency.sum()
        scale = (1 / (len(frequency) * frequency.clamp_min(1e-3))).to(weights.dtype)
        return weights * scale[classes]

    def learned(self, labels: Tensor) -> None:
        """Count the classes of records just learned (only those: a skipped step counts nothing)."""
        if self.balanced:
            self.class_counts.copy_(self._counts_with(labels.long()))

    def _counts_with(self, classes: Tensor) -> Tensor:
        seen = torch.bincount(classes, minlength=len(self.class_counts)).to(torch.float64)
        return self.class_counts * (1 - 1 / IMBALANCE_WINDOW) ** len(classes) + seen

    def state(self) -> dict[str, Tensor]:
        return {"class_counts": self.class_counts.detach().cpu().clone()} if self.balanced else {}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        if self.balanced and "class_counts" in tensors:
            self.class_counts.copy_(tensors["class_counts"])
