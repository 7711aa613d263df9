"""The model contract and its implementations: linear and MLP networks for every task.

An OnlineModel maps raw feature rows to scores (logits or regression values) through an
online standardizer that is part of its state, and knows its task's loss and outputs.
Training (optimizers, test-then-train) lives in trainer.py; serving only needs this module.
"""

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from streamlearn.errors import SnapshotMismatch
from streamlearn.records import FeatureSpec, LabelSpec


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's architecture; stored in every snapshot."""

    labels: LabelSpec
    features: FeatureSpec
    arch: str = "mlp"
    hidden: tuple[int, ...] = (64, 64)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels.to_dict(),
            "features": self.features.to_dict(),
            "arch": self.arch,
            "hidden": list(self.hidden),
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        return cls(
            labels=LabelSpec.from_dict(data["labels"]),
            features=FeatureSpec.from_dict(data["features"]),
            arch=data["arch"],
            hidden=tuple(data.get("hidden") or ()),
            seed=int(data.get("seed", 0)),
        )


@dataclass
class Prediction:
    """Model outputs for a batch: raw scores, point predictions, and class probabilities."""

    scores: Tensor  # [n, n_outputs]
    values: Tensor  # [n]: regression values or class indices
    probabilities: Tensor | None = field(default=None)  # [n, n_classes] for classification


class Normalizer(nn.Module):
    """Standardizes features with a running mean and variance (Chan et al.'s parallel update)."""

    count: Tensor
    mean: Tensor
    m2: Tensor

    def __init__(self, n_features: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(n_features, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        batch = x.to(torch.float64)
        n_b = batch.shape[0]
        if n_b == 0:
            return
        mean_b = batch.mean(dim=0)
        m2_b = ((batch - mean_b) ** 2).sum(dim=0)
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / total)
        self.m2 += m2_b + delta**2 * (self.count * n_b / total)
        self.count.copy_(total)

    def forward(self, x: Tensor) -> Tensor:
        if self.count < 2:
            return x - self.mean.to(x.dtype)
        std = torch.sqrt(self.m2 / self.count + self.eps)
        return (x - self.mean.to(x.dtype)) / std.to(x.dtype)


class TaskHead(ABC):
    """How scores become a loss and predictions for one kind of label."""

    @abstractmethod
    def loss(self, scores: Tensor, labels: Tensor) -> Tensor:
        """Per-record loss, shape [n]."""

    @abstractmethod
    def predict(self, scores: Tensor) -> Prediction: ...


class RegressionHead(TaskHead):
    def loss(self, scores: Tensor, labels: Tensor) -> Tensor:
        return (scores.squeeze(1) - labels) ** 2

    def predict(self, scores: Tensor) -> Prediction:
        return Prediction(scores, scores.squeeze(1))


class BinaryHead(TaskHead):
    def loss(self, scores: Tensor, labels: Tensor) -> Tensor:
        return nn.functional.binary_cross_entropy_with_logits(scores.squeeze(1), labels, reduction="none")

    def predict(self, scores: Tensor) -> Prediction:
        positive = torch.sigmoid(scores.squeeze(1))
        probabilities = torch.stack([1 - positive, positive], dim=1)
        return Prediction(scores, (positive > 0.5).long(), probabilities)


class MulticlassHead(TaskHead):
    def loss(self, scores: Tensor, labels: Tensor) -> Tensor:
        return nn.functional.cross_entropy(scores, labels, reduction="none")

    def predict(self, scores: Tensor) -> Prediction:
        probabilities = torch.softmax(scores, dim=1)
        return Prediction(scores, probabilities.argmax(dim=1), probabilities)


HEADS: dict[str, type[TaskHead]] = {
    "regression": RegressionHead,
    "binary": BinaryHead,
    "multiclass": MulticlassHead,
}


class OnlineModel(nn.Module, ABC):
    """The model contract: standardize, score, predict, weigh losses, and carry its own state."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.head = HEADS[spec.labels.task]()
        self.normalizer = Normalizer(spec.features.n_features)

    @abstractmethod
    def scores(self, x: Tensor) -> Tensor:
        """Raw outputs [n, n_outputs] for standardized features [n, n_features]."""

    def forward(self, x: Tensor) -> Tensor:
        return self.scores(self.normalizer(x))

    @torch.no_grad()
    def predict_batch(self, x: Tensor) -> Prediction:
        return self.head.predict(self(x))

    def loss(self, scores: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
        """Weighted mean loss of a batch."""
        return (self.head.loss(scores, labels) * weights).sum() / weights.sum().clamp_min(1e-12)

    def state(self) -> dict[str, Tensor]:
        """Weights and normalizer statistics as contiguous CPU tensors, ready for safetensors."""
        return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in self.state_dict().items()}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        expected = {name: tuple(t.shape) for name, t in self.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in tensors.items()}
        if expected != found:
            differing = sorted(set(expected.items()) ^ set(found.items()))[:4]
            raise SnapshotMismatch(f"snapshot weights do not fit a {self.spec.arch} model: {differing}")
        self.load_state_dict(tensors)


class LinearModel(OnlineModel):
    """Linear, logistic or softmax regression, by task."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.linear = nn.Linear(spec.features.n_features, spec.labels.n_outputs)

    def scores(self, x: Tensor) -> Tensor:
        return self.linear(x)


class MLPModel(OnlineModel):
    """A ReLU multilayer perceptron with the task's output layer."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        widths = [spec.features.n_features, *spec.hidden]
        layers: list[nn.Module] = []
        for n_in, n_out in itertools.pairwise(widths):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], spec.labels.n_outputs))
        self.layers = nn.Sequential(*layers)

    def scores(self, x: Tensor) -> Tensor:
        return self.layers(x)


ARCHITECTURES: dict[str, type[OnlineModel]] = {"linear": LinearModel, "mlp": MLPModel}


def build_model(spec: ModelSpec) -> OnlineModel:
    """A freshly initialised model; the same spec (seed included) gives the same weights."""
    if spec.arch not in ARCHITECTURES:
        raise SnapshotMismatch(f"unknown architecture {spec.arch!r}; known: {sorted(ARCHITECTURES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return ARCHITECTURES[spec.arch](spec)
