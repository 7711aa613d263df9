"""The model contract and its implementations: linear and MLP networks for every task.

An OnlineModel maps raw feature rows to scores (logits or regression values) through an
online standardizer that is part of its state, and knows its task's loss and outputs.
Training (optimizers, test-then-train) lives in trainer.py; serving only needs this module.
"""

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from streamlearn.errors import ConfigError, SnapshotMismatch
from streamlearn.records import FeatureSpec, LabelSpec
from streamlearn.scaling import DeclaresScaling, Normalizer, Scaling

ARCHITECTURES: dict[str, type["OnlineModel"]] = {}  # filled by each architecture's class statement


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's architecture; stored in every snapshot.

    `args` are the architecture's own arguments (the settings its class names in `uses`, such
    as an MLP's `hidden` widths), so a new architecture needs no change here.
    """

    labels: LabelSpec
    features: FeatureSpec
    arch: str = "mlp"
    args: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    scaling: Scaling = field(default_factory=Scaling)  # outlier bounds; a resumed trainer may change them

    @classmethod
    def create(
        cls, labels: LabelSpec, features: FeatureSpec, arch: str, settings: DeclaresScaling, seed: int = 0
    ) -> "ModelSpec":
        """The spec of architecture `arch`: its scaling, and its arguments (the names its class
        `uses`) read from `settings`."""
        uses = ARCHITECTURES[known_architecture(arch)].uses
        args = {name: _plain(getattr(settings, name)) for name in uses}
        return cls(labels, features, arch, args, seed, Scaling.of(settings))

    def mismatch(self, other: "ModelSpec") -> str | None:
        """Why a snapshot of `other` cannot continue this model's learning, or None if it can."""
        if (self.labels.task, self.arch, self.args) != (other.labels.task, other.arch, other.args):
            return f"{other.describe()}, not {self.describe()}"
        if self.labels.classes and self.labels.classes != other.labels.classes:
            return f"classes {list(other.labels.classes)}, not {list(self.labels.classes)}"
        if self.labels.n_outputs != other.labels.n_outputs:
            return f"{other.labels.n_outputs} outputs (classes), not {self.labels.n_outputs}"
        if self.features.n_features and self.features.n_features != other.features.n_features:
            return f"{other.features.n_features} features, not {self.features.n_features}"
        return None

    def describe(self) -> str:
        defaults = architecture(self.arch).defaults if self.arch in ARCHITECTURES else {}
        shown = {name: value for name, value in self.args.items() if defaults.get(name, ...) != value}
        args = "".join(f" {name}={value}" for name, value in sorted(shown.items()))
        return f"{self.labels.task}/{self.arch}{args}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels.to_dict(),
            "features": self.features.to_dict(),
            "arch": self.arch,
            "args": self.args,
            "hidden": self.args.get("hidden", []),  # for readers of the first release (0.1.0)
            "seed": self.seed,
            "scaling": self.scaling.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        arch = data["arch"]
        args = data.get("args")
        model_class = architecture(arch)
        if args is None:  # format 1 kept an MLP's widths beside the arch, for every architecture
            args = {name: data[name] for name in model_class.uses if name in data}
        args = {**model_class.defaults, **args}  # arguments added since the snapshot was written
        return cls(
            labels=LabelSpec.from_dict(data["labels"]),
            features=FeatureSpec.from_dict(data["features"]),
            arch=arch,
            args={name: _plain(value) for name, value in args.items()},
            seed=int(data.get("seed", 0)),
            scaling=Scaling.from_dict(data.get("scaling")),
        )


def _plain(value: Any) -> Any:
    """A setting as it reads back from JSON (tuples become lists), so specs compare equal."""
    return list(value) if isinstance(value, tuple) else value


@dataclass
class Prediction:
    """Model outputs for a batch: raw scores, point predictions, and class probabilities."""

    scores: Tensor  # [n, n_outputs]
    values: Tensor  # [n]: regression values or class indices
    probabilities: Tensor | None = field(default=None)  # [n, n_classes] for classification


class CategoryTable(nn.Module):
    """Hashed categories -> one vector per categorical feature: the mean of its categories' rows.

    One table for all categorical features (the hashing trick: a feature's name seeds its hash,
    records.py), plus one rare row per feature (--min-count) and an all-zero row for "no
    category", which never learns. Rows start at zero, so a category never learned adds nothing:
    an unseen one is predicted as if absent. The table is learned sparsely (`sparse=True`: a
    step's gradient holds the rows its records touched, nothing else).
    """

    counts: Tensor
    slot_feature: Tensor

    def __init__(self, features: FeatureSpec, dim: int) -> None:
        super().__init__()
        self.buckets = features.hash_buckets
        self.n_features = len(features.category_features)
        self.min_count = features.min_count
        self.pooled = features.slots != self.n_features  # multi-valued features: a mean over slots
        self.empty = self.buckets + self.n_features  # the last row: no category
        zeros = torch.zeros(self.empty + 1, dim)  # given: no random draw for a table of millions of rows
        self.table = nn.Embedding(self.empty + 1, dim, padding_idx=self.empty, sparse=True, _weight=zeros)
        self.register_buffer("slot_feature", torch.from_numpy(features.slot_features), persistent=False)
        if self.min_count > 1:  # how often each row was learned, to send rare categories to a shared row
            self.register_buffer("counts", torch.zeros(self.buckets, dtype=torch.int32))

    def rows(self, ids: Tensor) -> Tensor:
        """Table rows for hashed ids [n, slots] (-1: none), rare ones sent to their feature's rare row."""
        empty = ids < 0
        if self.min_count > 1:
            rare = self.counts[ids.clamp_min(0)] < self.min_count
            ids = torch.where(rare, self.buckets + self.slot_feature, ids)
        return torch.where(empty, self.empty, ids)

    def forward(self, ids: Tensor) -> Tensor:
        """[n, n_features, dim]: each categorical feature's vector (zeros: no category)."""
        vectors = self.table(self.rows(ids))  # [n, slots, dim]
        if not self.pooled:
            return vectors
        n, dim = len(ids), vectors.shape[2]
        sums = vectors.new_zeros(n, self.n_features, dim).index_add_(1, self.slot_feature, vectors)
        present = (ids >= 0).to(vectors.dtype)
        counts = present.new_zeros(n, self.n_features).index_add_(1, self.slot_feature, present)
        return sums / counts.clamp_min(1).unsqueeze(2)

    @torch.no_grad()
    def observe(self, ids: Tensor, sign: int = 1) -> None:
        """Count the rows these records use (sign -1 takes a count back); nothing without --min-count."""
        if self.min_count > 1:
            seen = ids[ids >= 0]
            self.counts.index_add_(0, seen, torch.full_like(seen, sign, dtype=torch.int32))


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
    """The model contract: standardize, score, predict, weigh losses, and carry its own state.

    A subclass declared with `arch="name"` is an architecture: --arch name builds it, and the
    settings named in `uses` become its arguments (spec.args). That class is all a new one needs.
    """

    uses: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}  # of arguments a snapshot of an older release lacks

    def __init_subclass__(cls, arch: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if arch is not None:
            ARCHITECTURES[arch] = cls

    def __init__(self, spec: ModelSpec, category_dim: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.head = HEADS[spec.labels.task]()
        self.normalizer = Normalizer(spec.features.n_features, spec.scaling)
        features = spec.features
        self.categories = (
            CategoryTable(features, category_dim or features.embedding_dim)
            if features.category_features
            else None
        )

    @abstractmethod
    def scores(self, x: Tensor, categories: Tensor | None = None) -> Tensor:
        """Raw outputs [n, n_outputs] for standardized numbers [n, n_features] and the categories'
        vectors [n, n_categorical, dim] (None when the model has no categorical features)."""

    def forward(self, x: Tensor, ids: Tensor | None = None) -> Tensor:
        """Scores for raw numbers [n, n_features] and hashed category ids [n, slots] (records.py)."""
        return self.scores(self.normalizer(x), self.embed(ids))

    def embed(self, ids: Tensor | None) -> Tensor | None:
        """The categories' vectors [n, n_categorical, dim], or None without categorical features."""
        if self.categories is None:
            return None
        assert ids is not None, "a model with categorical features needs their ids"
        return self.categories(ids)

    @torch.no_grad()
    def predict_batch(self, x: Tensor, ids: Tensor | None = None) -> Prediction:
        return self.head.predict(self(x, ids))

    def loss(self, scores: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
        """Weighted mean loss of a batch."""
        return (self.head.loss(scores, labels) * weights).sum() / weights.sum().clamp_min(1e-12)

    def state(self) -> dict[str, Tensor]:
        """Weights and normalizer statistics as contiguous CPU tensors, ready for safetensors."""
        return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in self.state_dict().items()}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        expected = {name: tuple(t.shape) for name, t in self.state_dict().items()}
        _check_shapes(expected, tensors, self.spec.arch)
        self.load_state_dict(tensors)


class LinearModel(OnlineModel, arch="linear"):
    """Linear, logistic or softmax regression, by task."""

    def __init__(self, spec: ModelSpec) -> None:
        # a category's row holds its weight per output: the hashed one-hot part of the linear model
        super().__init__(spec, category_dim=spec.labels.n_outputs)
        self.linear = nn.Linear(spec.features.n_features, spec.labels.n_outputs)

    def scores(self, x: Tensor, categories: Tensor | None = None) -> Tensor:
        out = self.linear(x)
        return out if categories is None else out + categories.sum(dim=1)


class MLPModel(OnlineModel, arch="mlp"):
    """A ReLU multilayer perceptron with the task's output layer, and dropout if asked for."""

    uses = ("hidden", "dropout")
    defaults = {"dropout": 0.0}

    def __init__(self, spec: ModelSpec) -> None:
        # each category's row: its weight per output (the wide, linear part), then its embedding
        super().__init__(spec, category_dim=spec.features.embedding_dim + spec.labels.n_outputs)
        features = spec.features
        widths = [
            features.n_features + len(features.category_features) * features.embedding_dim,
            *spec.args["hidden"],
        ]
        dropout = spec.args.get("dropout", 0.0)
        layers: list[nn.Module] = []
        for n_in, n_out in itertools.pairwise(widths):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(widths[-1], spec.labels.n_outputs))
        self.layers = nn.Sequential(*layers)

    def scores(self, x: Tensor, categories: Tensor | None = None) -> Tensor:
        if categories is None:
            return self.layers(x)
        outputs = self.spec.labels.n_outputs
        deep = self.layers(torch.cat([x, categories[:, :, outputs:].flatten(1)], dim=1))
        return deep + categories[:, :, :outputs].sum(dim=1)


def known_architecture(arch: str) -> str:
    """`arch`, if an architecture is registered under that name (a setting: ConfigError if not)."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return arch


def architecture(arch: str) -> type[OnlineModel]:
    """The model class registered as `arch`."""
    if arch not in ARCHITECTURES:
        raise SnapshotMismatch(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def check_fits(spec: ModelSpec, tensors: dict[str, Tensor]) -> None:
    """SnapshotMismatch unless `tensors` have the shapes of a model of `spec`, found on the meta
    device: no weight is allocated, so a spec declaring a huge model costs nothing to refuse."""
    with torch.device("meta"):
        model = architecture(spec.arch)(spec)
    _check_shapes({name: tuple(t.shape) for name, t in model.state_dict().items()}, tensors, spec.arch)


def _check_shapes(expected: dict[str, tuple[int, ...]], tensors: dict[str, Tensor], arch: str) -> None:
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != found:
        differing = sorted(set(expected.items()) ^ set(found.items()))[:4]
        raise SnapshotMismatch(f"snapshot weights do not fit a {arch} model: {differing}")


def build_model(spec: ModelSpec) -> OnlineModel:
    """A freshly initialised model; the same spec (seed included) gives the same weights."""
    model_class = architecture(spec.arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return model_class(spec)
