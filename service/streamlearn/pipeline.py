"""The trainer's run loop: poll -> decode -> test-then-train -> snapshot when due -> commit.

Offsets are committed only after the snapshot holding their effect is durable, and every
snapshot records the next offset of each partition it learned from; on assignment the loop
seeks to those offsets. A signal only flips `running`; the loop then snapshots, commits and
leaves the group.
"""

import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from streamlearn import kafka
from streamlearn.config import TrainSettings
from streamlearn.errors import ConfigError, SnapshotMismatch
from streamlearn.metrics import TrainerMetrics
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import DecodedBatch, FeatureSpec, LabelSpec, RecordDecoder, Rejected
from streamlearn.snapshots import BackgroundWriter, Snapshot, SnapshotStore
from streamlearn.trainer import WINDOWS, Trainer, make_optimizer, pick_device

log = logging.getLogger(__name__)

Offsets = dict[tuple[str, int], int]  # (topic, partition) -> next offset to learn from
NORMALIZER_IN_META = 1024  # features up to which the normalizer is also written into meta.json


@dataclass
class PendingCommit:
    """A snapshot being written, and the offsets to commit once it is durable."""

    future: "Future[Snapshot]"
    offsets: Offsets
    started: float


class RateLimitedLog:
    """Logs each key at most once per `interval_s`, counting what it held back."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        log.warning(message + (f" (+{held} more since last report)" if held else ""), *args)


class Pipeline:
    """Consumes one topic and keeps one model learning from it."""

    def __init__(self, settings: TrainSettings, metrics: TrainerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.running = True
        self.device = pick_device(settings.device)
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but no CUDA device is available")
        self.store = SnapshotStore(settings.snapshot_dir, settings.keep_snapshots)
        self.writer = BackgroundWriter(self.store)
        self.labels = LabelSpec.create(settings.task, settings.classes, settings.num_classes)
        features = FeatureSpec(settings.n_features or len(settings.feature_names), settings.feature_names)
        self.decoder = RecordDecoder(
            self.labels, features if features.n_features else None, settings.max_record_bytes
        )
        self.trainer: Trainer | None = None
        self.records_learned = 0
        self.offsets: Offsets = {}
        self.restored_offsets: Offsets = {}
        self.pending: PendingCommit | None = None
        self.last_snapshot_at = time.monotonic()
        self.last_snapshot_wall = time.time()
        self.dirty = False
        self.invalid_log = RateLimitedLog()
        self._rate_mark = (time.monotonic(), 0)
        self.consumer: Consumer | None = None
        metrics.snapshot_age.set_function(lambda: time.time() - self.last_snapshot_wall)

    # -- start-up -------------------------------------------------------------------------------

    def restore(self) -> Snapshot | None:
        """Resume from the newest valid snapshot of this model, if any."""
        snapshot = self.store.load_latest(self.settings.model_name)
        if snapshot is None:
            return None
        if snapshot.meta["model"] is not None:  # None: written before the first valid record
            spec = ModelSpec.from_dict(snapshot.meta["model"])
            self._check_compatible(spec)
            self._build_trainer(spec)
            assert self.trainer is not None
            self.trainer.restore(snapshot.tensors, snapshot.meta["training"])
            self.decoder.fix(spec.features)
        self.records_learned = int(snapshot.meta["records_trained"])
        self.restored_offsets = {
            (topic, int(partition)): int(offset)
            for topic, partitions in snapshot.meta["offsets"].items()
            for partition, offset in partitions.items()
        }
        self.offsets = dict(self.restored_offsets)
        self.last_snapshot_wall = snapshot.meta["created_at_ms"] / 1000
        self.metrics.snapshot_version.set(snapshot.version)
        log.info(
            "resumed %s from snapshot v%d (%d records learned)",
            self.settings.model_name,
            snapshot.version,
            self.records_learned,
        )
        return snapshot

    def _check_compatible(self, spec: ModelSpec) -> None:
        wanted = (
            self.labels.task,
            self.settings.arch,
            tuple(self.settings.hidden) if self.settings.arch == "mlp" else (),
        )
        found = (spec.labels.task, spec.arch, spec.hidden if spec.arch == "mlp" else ())
        if wanted != found or (self.labels.classes and self.labels.classes != spec.labels.classes):
            raise SnapshotMismatch(
                f"snapshots of model {self.settings.model_name!r} in {self.settings.snapshot_dir} are "
                f"{_describe(*found)}, not {_describe(*wanted)}: use another --model-name or --snapshot-dir"
            )
        if self.decoder.features and self.decoder.features.n_features != spec.features.n_features:
            raise SnapshotMismatch(
                f"snapshots of model {self.settings.model_name!r} have {spec.features.n_features} features, "
                f"not {self.decoder.features.n_features}"
            )

    def _build_trainer(self, spec: ModelSpec) -> None:
        model = build_model(spec)
        optimizer = make_optimizer(
            self.settings.optimizer, model, self.settings.lr, self.settings.weight_decay
        )
        self.trainer = Trainer(model, optimizer, self.device, self.settings.clip_grad_norm)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        s = self.settings
        self.consumer = kafka.make_consumer(
            s.bootstrap, s.kafka, s.group, s.start_offset, self._on_kafka_error
        )
        self.consumer.subscribe(
            [s.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        log.info("training %s on %s from %s (device %s)", s.model_name, s.topic, s.bootstrap, self.device)
        try:
            while self.running:
                messages = self.consumer.consume(s.batch_size, timeout=s.max_batch_wait_ms / 1000)
                if messages:
                    self.process(messages)
                self._finish_pending(wait=False)
                if self.dirty and time.monotonic() - self.last_snapshot_at >= s.snapshot_interval_s:
                    self.snapshot(wait=False)
                self._update_rates()
        finally:
            self.shutdown()

    def stop(self, *_: Any) -> None:
        """Ask the loop to finish its micro-batch, snapshot, commit and leave (signal-safe)."""
        self.running = False

    def shutdown(self) -> None:
        if self.consumer is None:
            return
        consumer, self.consumer = self.consumer, None
        if self.dirty:
            self.snapshot(wait=True, consumer=consumer)
        self._finish_pending(wait=True, consumer=consumer)
        self.writer.close()
        consumer.close()  # leaves the group at once, so partitions move without a session timeout
        log.info("stopped after %d records learned", self.records_learned)

    def process(self, messages: Sequence[Message]) -> None:
        """Decode, learn and account for one micro-batch of messages."""
        good: list[Message] = []
        for message in messages:
            error = kafka.message_error(message)
            if error is not None:
                self._on_kafka_error(error)
                continue
            good.append(message)
        if not good:
            return
        self.metrics.records_consumed.inc(len(good))
        batch = self.decoder.decode([m.value() for m in good])
        for rejected in batch.rejected:
            self._reject(good[rejected.index], rejected)
        if len(batch):
            self._learn(batch)
        for message in good:
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            assert topic is not None and partition is not None and offset is not None  # a consumed message
            self.offsets[(topic, partition)] = offset + 1
        self.dirty = True

    def _learn(self, batch: DecodedBatch) -> None:
        if self.trainer is None:
            assert self.decoder.features is not None  # fixed by the first valid record
            self._build_trainer(
                ModelSpec(
                    self.labels,
                    self.decoder.features,
                    self.settings.arch,
                    self.settings.hidden,
                    self.settings.seed,
                )
            )
            assert self.trainer is not None
        with self.metrics.train_step.time():
            result = self.trainer.step(batch)
        self.metrics.batch_records.observe(len(batch))
        if result.learned:
            self.records_learned += len(batch)
            self.metrics.records_trained.inc(len(batch))
        else:
            self.metrics.batches_skipped.inc()
            log.warning("skipped a micro-batch of %d records: non-finite loss or gradient", len(batch))
        self._export_scores()

    def _reject(self, message: Message, rejected: Rejected) -> None:
        # The seam for a dead-letter topic: today a rejected record is counted and logged.
        self.metrics.records_invalid.labels(rejected.reason.value).inc()
        self.invalid_log.warning(
            rejected.reason.value,
            "invalid record at %s[%d]@%d: %s: %s",
            message.topic(),
            message.partition(),
            message.offset(),
            rejected.reason.value,
            rejected.detail,
        )

    def _export_scores(self) -> None:
        assert self.trainer is not None
        scores = self.trainer.scores
        self.metrics.prequential_loss.labels("all").set(scores.mean_loss)
        for window in WINDOWS:
            self.metrics.prequential_loss.labels(str(window)).set(scores.faded_loss[window])
        if self.trainer.classification:
            self.metrics.prequential_accuracy.labels("all").set(scores.accuracy)
            for window in WINDOWS:
                self.metrics.prequential_accuracy.labels(str(window)).set(scores.faded_accuracy[window])

    # -- snapshots and commits ------------------------------------------------------------------

    def snapshot(self, wait: bool, consumer: Consumer | None = None) -> None:
        """Start writing a snapshot of the model and offsets; commit the offsets once it is durable."""
        if self.pending is not None:
            if not wait:
                return  # one write at a time; the next interval catches up
            self._finish_pending(wait=True, consumer=consumer)
        tensors, meta = self._snapshot_content()
        offsets = dict(self.offsets)
        self.pending = PendingCommit(
            self.writer.submit(self.settings.model_name, tensors, meta), offsets, time.monotonic()
        )
        self.last_snapshot_at = time.monotonic()
        self.dirty = False
        if wait:
            self._finish_pending(wait=True, consumer=consumer)

    def _snapshot_content(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        config = self.settings.model_dump(mode="json", exclude={"kafka"})  # never the credentials
        return snapshot_content(self.trainer, self.records_learned, self.offsets, config)

    def _finish_pending(self, wait: bool, consumer: Consumer | None = None) -> None:
        pending = self.pending
        if pending is None or (not wait and not pending.future.done()):
            return
        self.pending = None
        try:
            snapshot = pending.future.result()
        except Exception as exc:
            self.metrics.snapshot_failures.inc()
            self.dirty = True  # offsets stay uncommitted; the next snapshot tries again
            log.error("snapshot failed, offsets not committed: %s", exc)
            return
        self.metrics.snapshot_write.observe(time.monotonic() - pending.started)
        self.metrics.snapshot_version.set(snapshot.version)
        self.last_snapshot_wall = snapshot.meta["created_at_ms"] / 1000
        self._commit(pending.offsets, consumer or self.consumer)

    def _commit(self, offsets: Offsets, consumer: Consumer | None) -> None:
        if consumer is None or not offsets:
            return
        partitions = [
            TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()
        ]
        try:
            consumer.commit(offsets=partitions, asynchronous=False)
            self.metrics.offsets_committed.inc()
        except KafkaException as exc:
            # Safe to skip: the snapshot already holds these offsets and is what we resume from.
            log.warning("offset commit failed (the snapshot still holds them): %s", exc.args[0].str())

    # -- rebalancing ----------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            restored = self.restored_offsets.get((tp.topic, tp.partition))
            if restored is not None:
                tp.offset = restored  # the snapshot is ahead of (or equal to) the committed offset
        consumer.incremental_assign(partitions)
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Whatever we learned from these partitions is snapshotted and committed before they go.
        if self.dirty or self.pending is not None:
            self.snapshot(wait=True, consumer=consumer)
        self._forget(partitions)
        consumer.incremental_unassign(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member may own these already: committing now could move its offsets backwards.
        self._forget(partitions)
        consumer.incremental_unassign(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.offsets.pop((tp.topic, tp.partition), None)
            self.restored_offsets.pop((tp.topic, tp.partition), None)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(str(tp.partition))

    # -- health ---------------------------------------------------------------------------------

    def _update_rates(self) -> None:
        now = time.monotonic()
        since, count = self._rate_mark
        if now - since < 1.0:
            return
        self.metrics.records_per_second.set((self.records_learned - count) / (now - since))
        self._rate_mark = (now, self.records_learned)
        self._update_lag()

    def _update_lag(self) -> None:
        if self.consumer is None:
            return
        try:
            assignment = self.consumer.assignment()
            positions = self.consumer.position(assignment) if assignment else []
        except KafkaException:
            return
        for tp in positions:
            _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if tp.offset >= 0 and high >= 0:
                self.metrics.consumer_lag.labels(str(tp.partition)).set(max(high - tp.offset, 0))

    def _on_kafka_error(self, error: KafkaError) -> None:
        self.metrics.kafka_errors.inc()
        if error.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            self.invalid_log.warning("kafka-down", "Kafka unreachable, retrying: %s", error.str())
        else:
            self.invalid_log.warning(f"kafka-{error.code()}", "Kafka error: %s", error.str())


def _describe(task: str, arch: str, hidden: tuple[int, ...]) -> str:
    return f"{task}/{arch}" + (f"{list(hidden)}" if hidden else "")


def snapshot_content(
    trainer: Trainer | None, records_learned: int, offsets: Offsets, config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of a snapshot: model, optimizer, normalizer, offsets, config."""
    by_topic: dict[str, dict[str, int]] = {}
    for (topic, partition), offset in sorted(offsets.items()):
        by_topic.setdefault(topic, {})[str(partition)] = offset
    meta: dict[str, Any] = {"records_trained": records_learned, "offsets": by_topic, "config": config}
    if trainer is None:  # nothing valid seen yet: the snapshot only records offsets
        return {}, {**meta, "model": None, "training": None}
    tensors, training = trainer.state()
    spec = trainer.model.spec
    meta.update(
        model=spec.to_dict(),
        task=spec.labels.task,
        classes=spec.labels.class_names if spec.labels.task != "regression" else [],
        features=spec.features.to_dict(),
        architecture={"arch": spec.arch, "hidden": list(spec.hidden) if spec.arch == "mlp" else []},
        normalizer=_normalizer_summary(trainer),
        training=training,
    )
    return tensors, meta


def _normalizer_summary(trainer: Trainer) -> dict[str, Any]:
    norm = trainer.model.normalizer
    summary: dict[str, Any] = {"count": int(norm.count.item())}
    if norm.mean.numel() <= NORMALIZER_IN_META:
        summary.update(mean=norm.mean.tolist(), variance=(norm.m2 / norm.count.clamp_min(1)).tolist())
    return summary
