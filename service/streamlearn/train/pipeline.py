"""The trainer's run loop: poll -> take -> decode -> test-then-train -> checkpoint when due.

Every snapshot records the next offset of each partition it learned from; on assignment the
loop resumes there, so a restart neither skips nor repeats a record. Invalid records go to the
dead-letter topic. A signal only flips `running`; the loop then finishes its micro-batch,
checkpoints and leaves the group. The rules of what is taken and committed live in
partitions.py, the order of a checkpoint in checkpoint.py, metrics and logs in telemetry.py.
"""

import logging
from collections.abc import Sequence
from typing import Any

import torch
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from streamlearn import kafka
from streamlearn.config import TrainSettings
from streamlearn.errors import InvalidReason
from streamlearn.metrics import TrainerMetrics
from streamlearn.records import FeatureSpec, LabelSpec, RecordDecoder, Rejected
from streamlearn.snapshots import Snapshot, open_store
from streamlearn.train.checkpoint import Checkpointer, run_bounded
from streamlearn.train.dlq import DeadLetterQueue, Source, already_dead_lettered
from streamlearn.train.learner import Learner
from streamlearn.train.partitions import Partitions, position
from streamlearn.train.telemetry import Telemetry
from streamlearn.train.trainer import pick_device

log = logging.getLogger("streamlearn.train")

# More unforeseen exceptions in a row than this is no poison record but a broken trainer (a bug
# hit by every record, a failed device): the trainer stops rather than dead-letter the stream.
MAX_INTERNAL_ERRORS = 1000


class Pipeline:
    """Consumes one topic and keeps one model learning from it."""

    def __init__(self, settings: TrainSettings, metrics: TrainerMetrics) -> None:
        self.settings = s = settings
        self.metrics = metrics
        self.running = True
        self.device = pick_device(s.device)  # --device cuda without one: ConfigError
        if s.deterministic:
            torch.use_deterministic_algorithms(True)
        self.store = open_store(s.snapshot_dir, s.keep_snapshots)
        labels = LabelSpec.create(s.task, s.classes, s.num_classes)
        features = FeatureSpec(s.n_features or len(s.feature_names), s.feature_names)
        self.decoder = RecordDecoder(labels, features if features.n_features else None, s.max_record_bytes)
        self.partitions: Partitions[Message] = Partitions(
            batch_size=s.batch_size if s.deterministic else None
        )
        self.telemetry = Telemetry(metrics, s.drift_per_feature)
        self.learner = Learner(s, labels, self.device, self.telemetry)
        self.checkpoints = Checkpointer(
            self.store, s.model_name, metrics, self.partitions, self.learner.content, None,
            s.snapshot_interval_s, s.shutdown_timeout_s,
        )  # fmt: skip
        self.dlq: DeadLetterQueue | None = None
        self.dlq_marks: dict[int, int] = {}
        self.skip_dead_letters: set[Source] = set()
        self.consumer: Consumer | None = None
        self.internal_errors = 0  # unforeseen exceptions in a row, while isolating their records

    # -- start-up -------------------------------------------------------------------------------

    @property
    def records_learned(self) -> int:
        return self.learner.records_learned

    def restore(self) -> Snapshot | None:
        """Resume from the newest valid snapshot of this model, if any."""
        s = self.settings
        snapshot = self.store.load_latest(s.model_name)
        if snapshot is None:
            return None
        features = self.learner.restore(snapshot, self.decoder.features)
        if features is not None:
            self.decoder.fix(features)
        self.checkpoints.restored(snapshot)
        how = "at the group's offsets" if s.resume_from == "group" else "at its offsets"
        log.info("resuming %s from snapshot v%d (%d records learned), %s", s.model_name, snapshot.version,
                 self.records_learned, how)  # fmt: skip
        if s.resume_from == "group":  # keep the weights; positions come from Kafka
            return snapshot
        self.partitions.learned = {
            (topic, partition): offset
            for topic, partitions in snapshot.meta.offsets.items()
            for partition, offset in partitions.items()
        }
        dlq = snapshot.meta.dlq
        if dlq is not None and dlq.topic == s.dead_letter_topic:
            self.dlq_marks = dict(dlq.marks)
        return snapshot

    def _connect(self) -> Consumer:
        """Create the Kafka clients: the dead-letter producer first, then the consumer."""
        s = self.settings
        if s.dead_letter_topic:
            kafka.ensure_topic(s.bootstrap, s.kafka, s.dead_letter_topic)
            self.dlq = DeadLetterQueue(
                s.bootstrap, s.kafka, s.dead_letter_topic, self.dlq_marks, s.max_record_bytes
            )
            self.checkpoints.dlq = self.dlq
            # A run that crashed may have dead-lettered records after its last snapshot: find them.
            found = already_dead_lettered(s.bootstrap, s.kafka, s.dead_letter_topic, self.dlq_marks)
            learned = self.partitions.learned
            self.skip_dead_letters = {src for src in found if src[2] >= learned.get((src[0], src[1]), 0)}
        consumer = kafka.make_consumer(
            s.bootstrap, s.kafka, s.group, s.start_offset, s.session_timeout_ms, s.group_instance_id,
            on_error=self.telemetry.kafka_error, on_commit=self.telemetry.committed,
        )  # fmt: skip
        consumer.subscribe(
            [s.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        return consumer

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        s = self.settings
        self.consumer = consumer = self._connect()
        log.info("training %s on %s from %s (device %s)", s.model_name, s.topic, s.bootstrap, self.device)
        try:
            while self.running:
                messages = consumer.consume(s.batch_size, timeout=s.max_batch_wait_ms / 1000)
                self.process(messages)
                self.checkpoints.commit(consumer)  # commits a written snapshot; starts one when due
                self.telemetry.tick(self.records_learned, consumer, self.partitions)
        finally:
            self.shutdown()

    def stop(self, *_: Any) -> None:
        """Ask the loop to finish its micro-batch, checkpoint and leave (signal-safe)."""
        self.running = False

    def shutdown(self) -> None:
        """Checkpoint, commit and leave the group, within --shutdown-timeout-s even if Kafka is gone."""
        consumer, timeout = self.consumer, self.settings.shutdown_timeout_s
        if consumer is None:
            return
        run_bounded(lambda: self.checkpoints.commit(consumer, force=True), timeout, "final checkpoint")
        # Leaving the group revokes our partitions (static members keep theirs).
        run_bounded(consumer.close, timeout, "leaving the consumer group")
        self.consumer = None
        self.checkpoints.close()
        if self.dlq is not None:
            self.dlq.close(timeout_s=1.0)
        log.info("stopped after %d records learned", self.records_learned)

    def process(self, messages: Sequence[Message]) -> None:
        """Learn whole micro-batches of polled messages, each one once, from owned partitions only."""
        readable = []
        for message in messages:
            error = kafka.message_error(message)
            if error is None:
                readable.append(message)
            else:
                self.telemetry.kafka_error(error)
        taken = self.partitions.take(readable)
        self.metrics.records_consumed.inc(len(taken))
        for batch in self.partitions.batches(taken):
            self._learn_isolating(batch)
            self.partitions.learned_through(batch)
            self.checkpoints.dirty = True

    def _learn_isolating(self, messages: Sequence[Message]) -> None:
        """Decode and learn the records; dead-letter the invalid ones.

        A bug of ours must never turn one record into an outage: a batch whose decoding or
        learning raises an exception nobody foresaw is bisected until the record that raises is
        found, and that record is dead-lettered as internal_error; the others are learned.
        """
        try:
            batch = self.decoder.decode([m.value() for m in messages])
            learned = True
            if len(batch):
                assert self.decoder.features is not None  # fixed by the first valid record
                learned = self.learner.learn(batch, self.decoder.features)
        except Exception as exc:
            self.internal_errors += 1
            if self.internal_errors > MAX_INTERNAL_ERRORS:  # not one record: the code or the device
                raise
            if len(messages) == 1:
                self.telemetry.limited.log(
                    logging.ERROR, f"internal-{type(exc).__name__}", "learning a record failed", exc_info=exc
                )
                detail = f"{type(exc).__name__}: {exc}"[:300]
                self._reject(messages[0], Rejected(0, InvalidReason.INTERNAL_ERROR, detail))
                return
            learned = False
        if not learned:  # an exception, or a loss or gradient that is not finite: find the record
            if len(messages) == 1:
                detail = "the loss or gradient is not finite for this record"
                self._reject(messages[0], Rejected(0, InvalidReason.NON_FINITE, detail))
                return
            middle = len(messages) // 2
            self._learn_isolating(messages[:middle])
            self._learn_isolating(messages[middle:])
            return
        self.internal_errors = 0
        for rejected in batch.rejected:  # sent once the batch went through, so never twice
            self._reject(messages[rejected.index], rejected)

    def _reject(self, message: Message, rejected: Rejected) -> None:
        topic, partition, offset = source = position(message)
        self.telemetry.rejected(f"{topic}[{partition}]@{offset}", rejected.reason.value, rejected.detail)
        if self.dlq is None:
            return
        if source in self.skip_dead_letters:
            self.skip_dead_letters.discard(source)  # dead-lettered by the run before a crash
            return
        self.dlq.send(message, rejected)

    # -- rebalancing ----------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Resume each partition at the later of our own offset and the group's committed one."""
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
            start = self.partitions.assign(
                (tp.topic, tp.partition), committed.get((tp.topic, tp.partition), -1)
            )
            if start is not None:
                tp.offset = start
        consumer.incremental_assign(partitions)
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Hand partitions over cleanly: what we learned from them is checkpointed and committed first."""
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self.checkpoints.commit(consumer, force=True, revoking=revoked)  # within --shutdown-timeout-s
        self._release(consumer, partitions)
        log.info("revoked %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member may own these already: committing now could move its offsets backwards.
        self._release(consumer, partitions)
        log.warning("lost %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    def _release(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.partitions.release((tp.topic, tp.partition) for tp in partitions)
        for tp in partitions:
            self.telemetry.released(tp.partition)
        consumer.incremental_unassign(partitions)
