"""The optimizer toolbox: optimizers by name, and learning-rate schedules counted in records.

Schedules count records learned, not optimizer steps, because the number of steps a micro-batch
takes depends on how much time the stream leaves (the step policy, trainer.py): the same stream gets the same
learning rates whatever the pace it arrived at.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch

from streamlearn.models import OnlineModel

FUSED = {"sgd", "adam", "adamw"}  # one kernel per step on CPU and CUDA instead of a loop in Python
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "radam")
# The category table's rate by its optimizer: rows are updated only when their category occurs, so
# they take larger steps than the dense layers (payments stream, docs/benchmarks.md: adagrad at
# 0.5 gave the lowest log loss of 0.1, 0.2, 0.5 and 1.0; sparse-adam at 0.02 of 0.005, 0.02, 0.05).
EMBEDDING_LR = {"adagrad": 0.5, "sparse-adam": 0.02, "sgd": 0.5}
SCHEDULES = ("constant", "inverse-sqrt", "cyclic", "cosine-restarts")


@dataclass(frozen=True)
class OptimizerSettings:
    """What make_optimizer needs; the trainer's settings of the same names."""

    optimizer: str = "adam"
    lr: float = 0.005
    weight_decay: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    embedding_optimizer: str = "adagrad"
    embedding_lr: float | None = None  # None: EMBEDDING_LR of the embedding optimizer

    @classmethod
    def of(cls, settings: Any) -> "OptimizerSettings":
        return cls(*(getattr(settings, name) for name in cls.__dataclass_fields__))


def make_optimizer(model: OnlineModel, settings: OptimizerSettings) -> "Optimizers":
    """The optimizers of the model's learnable parameters: by --optimizer for the dense ones, and a
    sparse-capable one for a category table (sparse_optimizer).

    Weight decay is decoupled (AdamW's) for adamw and plain L2 for the others, as torch has it;
    momentum and Nesterov apply to sgd (momentum also to rmsprop).
    """
    s = settings
    table = model.categories.table.weight if model.categories is not None else None
    params = [p for p in model.parameters() if p.requires_grad and p is not table]  # frozen layers stay
    common: dict[str, Any] = {"lr": s.lr, "weight_decay": s.weight_decay}
    if s.optimizer in FUSED:
        common["fused"] = True
    dense: torch.optim.Optimizer
    if s.optimizer == "sgd":
        dense = torch.optim.SGD(params, momentum=s.momentum, nesterov=s.nesterov, **common)
    elif s.optimizer == "rmsprop":
        dense = torch.optim.RMSprop(params, momentum=s.momentum, **common)
    else:
        optimizer_class = {
            "adam": torch.optim.Adam,
            "adamw": torch.optim.AdamW,
            "adagrad": torch.optim.Adagrad,
            "radam": torch.optim.RAdam,
        }[s.optimizer]
        dense = optimizer_class(params, **common)
    parts = [dense]
    if table is not None and table.requires_grad:
        parts.append(sparse_optimizer(table, s))
    return Optimizers(parts)


def sparse_optimizer(table: torch.Tensor, settings: OptimizerSettings) -> torch.optim.Optimizer:
    """The category table's optimizer (--embedding-optimizer), which touches only the rows a
    step's gradient holds: adagrad (a rate per weight that shrinks as its gradients add up, as
    Vowpal Wabbit's updates), sparse-adam (Adam on the rows touched, "lazy Adam") or plain sgd
    (momentum would update every row). No weight decay: it would shrink every row on every step.
    """
    s = settings
    # torch's default (no invariant checks on sparse tensors it builds itself), said explicitly:
    # left implicit, Adagrad's first sparse step warns about it.
    torch.sparse.check_sparse_tensor_invariants.disable()
    lr = s.embedding_lr if s.embedding_lr is not None else EMBEDDING_LR[s.embedding_optimizer]
    if s.embedding_optimizer == "sgd":
        return torch.optim.SGD([table], lr=lr)
    if s.embedding_optimizer == "sparse-adam":
        return torch.optim.SparseAdam([table], lr=lr)
    return torch.optim.Adagrad([table], lr=lr)


class Optimizers:
    """Several optimizers over disjoint parameters, used as one: the dense part and the table.

    state_dict() numbers the parameters across all of them in order, as one torch optimizer
    would, so a model without a table keeps the layout of a single optimizer's state.
    """

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self.parts = parts

    @property
    def names(self) -> list[str]:
        """The optimizers' class names, in order (a snapshot's state fits only the same ones)."""
        return [type(part).__name__ for part in self.parts]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts for group in part.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def reset(self) -> None:
        """Forget moments and step counts; the parameters stay."""
        for part in self.parts:
            part.state.clear()

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for part in self.parts:
            saved = part.state_dict()
            state.update({index + offset: slots for index, slots in saved["state"].items()})
            groups += [
                {**group, "params": [i + offset for i in group["params"]]} for group in saved["param_groups"]
            ]
            offset += sum(len(group["params"]) for group in saved["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        groups = list(saved["param_groups"])
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"the saved optimizer has {len(groups)} parameter groups, not {len(self.param_groups)}"
            )
        offset = 0
        for part in self.parts:
            mine, groups = groups[: len(part.param_groups)], groups[len(part.param_groups) :]
            count = sum(len(group["params"]) for group in mine)
            state = {i - offset: slots for i, slots in saved["state"].items() if offset <= i < offset + count}
            groups_of_part = [{**group, "params": [i - offset for i in group["params"]]} for group in mine]
            part.load_state_dict({"state": state, "param_groups": groups_of_part})
            offset += count


@dataclass(frozen=True)
class Schedule:
    """The learning rate's factor after `records` records, by --lr-schedule.

    - constant: 1.
    - inverse-sqrt: 1 / sqrt(1 + records / period); halves by 3 periods.
    - cyclic (triangular, Smith 2017): from `floor` up to 1 and back down every 2 periods.
    - cosine-restarts (SGDR, Loshchilov and Hutter 2017): from 1 down to `floor` along a half
      cosine over each period, then back to 1.
    """

    name: str = "constant"
    period: int = 10_000  # records
    floor: float = 0.1  # the smallest factor of cyclic and cosine-restarts

    def factor(self, records: int) -> float:
        phase = records / self.period
        if self.name == "inverse-sqrt":
            return 1 / math.sqrt(1 + phase)
        if self.name == "cyclic":
            rise = 1 - abs(phase % 2 - 1)  # 0 at the start of each cycle, 1 halfway
            return self.floor + (1 - self.floor) * rise
        if self.name == "cosine-restarts":
            return self.floor + (1 - self.floor) * (1 + math.cos(math.pi * (phase % 1))) / 2
        return 1.0
