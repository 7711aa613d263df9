"""Test-then-train on one micro-batch, with the optimizer, gradient safety and prequential scores.

Every batch is first predicted by the model as it stands (the prequential test), then learned
from. A batch whose loss or gradient is not finite leaves the model untouched.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from streamlearn.errors import ConfigError
from streamlearn.models import OnlineModel
from streamlearn.records import DecodedBatch

OPTIMIZERS: dict[str, Any] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}
WINDOWS = (1_000, 10_000)  # records, for the fading prequential averages
BOOST_FACTOR, BOOST_RECORDS = 3.0, 2_000  # --on-drift boost-lr: this much faster, for this many records


MODAL = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._NormBase)
FUSED = {"sgd", "adam", "adamw"}  # one kernel per step on CPU and CUDA instead of a loop in Python


def make_optimizer(
    name: str, model: OnlineModel, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    extra = {"fused": True} if name in FUSED else {}
    return OPTIMIZERS[name](model.parameters(), lr=lr, weight_decay=weight_decay, **extra)


def pick_device(requested: str) -> torch.device:
    """CUDA when asked for or (auto) when present; otherwise the CPU. Asked-for CUDA must exist."""
    if requested == "cuda" and not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (" without CUDA" if torch.version.cuda is None else "")
        raise ConfigError(f"--device cuda: no CUDA device is available ({build})")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class StepResult:
    """What one micro-batch did: its prequential (pre-update) scores and whether it was learned."""

    records: int
    loss: float  # weighted mean loss of the predictions made before learning
    correct: int | None  # classification only
    learned: bool  # False when the loss or gradient was not finite
    errors: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per record: 0/1 miss, or the loss


@dataclass
class Prequential:
    """Running prequential scores: totals since start and fading averages over WINDOWS records."""

    records: int = 0
    loss_sum: float = 0.0
    weight_sum: float = 0.0
    correct: int = 0
    faded_loss: dict[int, float] = field(default_factory=dict)
    faded_accuracy: dict[int, float] = field(default_factory=dict)

    def add(self, result: StepResult, weight_sum: float) -> None:
        self.records += result.records
        self.loss_sum += result.loss * weight_sum
        self.weight_sum += weight_sum
        for window in WINDOWS:
            keep = (1 - 1 / window) ** result.records
            self.faded_loss[window] = self._fade(self.faded_loss.get(window), result.loss, keep)
            if result.correct is not None:
                accuracy = result.correct / result.records
                self.faded_accuracy[window] = self._fade(self.faded_accuracy.get(window), accuracy, keep)
        if result.correct is not None:
            self.correct += result.correct

    @staticmethod
    def _fade(previous: float | None, value: float, keep: float) -> float:
        return value if previous is None else keep * previous + (1 - keep) * value

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.weight_sum if self.weight_sum else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.records if self.records else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "loss_sum": self.loss_sum,
            "weight_sum": self.weight_sum,
            "correct": self.correct,
            "faded_loss": {str(k): v for k, v in self.faded_loss.items()},
            "faded_accuracy": {str(k): v for k, v in self.faded_accuracy.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Prequential":
        # Releases before 0.1.1 could score an infinite loss, which JSON holds as null: start that
        # score afresh rather than refuse the snapshot.
        def number(value: Any) -> float:
            return 0.0 if value is None else float(value)

        return cls(
            records=int(data["records"]),
            loss_sum=number(data["loss_sum"]),
            weight_sum=number(data["weight_sum"]),
            correct=int(data["correct"]),
            faded_loss={int(k): float(v) for k, v in data.get("faded_loss", {}).items() if v is not None},
            faded_accuracy={
                int(k): float(v) for k, v in data.get("faded_accuracy", {}).items() if v is not None
            },
        )


class Trainer:
    """Owns a model, its optimizer and its prequential scores; learns one micro-batch at a time."""

    def __init__(
        self,
        model: OnlineModel,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        clip_grad_norm: float | None = None,
    ) -> None:
        self.model = model.to(device)
        self.optimizer = optimizer
        self.device = device
        self.clip_grad_norm = clip_grad_norm
        self.scores = Prequential()
        self.skipped_batches = 0
        self.boost_left = 0  # records left at a boosted learning rate after a drift
        self.classification = model.spec.labels.task != "regression"
        # Only dropout and batch norm behave differently in training; without them, switching
        # modes each step would cost a walk over every module for nothing.
        self.modal = any(isinstance(m, MODAL) for m in model.modules())

    def step(self, batch: DecodedBatch) -> StepResult:
        x, y, w = (self._to_device(a) for a in (batch.features, batch.labels, batch.weights))
        model = self.model

        # 1. test: predict with the model as it stands, before it sees these labels
        if self.modal:
            model.eval()
        with torch.no_grad():
            before = model(x)
            test_loss = model.loss(before, y, w)
            if self.classification:
                misses = (model.head.predict(before).values != y.long()).float()
                correct = len(batch) - misses.sum()
            else:
                misses, correct = model.head.loss(before, y), None

        # 2. learn the feature scale, then take one gradient step on the batch
        saved_normalizer = {k: v.clone() for k, v in model.normalizer.state_dict().items()}
        try:
            model.normalizer.update(x)
            if self.modal:
                model.train()
            self.optimizer.zero_grad(set_to_none=True)
            loss = model.loss(model(x), y, w)
            loss.backward()

            # 3. clip, and refuse to step on a non-finite loss or gradient (one device sync per batch)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            if self.clip_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(model.parameters(), self.clip_grad_norm, norm)
            stats = torch.stack(
                [test_loss, loss.detach(), norm, w.sum(), *(() if correct is None else (correct,))]
            )
            test_value, loss_value, norm_value, weight_sum, *rest = stats.tolist()
        except BaseException:  # nothing of a step that raised stays: the batch may be tried again
            model.normalizer.load_state_dict(saved_normalizer)
            self.optimizer.zero_grad(set_to_none=True)
            raise
        learned = all(map(math.isfinite, (test_value, loss_value, norm_value)))
        if learned:
            self.optimizer.step()
        else:
            model.normalizer.load_state_dict(saved_normalizer)
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_batches += 1

        self._decay_boost(len(batch))

        # 4. score: the prequential loss and accuracy of step 1
        errors = misses.cpu().numpy()
        result = StepResult(len(batch), test_value, int(rest[0]) if rest else None, learned, errors)
        if learned:  # a skipped batch is scored when its records are learned (or not at all)
            self.scores.add(result, weight_sum)
        return result

    def respond_to_drift(self, action: str) -> None:
        """React to a concept drift: boost-lr, reset-optimizer or reset-model (none: nothing)."""
        if action == "reset-optimizer":
            self.optimizer.state.clear()  # forget moments and step counts; the weights stay
        elif action == "boost-lr":
            self.boost_left = BOOST_RECORDS
            for group in self.optimizer.param_groups:
                group.setdefault("base_lr", group["lr"])
                group["lr"] = group["base_lr"] * BOOST_FACTOR
        elif action == "reset-model":
            with torch.no_grad():
                for module in self.model.modules():
                    if isinstance(module, torch.nn.Linear):
                        module.reset_parameters()  # the normalizer keeps its statistics
            self.optimizer.state.clear()

    def _decay_boost(self, records: int) -> None:
        if self.boost_left <= 0:
            return
        self.boost_left -= records
        if self.boost_left <= 0:
            for group in self.optimizer.param_groups:
                group["lr"] = group.pop("base_lr", group["lr"])

    def _to_device(self, array: np.ndarray) -> Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    # -- state for snapshots ------------------------------------------------------------------

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Model and optimizer tensors (CPU copies) plus the JSON-able rest of the training state."""
        tensors = {f"model.{name}": t for name, t in self.model.state().items()}
        optim = self.optimizer.state_dict()
        scalars: dict[str, Any] = {}
        for index, slots in optim["state"].items():
            for slot, value in slots.items():
                if isinstance(value, Tensor):
                    tensors[f"optim.{index}.{slot}"] = value.detach().to("cpu", copy=True).contiguous()
                else:
                    scalars[f"{index}.{slot}"] = value
        meta = {
            "optimizer": {"param_groups": optim["param_groups"], "scalars": scalars},
            "prequential": self.scores.to_dict(),
            "skipped_batches": self.skipped_batches,
        }
        return tensors, meta

    def restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Load a state written by state(); the model part must fit this trainer's architecture."""
        self.model.load_state({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        slots: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                index, slot = key[6:].split(".", 1)
                slots.setdefault(int(index), {})[slot] = (
                    value  # load_state_dict moves it to the params' device
                )
        for key, value in meta["optimizer"]["scalars"].items():
            index, slot = key.split(".", 1)
            slots.setdefault(int(index), {})[slot] = value
        self.optimizer.load_state_dict({"state": slots, "param_groups": meta["optimizer"]["param_groups"]})
        self.scores = Prequential.from_dict(meta["prequential"])
        self.skipped_batches = int(meta.get("skipped_batches", 0))
