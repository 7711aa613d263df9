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
SCHEDULES = ("constant", "inverse-sqrt", "cyclic", "cosine-restarts")


@dataclass(frozen=True)
class OptimizerSettings:
    """What make_optimizer needs; the trainer's settings of the same names."""

    optimizer: str = "adam"
    lr: float = 0.005
    weight_decay: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False

    @classmethod
    def of(cls, settings: Any) -> "OptimizerSettings":
        return cls(*(getattr(settings, name) for name in cls.__dataclass_fields__))


def make_optimizer(model: OnlineModel, settings: OptimizerSettings) -> torch.optim.Optimizer:
    """The optimizer over the model's learnable parameters, by --optimizer.

    Weight decay is decoupled (AdamW's) for adamw and plain L2 for the others, as torch has it;
    momentum and Nesterov apply to sgd (momentum also to rmsprop).
    """
    s = settings
    params = [p for p in model.parameters() if p.requires_grad]  # frozen layers stay as they are
    common: dict[str, Any] = {"lr": s.lr, "weight_decay": s.weight_decay}
    if s.optimizer in FUSED:
        common["fused"] = True
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=s.momentum, nesterov=s.nesterov, **common)
    if s.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, momentum=s.momentum, **common)
    optimizer_class = {
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "adagrad": torch.optim.Adagrad,
        "radam": torch.optim.RAdam,
    }[s.optimizer]
    return optimizer_class(params, **common)


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
