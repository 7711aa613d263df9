"""The trainer's run loop: poll -> decode -> test-then-train -> checkpoint when due.

Every snapshot records the next offset of each partition it learned from; on assignment the
loop seeks to those offsets, so a restart neither skips nor repeats a record. Invalid records go
to the dead-letter topic. A signal only flips `running`; the loop then finishes its
micro-batch, checkpoints and leaves the group.
"""

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import orjson
import torch
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from streamlearn import kafka
from streamlearn.checkpoint import Checkpointer, Offsets, run_bounded, snapshot_content
from streamlearn.config import TrainSettings
from streamlearn.dlq import DeadLetterQueue, Source, already_dead_lettered
from streamlearn.drift import DriftMonitor
from streamlearn.errors import InvalidReason, SnapshotError, SnapshotMismatch
from streamlearn.metrics import TrainerMetrics
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import DecodedBatch, FeatureSpec, LabelSpec, RecordDecoder, Rejected
from streamlearn.snapshots import Snapshot, open_store
from streamlearn.trainer import WINDOWS, Trainer, make_optimizer, pick_device

log = logging.getLogger(__name__)


class RateLimitedLog:
    """Logs each key at most once per `interval_s`, counting what it held back."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: Any) -> None:
        self.log(logging.WARNING, key, message, *args)

    def log(
        self, level: int, key: str, message: str, *args: Any, exc_info: BaseException | None = None
    ) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        log.log(
            level, message + (f" (+{held} more since last report)" if held else ""), *args, exc_info=exc_info
        )


class Pipeline:
    """Consumes one topic and keeps one model learning from it."""

    def __init__(self, settings: TrainSettings, metrics: TrainerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.running = True
        self.device = pick_device(settings.device)  # --device cuda without one: ConfigError
        if settings.deterministic:
            torch.use_deterministic_algorithms(True)
        self.store = open_store(settings.snapshot_dir, settings.keep_snapshots)
        self.labels = LabelSpec.create(settings.task, settings.classes, settings.num_classes)
        features = FeatureSpec(settings.n_features or len(settings.feature_names), settings.feature_names)
        self.decoder = RecordDecoder(
            self.labels, features if features.n_features else None, settings.max_record_bytes
        )
        self.trainer: Trainer | None = None
        self.drift: DriftMonitor | None = None
        self.drift_events: list[dict[str, Any]] = []
        self.records_learned = 0
        self.offsets: Offsets = {}  # next offset per partition this model has learned up to (owned or not)
        self.assigned: set[tuple[str, int]] = set()
        self.positions: Offsets = {}  # next offset to take per assigned partition (learned or buffered)
        self.dlq_marks: dict[int, int] = {}
        self.skip_dead_letters: set[Source] = set()
        self.buffers: dict[tuple[str, int], list[Message]] = defaultdict(list)  # --deterministic only
        self.dirty = False
        self.log_limiter = RateLimitedLog()
        self._rate_mark = (time.monotonic(), 0)
        self.consumer: Consumer | None = None
        self.dlq: DeadLetterQueue | None = None
        self.checkpoints: Checkpointer | None = None
        self.restored: Snapshot | None = None

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
        self.restored = snapshot
        if self.settings.resume_from == "group":  # keep the weights; positions come from Kafka
            log.info(
                "resuming %s from snapshot v%d's weights, at the group's offsets",
                self.settings.model_name,
                snapshot.version,
            )
            return snapshot
        self.offsets = {
            (topic, int(partition)): int(offset)
            for topic, partitions in snapshot.meta["offsets"].items()
            for partition, offset in partitions.items()
        }
        dlq = snapshot.meta.get("dlq") or {}
        if dlq.get("topic") == self.settings.dead_letter_topic:
            self.dlq_marks = {int(p): int(o) for p, o in dlq.get("marks", {}).items()}
        log.info(
            "resuming %s from snapshot v%d (%d records learned)",
            self.settings.model_name,
            snapshot.version,
            self.records_learned,
        )
        return snapshot

    def _check_compatible(self, spec: ModelSpec) -> None:
        s = self.settings
        wanted = (self.labels.task, s.arch, tuple(s.hidden) if s.arch == "mlp" else ())
        found = (spec.labels.task, spec.arch, spec.hidden if spec.arch == "mlp" else ())
        if wanted != found or (self.labels.classes and self.labels.classes != spec.labels.classes):
            raise SnapshotMismatch(
                f"snapshots of model {s.model_name!r} in {s.snapshot_dir} are "
                f"{_describe(*found)}, not {_describe(*wanted)}: use another --model-name or --snapshot-dir"
            )
        if self.decoder.features and self.decoder.features.n_features != spec.features.n_features:
            raise SnapshotMismatch(
                f"snapshots of model {s.model_name!r} have {spec.features.n_features} features, "
                f"not {self.decoder.features.n_features}"
            )

    def _build_trainer(self, spec: ModelSpec) -> None:
        model = build_model(spec)
        optimizer = make_optimizer(
            self.settings.optimizer, model, self.settings.lr, self.settings.weight_decay
        )
        self.trainer = Trainer(model, optimizer, self.device, self.settings.clip_grad_norm)
        names = list(spec.features.names) or [f"f{i}" for i in range(spec.features.n_features)]
        self.drift = DriftMonitor(
            names,
            spec.labels.task,
            spec.labels.n_outputs,
            self.settings.drift_psi_threshold,
            self.settings.drift_window,
        )

    def _connect(self) -> None:
        """Create the Kafka clients: the dead-letter producer first, then the consumer."""
        s = self.settings
        if s.dead_letter_topic:
            kafka.ensure_topic(s.bootstrap, s.kafka, s.dead_letter_topic)
            self.dlq = DeadLetterQueue(
                s.bootstrap, s.kafka, s.dead_letter_topic, self.dlq_marks, s.max_record_bytes
            )
            # A run that crashed may have dead-lettered records after its last snapshot: find them.
            found = already_dead_lettered(s.bootstrap, s.kafka, s.dead_letter_topic, self.dlq_marks)
            self.skip_dead_letters = {src for src in found if src[2] >= self.offsets.get((src[0], src[1]), 0)}
        self.checkpoints = Checkpointer(
            self.store, s.model_name, self.metrics, self.dlq, lambda: set(self.assigned), s.shutdown_timeout_s
        )
        if self.restored is not None:
            self.checkpoints.restored(self.restored)
        self.consumer = kafka.make_consumer(
            s.bootstrap,
            s.kafka,
            s.group,
            s.start_offset,
            session_timeout_ms=s.session_timeout_ms,
            group_instance_id=s.group_instance_id,
            on_error=self._on_kafka_error,
            on_commit=self._on_commit,
        )
        self.consumer.subscribe(
            [s.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        s = self.settings
        self._connect()
        assert self.consumer is not None and self.checkpoints is not None
        log.info("training %s on %s from %s (device %s)", s.model_name, s.topic, s.bootstrap, self.device)
        try:
            while self.running:
                messages = self.consumer.consume(s.batch_size, timeout=s.max_batch_wait_ms / 1000)
                if messages:
                    self.process(messages)
                if self.checkpoints.finish(self.consumer, wait=False) is False:
                    self.dirty = True  # the write failed: try again at the next interval
                due = time.monotonic() - self.checkpoints.last_started >= s.snapshot_interval_s
                if self.dirty and due:
                    self.checkpoint(wait=False)
                self._update_rates()
        finally:
            self.shutdown()

    def stop(self, *_: Any) -> None:
        """Ask the loop to finish its micro-batch, checkpoint and leave (signal-safe)."""
        self.running = False

    def shutdown(self) -> None:
        """Checkpoint, commit and leave the group, within --shutdown-timeout-s even if Kafka is gone."""
        consumer, checkpoints = self.consumer, self.checkpoints
        if consumer is None or checkpoints is None:
            return
        timeout = self.settings.shutdown_timeout_s

        def final_checkpoint() -> None:
            if self.dirty or checkpoints.pending is not None:
                self.checkpoint(wait=True, consumer=consumer)
            else:  # the newest snapshot holds these offsets; make sure Kafka has them
                checkpoints.commit(consumer, self.offsets, asynchronous=False)

        run_bounded(final_checkpoint, timeout, "final checkpoint")
        # Leaving the group revokes our partitions (static members keep theirs).
        run_bounded(consumer.close, timeout, "leaving the consumer group")
        self.consumer = None
        checkpoints.close()
        if self.dlq is not None:
            self.dlq.close(timeout_s=1.0)
        log.info("stopped after %d records learned", self.records_learned)

    def process(self, messages: Sequence[Message]) -> None:
        """Account for polled messages: learn whole micro-batches of them."""
        good = []
        for message in messages:
            error = kafka.message_error(message)
            if error is not None:
                self._on_kafka_error(error)
                continue
            topic, partition, offset = _position(message)
            key = (topic, partition)
            # Only partitions we own, and never a record twice (one fetched before a rebalance, say).
            if key in self.assigned and offset >= self.positions.get(key, 0):
                self.positions[key] = offset + 1
                good.append(message)
        if not good:
            return
        self.metrics.records_consumed.inc(len(good))
        if not self.settings.deterministic:
            self._process_batch(good)
            return
        # Deterministic: a micro-batch is exactly the next --batch-size records of one partition.
        size = self.settings.batch_size
        for message in good:
            topic, partition, _offset = _position(message)
            self.buffers[(topic, partition)].append(message)
        for buffer in self.buffers.values():
            while len(buffer) >= size:
                batch, buffer[:] = buffer[:size], buffer[size:]
                self._process_batch(batch)

    def _process_batch(self, messages: Sequence[Message]) -> None:
        self._learn_isolating(messages)
        for message in messages:
            topic, partition, offset = _position(message)
            self.offsets[(topic, partition)] = offset + 1
        self.dirty = True

    def _learn_isolating(self, messages: Sequence[Message]) -> None:
        """Decode and learn the records; dead-letter the invalid ones.

        A bug of ours must never turn one record into an outage: a batch whose decoding or
        learning raises an exception nobody foresaw is bisected until the record that raises is
        found, and that record is dead-lettered as internal_error; the others are learned.
        """
        try:
            batch = self.decoder.decode([m.value() for m in messages])
            if len(batch):
                self._learn(batch)
        except Exception as exc:
            if len(messages) > 1:
                middle = len(messages) // 2
                self._learn_isolating(messages[:middle])
                self._learn_isolating(messages[middle:])
                return
            self.log_limiter.log(
                logging.ERROR, f"internal-{type(exc).__name__}", "learning a record failed", exc_info=exc
            )
            detail = f"{type(exc).__name__}: {exc}"[:300]
            self._reject(messages[0], Rejected(0, InvalidReason.INTERNAL_ERROR, detail))
            return
        for rejected in batch.rejected:  # sent once the batch went through, so never twice
            self._reject(messages[rejected.index], rejected)

    def _learn(self, batch: DecodedBatch) -> None:
        if self.trainer is None:
            assert self.decoder.features is not None  # fixed by the first valid record
            s = self.settings
            self._build_trainer(ModelSpec(self.labels, self.decoder.features, s.arch, s.hidden, s.seed))
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
        self._watch_drift(batch, result.errors)

    def _watch_drift(self, batch: DecodedBatch, errors: Any) -> None:
        assert self.drift is not None and self.trainer is not None
        report = self.drift.update(batch.features, batch.labels, errors)
        m = self.metrics
        for detector, score in report.scores.items():
            m.drift_score.labels(detector).set(score)
        if report.feature_psi_max is not None:
            m.feature_drift_psi.set(report.feature_psi_max)
            m.feature_drift_ks.set(report.feature_ks_max or 0.0)
            if self.settings.drift_per_feature and len(report.feature_psi) <= 100:  # cardinality guard
                for name, psi in report.feature_psi.items():
                    m.feature_psi.labels(name).set(psi)
        if report.label_score is not None:
            m.label_drift.set(report.label_score)
        if not report.detected:
            return
        for detector in report.detected:
            m.drift_detections.labels(detector).inc()
        event = {
            "event": "drift_detected",
            "detectors": report.detected,
            "records_learned": self.records_learned,
            "at_ms": int(time.time() * 1000),
            "top_drifting_features": report.top_features if report.feature_drift else [],
            "response": self.settings.on_drift if report.concept else "none",
        }
        self.drift_events = [*self.drift_events, event][-20:]
        log.warning("%s", orjson.dumps(event).decode())  # one structured line per detection
        if report.concept and self.settings.on_drift != "none":
            self.trainer.respond_to_drift(self.settings.on_drift)

    def _reject(self, message: Message, rejected: Rejected) -> None:
        self.metrics.records_invalid.labels(rejected.reason.value).inc()
        self.log_limiter.warning(
            rejected.reason.value,
            "invalid record at %s[%d]@%d: %s: %s",
            message.topic(),
            message.partition(),
            message.offset(),
            rejected.reason.value,
            rejected.detail,
        )
        if self.dlq is None:
            return
        source = _position(message)
        if source in self.skip_dead_letters:
            self.skip_dead_letters.discard(source)  # dead-lettered by the run before a crash
            return
        self.dlq.send(message, rejected)

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

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint(self, wait: bool, consumer: Consumer | None = None) -> bool:
        """Snapshot the model with its offsets, and commit them once the snapshot is durable.

        With wait, returns whether the snapshot was written; without, whether one was started.
        """
        checkpoints = self.checkpoints
        assert checkpoints is not None
        consumer = consumer or self.consumer
        if checkpoints.pending is not None:
            if not wait:
                return False  # one write at a time; the next interval catches up
            checkpoints.finish(consumer, wait=True, asynchronous=False)
        try:
            tensors, meta = self._snapshot_content()
        except SnapshotError as exc:
            self.metrics.snapshot_failures.inc()
            log.error("%s", exc)
            return False
        checkpoints.start(tensors, meta, self.offsets)
        self.dirty = False
        if not wait:
            return True
        if checkpoints.finish(consumer, wait=True, asynchronous=False):
            return True
        self.dirty = True
        return False

    def _snapshot_content(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        config = self.settings.model_dump(mode="json", exclude={"kafka"})  # never the credentials
        tensors, meta = snapshot_content(self.trainer, self.records_learned, self.offsets, config)
        if self.drift is not None:
            meta["drift"] = {**self.drift.to_dict(), "events": self.drift_events}
        return tensors, meta

    # -- rebalancing ----------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Resume each partition at the later of our own offset and the group's committed one.

        Ours is ahead when our commits lagged (a crash before the commit, a broker outage); the
        group's is ahead when another member learned the records since we last had the partition.
        """
        committed = {}
        try:
            committed = {
                (tp.topic, tp.partition): tp.offset for tp in consumer.committed(partitions, timeout=10)
            }
        except KafkaException as exc:
            log.warning(
                "could not read committed offsets, resuming from the snapshot's: %s", exc.args[0].str()
            )
        for tp in partitions:
            key = (tp.topic, tp.partition)
            ours = self.offsets.get(key)
            if ours is not None:
                tp.offset = max(ours, committed.get(key, -1))
            start = tp.offset if tp.offset >= 0 else committed.get(key, -1)
            self.positions[key] = max(start, -1)  # -1: not known until --start-offset has been applied
            self.assigned.add(key)
        consumer.incremental_assign(partitions)
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Hand partitions over cleanly: what we learned from them is checkpointed and committed first."""
        checkpoints = self.checkpoints
        if checkpoints is not None:
            durable = not (self.dirty or checkpoints.pending is not None) or self.checkpoint(
                wait=True, consumer=consumer
            )
            if durable:  # commit synchronously: an earlier asynchronous commit may still be on its way
                revoked = {(tp.topic, tp.partition) for tp in partitions}
                checkpoints.commit(consumer, {k: o for k, o in self.offsets.items() if k in revoked}, False)
        self._release(partitions)
        consumer.incremental_unassign(partitions)
        log.info("revoked %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member may own these already: committing now could move its offsets backwards.
        self._release(partitions)
        consumer.incremental_unassign(partitions)
        log.warning("lost %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    def _release(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.assigned.discard(key)
            self.positions.pop(key, None)
            self.buffers.pop(key, None)  # --deterministic: an unfinished batch is not learned
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
        consumer = self.consumer
        if consumer is None:
            return
        try:
            positions = consumer.position(consumer.assignment())
        except KafkaException:
            return
        for tp in positions:
            _low, high = consumer.get_watermark_offsets(tp, cached=True)
            # Before its first message librdkafka reports no position: a partition resumed at its
            # end has none at all, yet its lag is known (0), from where we seeked to.
            offset = tp.offset if tp.offset >= 0 else self.positions.get((tp.topic, tp.partition), -1)
            if offset >= 0 and high >= 0:
                self.metrics.consumer_lag.labels(str(tp.partition)).set(max(high - offset, 0))

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if error is None:
            self.metrics.offsets_committed.inc()
        else:
            log.warning("offset commit failed (the snapshot still holds the offsets): %s", error.str())

    def _on_kafka_error(self, error: KafkaError) -> None:
        self.metrics.kafka_errors.inc()
        if error.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            self.log_limiter.warning("kafka-down", "Kafka unreachable, retrying: %s", error.str())
        else:
            self.log_limiter.warning(f"kafka-{error.code()}", "Kafka error: %s", error.str())


def _position(message: Message) -> Source:
    """(topic, partition, offset) of a consumed message, which always has all three."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset


def _describe(task: str, arch: str, hidden: tuple[int, ...]) -> str:
    return f"{task}/{arch}" + (f"{list(hidden)}" if hidden else "")
