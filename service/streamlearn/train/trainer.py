"""Test-then-train on one micro-batch, with the optimizer, gradient safety and prequential scores.

Every batch is first predicted by the model as it stands (the prequential test), then learned
from. A batch whose loss or gradient is not finite leaves the model untouched.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from streamlearn.decoding import DecodedBatch
from streamlearn.errors import ConfigError, SnapshotMismatch
from streamlearn.models import OnlineModel
from streamlearn.snapshots.tensors import unprefixed
from streamlearn.train.lockstep import Reducer
from streamlearn.train.losses import Loss, LossSettings
from streamlearn.train.optim import Optimizers, Schedule
from streamlearn.train.replay import Reservoir

WINDOWS = (1_000, 10_000)  # records, for the fading prequential averages
BOOST_FACTOR, BOOST_RECORDS = 3.0, 2_000  # --on-drift boost-lr: this much faster, for this many records
STEP_POLICIES = ("auto", "small", "large")
# A step of m records is taken at the rate times sqrt(m / sub_batch), at most this: the square-root
# scaling rule (Malladi et al. 2022, for Adam), so fewer, larger steps lose less of what small
# steps learn (one step per 256 records: River's Agrawal 0.67 -> 0.76, sea 0.950 -> 0.957).
LARGE_STEP_LR_CAP = 4.0

MODAL = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._NormBase)


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

    records: int  # records learned: the first `records` of the batch
    loss: float  # weighted mean loss of their predictions, made before learning
    correct: int | None  # classification only
    learned: bool  # False when some records were not learned (a loss or gradient not finite)
    errors: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per record: 0/1 miss, or the loss
    steps: int = 1  # optimizer steps taken


def _records(batch: DecodedBatch, part: slice) -> tuple[np.ndarray, ...]:
    """Part of a batch as the arrays a reservoir keeps: features, labels, weights (, categories)."""
    arrays = (batch.features[part], batch.labels[part], batch.weights[part])
    return arrays if batch.categories is None else (*arrays, batch.categories[part])


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
    """Owns a model, its optimizer and its prequential scores; learns one micro-batch at a time.

    A micro-batch is tested as a whole, then learned in optimizer steps of `sub_batch` records
    (the step policy, README "How the trainer learns"): `small` always takes those steps, `large`
    one step per micro-batch, and `auto` takes small steps until `pressed()` says the next
    micro-batch is already waiting, then learns the rest in one step, so the trainer spends on
    learning the time the stream leaves and no more.
    """

    def __init__(
        self,
        model: OnlineModel,
        optimizer: Optimizers,
        device: torch.device,
        clip_grad_norm: float | None = None,
        *,
        loss: Loss | None = None,
        schedule: Schedule | None = None,
        policy: str = "large",
        sub_batch: int = 8,
        l1: float = 0.0,
        replay: Reservoir | None = None,
        reducer: Reducer | None = None,
    ) -> None:
        self.model = model.to(device)
        self.optimizer = optimizer
        self.device = device
        self.clip_grad_norm = clip_grad_norm
        labels = model.spec.labels
        self.loss = loss or Loss(labels.task, labels.n_outputs, LossSettings(), device)
        self.schedule = schedule or Schedule()
        self.policy = policy
        self.sub_batch = sub_batch
        self.l1 = l1
        self.replay = replay
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.scores = Prequential()
        self.skipped_batches = 0
        self.steps = 0  # optimizer steps taken
        self.learned = 0  # records learned: the clock of the learning-rate schedule
        self.boost_left = 0  # records left at a boosted learning rate after a drift
        self.classification = labels.task != "regression"
        # Only dropout and batch norm behave differently in training; without them, switching
        # modes each step would cost a walk over every module for nothing.
        self.modal = any(isinstance(m, MODAL) for m in model.modules())
        self.parameters = list(model.parameters())
        self.reducer = reducer  # many ranks: each computes a share of a step, the gradients are summed
        self.sparse = {
            id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse
        }
        # L1: weights only, and not the category table (a penalty on every row is no sparse step)
        self.penalized = [
            p for n, p in model.named_parameters() if p.dim() > 1 and not n.startswith("categories.")
        ]

    def step(self, batch: DecodedBatch, pressed: Callable[[], bool] | None = None) -> StepResult:
        """Test the batch, then learn it; `pressed()`: whether the next batch is already waiting.

        The result's `records` are the records learned: all of them, or (when a step's loss or
        gradient is not finite, or a step raised after others were taken) the records before
        that step. A failing step is never applied, so the model holds exactly those records.
        """
        x, y, w = (self._to_device(a) for a in (batch.features, batch.labels, batch.weights))
        c = self._to_device(batch.categories) if batch.categories is not None else None
        model = self.model

        # 1. test: predict with the model as it stands, before it sees these labels
        if self.modal:
            model.eval()
        with torch.no_grad():
            before = model(x, c)
            test_losses = model.head.loss(before, y) * w
            if self.classification:
                misses = (model.head.predict(before).values != y.long()).float()
            else:
                misses = model.head.loss(before, y)
        test_total = test_losses.sum().item()  # one device sync: a non-finite test loss skips the batch
        n, learned, steps = len(batch), 0, 0
        if math.isfinite(test_total):
            # 2. learn: the feature scale (and category counts) from the whole batch, then the
            # model, step by step
            normalizer = model.normalizer
            saved = normalizer.stats()
            try:
                normalizer.update(x)
                self._observe(c, slice(0, n))
            except BaseException:
                normalizer.set_stats(saved)
                raise
            while learned < n:
                end = self._step_end(learned, n, pressed)
                part = slice(learned, end)
                try:
                    if not self._learn(
                        x[part], None if c is None else c[part], y[part], w[part], batch, part
                    ):
                        break
                except Exception:
                    if learned == 0:
                        raise  # nothing was learned: the batch may be tried again as it is
                    break  # keep what was learned; the rest is tried again (and raises there)
                learned, steps = end, steps + 1
            if learned < n:  # the feature scale too holds exactly the records learned
                normalizer.set_stats(saved)
                self._observe(c, slice(learned, n), -1)
                if learned:
                    normalizer.update(x[:learned])
        if learned < n:
            self.skipped_batches += 1

        # 3. score the records learned: the prequential loss and accuracy of step 1
        errors = misses.cpu().numpy()[:learned]
        weights = batch.weights[:learned]
        weight_sum = float(weights.sum())
        loss_value = (
            float(test_losses[:learned].sum().item()) / max(weight_sum, 1e-12) if learned else math.nan
        )
        correct = int(learned - errors.sum()) if self.classification else None
        result = StepResult(learned, loss_value, correct, learned == n, errors, steps)
        if learned:  # records not learned are scored when they are (or never)
            self.scores.add(result, weight_sum)
        return result

    def _step_end(self, start: int, n: int, pressed: Callable[[], bool] | None) -> int:
        """Where the next optimizer step ends, by the step policy."""
        if self.policy == "large" or (self.policy == "auto" and pressed is not None and pressed()):
            return n
        return min(n, start + self.sub_batch)

    def _observe(self, c: Tensor | None, part: slice, sign: int = 1) -> None:
        """Count (or, sign -1, take back) the category rows of these records (--min-count)."""
        if c is not None and self.model.categories is not None:
            self.model.categories.observe(c[part], sign)

    def _learn(
        self, x: Tensor, c: Tensor | None, y: Tensor, w: Tensor, batch: DecodedBatch, part: slice
    ) -> bool:
        """One optimizer step on these records (`part` of the batch), and replayed ones if asked.

        False, and nothing changed, when the step's loss or gradient is not finite.
        """
        model = self.model
        try:
            replayed = self.replay.sample(len(y)) if self.replay is not None else None
            if replayed is not None:
                old_x, old_y, old_w = (self._to_device(a) for a in replayed[:3])
                x, y, w = torch.cat([x, old_x]), torch.cat([y, old_y]), torch.cat([w, old_w])
                if c is not None:
                    c = torch.cat([c, self._to_device(replayed[3])])
            if self.modal:
                model.train()
            self.optimizer.zero_grad(set_to_none=True)
            weights = self.loss.weights(y, w)
            if self.reducer is None:
                loss = (self.loss.per_record(model(x, c), y) * weights).sum() / weights.sum().clamp_min(1e-12)
                if self.l1:
                    loss = loss + self.l1 * sum(p.abs().sum() for p in self.penalized)
                loss.backward()
            else:
                loss = self._learn_share(x, c, y, weights, self.reducer)
            # clip, and refuse to step on a non-finite loss or gradient (one device sync per step)
            norm = self._clip_gradients()
            finite = bool(torch.isfinite(loss.detach() + norm).item())
        except BaseException:  # nothing of a step that raised stays
            self.optimizer.zero_grad(set_to_none=True)
            raise
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return False
        fresh = part.stop - part.start
        records = _records(batch, part)
        if self.replay is not None:
            self.replay.reserve(*records)  # what may fail, before the step: after it, nothing may
        self._set_lr(fresh)
        self.optimizer.step()
        self.loss.learned(y[:fresh])
        if self.replay is not None:
            self.replay.add(*records)
        self.steps += 1
        self.learned += fresh
        if self.boost_left > 0:
            self.boost_left -= fresh
        return True

    def _learn_share(
        self, x: Tensor, c: Tensor | None, y: Tensor, weights: Tensor, reducer: Reducer
    ) -> Tensor:
        """This rank's share of a step's forward and backward, then the gradients summed over the
        ranks: the gradient of the step's global weighted mean loss, the same on every rank. A
        rank with no share contributes zeros; one whose share raised makes every rank raise."""
        share = reducer.share(len(y))
        loss = torch.zeros((), device=self.device)
        raised = False
        try:
            if share.stop > share.start:
                if self.modal:  # dropout: draws of this rank's own for this step (see _rank_draws)
                    with self._rank_draws(reducer.rank):
                        out = self.model(x[share], None if c is None else c[share])
                else:
                    out = self.model(x[share], None if c is None else c[share])
                part = self.loss.per_record(out, y[share])
                loss = (part * weights[share]).sum() / weights.sum().clamp_min(1e-12)
            if self.l1 and reducer.rank == 0:  # once, not once per rank
                loss = loss + self.l1 * sum(p.abs().sum() for p in self.penalized)
            if loss.requires_grad:
                loss.backward()
        except Exception:  # every rank must still meet in the reduction below
            self.optimizer.zero_grad(set_to_none=True)
            raised = True
        return reducer.reduce(self.parameters, self.sparse, loss, raised)

    @contextmanager
    def _rank_draws(self, rank: int) -> Iterator[None]:
        """Dropout's draws for a rank's share of a step, from a generator seeded by the rank and the
        step, so that torch's global generator (which a model reset draws from) stays the same on
        every rank, and a run resumed from a snapshot draws what the uninterrupted one drew."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.steps * 1_000_003 + rank)
            yield

    def _clip_gradients(self) -> Tensor:
        """The gradients' total norm, after clipping them to --clip-grad-norm if set.

        A category table's gradient is sparse (the rows touched, a row once per use): it is
        summed per row first, so its norm is that of the step it makes.
        """
        dense: list[torch.nn.Parameter] = []
        grads: list[Tensor] = []
        sparse: list[Tensor] = []
        for p in self.parameters:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                p.grad = p.grad.coalesce()
                sparse.append(p.grad)
                grads.append(p.grad.values())
            else:
                dense.append(p)
                grads.append(p.grad)
        norm = torch.nn.utils.get_total_norm(grads)
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(dense, self.clip_grad_norm, norm)
            coefficient = (self.clip_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for grad in sparse:
                grad.values().mul_(coefficient)
        return norm

    def _set_lr(self, records: int) -> None:
        """The rate of a step of `records` fresh records: scheduled, scaled by size, boosted."""
        factor = self.schedule.factor(self.learned) * (BOOST_FACTOR if self.boost_left > 0 else 1.0)
        if records > self.sub_batch:
            factor *= min(math.sqrt(records / self.sub_batch), LARGE_STEP_LR_CAP)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def respond_to_drift(self, action: str) -> None:
        """React to a concept drift: boost-lr, reset-optimizer or reset-model (none: nothing)."""
        if action == "reset-optimizer":
            self.optimizer.reset()  # forget moments and step counts; the weights stay
        elif action == "boost-lr":
            self.boost_left = BOOST_RECORDS
        elif action == "reset-model":
            with torch.no_grad():
                for module in self.model.modules():
                    learns = all(p.requires_grad for p in module.parameters())
                    if isinstance(module, torch.nn.Linear) and learns:  # frozen layers stay
                        module.reset_parameters()  # the normalizer keeps its statistics
                table = self.model.categories
                if table is not None and table.table.weight.requires_grad:
                    table.table.weight.zero_()  # every category back to "never learned"
            self.optimizer.reset()

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
        tensors.update({f"loss.{name}": t for name, t in self.loss.state().items()})
        if self.modal:  # dropout draws from torch's generator: resume it where it stood
            tensors["rng.cpu"] = torch.get_rng_state()
            if self.device.type == "cuda":
                tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        replay: dict[str, Any] | None = None
        if self.replay is not None:
            replay_tensors, replay = self.replay.state()
            tensors.update({f"replay.{name}": t for name, t in replay_tensors.items()})
        meta = {
            "optimizer": {"param_groups": optim["param_groups"], "scalars": scalars},
            "prequential": self.scores.to_dict(),
            "skipped_batches": self.skipped_batches,
            "steps": self.steps,
            "records_learned": self.learned,
            "boost_left": self.boost_left,
            "replay": replay,
            "frozen": sorted(name for name, p in self.model.named_parameters() if not p.requires_grad),
            "optimizers": self.optimizer.names,
        }
        return tensors, meta

    def restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Load a state written by state(); the model part must fit this trainer's architecture.

        The optimizer's state is matched to parameters by position, so the same layers must be
        frozen as when it was written.
        """
        frozen = sorted(name for name, p in self.model.named_parameters() if not p.requires_grad)
        if meta.get("frozen", []) != frozen:
            raise SnapshotMismatch(
                f"the snapshot was learned with frozen parameters {meta.get('frozen', [])}, not {frozen}: "
                "keep --freeze as it was, or use another --model-name"
            )
        saved = meta.get("optimizers", self.optimizer.names)  # older snapshots did not say
        if saved != self.optimizer.names:
            raise SnapshotMismatch(
                f"the snapshot was learned with the optimizers {saved}, not {self.optimizer.names}: "
                "keep --optimizer and --embedding-optimizer as they were, or use another --model-name"
            )
        self.model.load_state(unprefixed(tensors))
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
        self.steps = int(meta.get("steps", 0))
        self.learned = int(meta.get("records_learned", self.scores.records))
        self.boost_left = int(meta.get("boost_left", 0))
        self.loss.load_state({k[5:]: v for k, v in tensors.items() if k.startswith("loss.")})
        if self.modal and "rng.cpu" in tensors:
            torch.set_rng_state(tensors["rng.cpu"])
            if self.device.type == "cuda" and "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if self.replay is not None and meta.get("replay"):
            replayed = {k[7:]: v for k, v in tensors.items() if k.startswith("replay.")}
            self.replay.load_state(replayed, meta["replay"])
