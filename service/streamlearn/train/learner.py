"""The model being learned and what watches it: test-then-train steps, drift, and snapshot content.

The model is built once the feature vector is known (from the first valid record, or from a
snapshot), so the loop needs no knowledge of architectures, optimizers or drift detectors.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from streamlearn.config import TrainSettings
from streamlearn.decoding import DecodedBatch
from streamlearn.errors import ConfigError, SnapshotMismatch
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import FeatureKinds, FeatureSpec, LabelSpec, feature_kinds
from streamlearn.snapshots import Snapshot, SnapshotContent
from streamlearn.snapshots.tensors import unprefixed
from streamlearn.train.checkpoint import snapshot_content
from streamlearn.train.drift import DriftMonitor
from streamlearn.train.lockstep import Reducer
from streamlearn.train.losses import Loss, LossSettings
from streamlearn.train.optim import OptimizerSettings, Schedule, make_optimizer
from streamlearn.train.partitions import Offsets
from streamlearn.train.replay import Reservoir
from streamlearn.train.telemetry import Telemetry
from streamlearn.train.trainer import Trainer
from streamlearn.train.warmstart import freeze, warm_start

log = logging.getLogger("streamlearn.train")

# The drift detectors see the records learned in chunks of at least this many: a detection comes
# at most this many records late, and watching costs a fraction of a small model's step.
DRIFT_RECORDS = 1024
UNWATCHED = ("features", "labels", "errors", "categories")  # what the detectors are fed, per record


def _categories_mismatch(features: FeatureSpec, kinds: FeatureKinds) -> str | None:
    """Why a snapshot's categorical features cannot go on under these settings, or None."""
    if not features.category_features:
        return None
    for name in ("hash_buckets", "max_categories", "embedding_dim", "min_count"):
        learned, wanted = getattr(features, name), getattr(kinds, name)
        if learned != wanted:
            return f"learned with --{name.replace('_', '-')} {learned}, not {wanted}"
    for kind in ("categorical", "multi_valued"):
        if undeclared := sorted(set(getattr(kinds, kind)) - set(getattr(features, kind))):
            return f"learned without {undeclared[0]!r} as a {kind.replace('_', '-')} feature"
    return None


class Learner:
    """One model, its optimizer and its drift detectors, learning decoded micro-batches."""

    def __init__(
        self,
        settings: TrainSettings,
        labels: LabelSpec,
        device: torch.device,
        telemetry: Telemetry,
        reducer: Reducer | None = None,
    ) -> None:
        self.settings = settings
        self.labels = labels
        self.device = device
        self.telemetry = telemetry
        self.reducer = reducer  # many ranks: the optimizer steps are split over them
        self.trainer: Trainer | None = None  # built once the feature vector is known
        self.drift: DriftMonitor | None = None
        self.events: list[dict[str, Any]] = []  # the newest drift detections, kept in snapshots
        self.records_learned = 0
        self.unwatched: list[tuple[Any, ...]] = []  # learned, not yet seen by the drift detectors (UNWATCHED)
        self.origin: dict[str, Any] | None = None  # the model a warm start began from

    def restore(self, snapshot: Snapshot, features: FeatureSpec | None) -> FeatureSpec | None:
        """Continue from a snapshot; the feature vector it fixes (None before its first record)."""
        meta = snapshot.meta
        self.records_learned = meta.records_trained
        if meta.model is None:  # written before the first valid record
            return None
        spec = ModelSpec.from_dict(meta.model)
        s = self.settings
        wanted = ModelSpec.create(self.labels, features or FeatureSpec(0), s.arch, s, s.seed)
        mismatch = wanted.mismatch(spec) or _categories_mismatch(spec.features, feature_kinds(s))
        if mismatch is not None:
            raise SnapshotMismatch(
                f"snapshots of model {s.model_name!r} in {s.snapshot_dir} are {mismatch}: "
                "use another --model-name or --snapshot-dir"
            )
        if spec.scaling != wanted.scaling:  # a preprocessing rule, not a shape: the settings win
            log.info("normalizer scaling %s (the snapshot's: %s)", wanted.scaling, spec.scaling)
        self._build(replace(spec, scaling=wanted.scaling), fresh=False)
        self.origin = meta.origin
        assert self.trainer is not None
        assert meta.training is not None  # written with every model
        self.trainer.restore(snapshot.tensors, meta.training)
        self._restore_drift(snapshot)
        return spec.features

    def learn(
        self, batch: DecodedBatch, features: FeatureSpec, pressed: Callable[[], bool] | None = None
    ) -> int:
        """Test, then train, then watch for drift: one micro-batch of valid records.

        Returns how many of the batch's records were learned, its first ones: fewer than all
        when a step's loss or gradient was not finite (the model then holds exactly those). An
        exception before any record was learned leaves the model as it was; one from watching
        (scores, drift) is logged and never undoes or repeats the step. `pressed()` tells the
        step policy whether the next micro-batch is already waiting.
        """
        if self.trainer is None:
            s = self.settings
            try:
                self._build(ModelSpec.create(self.labels, features, s.arch, s, s.seed), fresh=True)
            except ConfigError:
                raise
            except Exception as exc:  # no record's fault: the trainer cannot start learning
                raise ConfigError(f"the model cannot be built: {type(exc).__name__}: {exc}") from exc
        assert self.trainer is not None
        m = self.telemetry.metrics
        with m.train_step.time():
            result = self.trainer.step(batch, pressed)
        m.batch_records.observe(len(batch))
        m.optimizer_steps.inc(result.steps)
        if not result.learned:
            m.batches_skipped.inc()
        if not result.records:
            return 0
        self.records_learned += result.records
        m.records_trained.inc(result.records)
        try:
            self.telemetry.scores(self.trainer)
            self._watch_drift(batch.head(result.records), result.errors)
        except Exception as exc:  # monitoring must never make a learned batch be learned again
            self.telemetry.limited.log(logging.ERROR, "watch", "scoring or drift watch failed", exc_info=exc)
        return result.records

    def content(self, offsets: Offsets) -> tuple[dict[str, torch.Tensor], SnapshotContent]:
        """What a checkpoint holds: the model's state, the offsets learned to, drift, the settings."""
        config = self.settings.model_dump(mode="json", exclude={"kafka"})  # never the credentials
        tensors, content = snapshot_content(self.trainer, self.records_learned, offsets, config)
        if self.drift is not None:
            arrays, state = self.drift.state()
            if self.unwatched:  # learned records the detectors have not seen yet
                for name, parts in zip(UNWATCHED, zip(*self.unwatched, strict=True), strict=False):
                    arrays[f"unwatched.{name}"] = np.concatenate(parts)
            tensors = {
                **tensors,
                **{f"drift.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
            }
            drift = {**self.drift.to_dict(), "events": self.events, "state": state}
            content = content.model_copy(update={"drift": drift})
        if self.origin is not None:
            content = content.model_copy(update={"origin": self.origin})
        return tensors, content

    def _restore_drift(self, snapshot: Snapshot) -> None:
        """The detectors as they were (snapshots of earlier releases hold a summary: they warm up)."""
        drift = snapshot.meta.drift or {}
        if self.drift is None or "state" not in drift:
            return
        arrays = {k: v.numpy() for k, v in unprefixed(snapshot.tensors, "drift.").items()}
        self.drift.load_state(arrays, drift["state"])
        self.events = list(drift.get("events", []))
        if "unwatched.labels" in arrays:
            self.unwatched = [
                tuple(arrays[f"unwatched.{name}"] for name in UNWATCHED if f"unwatched.{name}" in arrays)
            ]

    def _build(self, spec: ModelSpec, fresh: bool) -> None:
        """The model, its optimizer and detectors; a fresh one starts from --init-from if given."""
        s = self.settings
        model = build_model(spec)
        if fresh:
            torch.manual_seed(s.seed)  # dropout's draws; a snapshot carries the generator on
        if fresh and s.init_from:
            self.origin = warm_start(model, s.init_from)
        freeze(model, s.freeze)
        optimizer = make_optimizer(model, OptimizerSettings.of(s))
        labels = spec.labels
        self.trainer = Trainer(
            model,
            optimizer,
            self.device,
            s.clip_grad_norm,
            loss=Loss(labels.task, labels.n_outputs, LossSettings.of(s), self.device),
            schedule=Schedule(s.lr_schedule, s.lr_schedule_records, s.lr_schedule_floor),
            policy="small" if s.step_policy == "auto" and s.deterministic else s.step_policy,
            sub_batch=s.sub_batch_size,
            l1=s.l1,
            replay=Reservoir(s.replay_records, s.replay_ratio, s.seed) if s.replay_records else None,
            reducer=self.reducer,
        )
        features = spec.features
        names = list(features.names) or [f"f{i}" for i in range(features.n_features)]
        task, outputs = spec.labels.task, spec.labels.n_outputs
        categories = (features.category_features, features.slot_features, features.hash_buckets)
        self.drift = DriftMonitor(
            names, task, outputs, s.drift_psi_threshold, s.drift_window, categories=categories
        )

    def _watch_drift(self, batch: DecodedBatch, errors: Any) -> None:
        """Feed the drift detectors, DRIFT_RECORDS records at a time: their cost is per call."""
        assert self.drift is not None and self.trainer is not None
        watched = (batch.features, batch.labels, errors)
        self.unwatched.append(watched if batch.categories is None else (*watched, batch.categories))
        if sum(len(parts[1]) for parts in self.unwatched) < DRIFT_RECORDS:
            return
        arrays = [np.concatenate(parts) for parts in zip(*self.unwatched, strict=True)]
        self.unwatched = []
        response = self.settings.on_drift
        report = self.drift.update(*arrays)
        event = None
        if report.detected:
            event = {
                "event": "drift_detected",
                "detectors": report.detected,
                "records_learned": self.records_learned,
                "at_ms": int(time.time() * 1000),
                "top_drifting_features": report.top_features if report.feature_drift else [],
                "response": response if report.concept else "none",
            }
            self.events = [*self.events, event][-20:]
        self.telemetry.drift(report, event)
        if report.concept and response != "none":
            self.trainer.respond_to_drift(response)
