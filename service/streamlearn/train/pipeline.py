"""The trainer's run loop: poll -> take -> order -> (join) -> decode -> test-then-train -> checkpoint.

Every snapshot records the next offset of each partition it learned from; on assignment the
loop resumes there, so a restart neither skips nor repeats a record. Invalid records go to the
dead-letter topic. A signal only flips `running`; the loop then finishes its micro-batch,
checkpoints and leaves the group. The rules of what is taken and committed live in
partitions.py, the order records are learned in order.py, the order of a checkpoint in
checkpoint.py, metrics and logs in telemetry.py.

Decoding and learning overlap on two threads: this loop decodes the next micro-batch while a
learning thread tests and trains on the one before (torch releases the GIL in its kernels).
At most MAX_IN_FLIGHT batches are handed over; a batch counts as learned (its offsets may be
checkpointed) only once the learning thread is done with it, and every checkpoint, revoke and
shutdown first waits for the batches in flight.

Launched by torchrun with more than one rank, the loop runs in lockstep with the other ranks
(lockstep.py): static partition ownership, rounds that learn a global micro-batch, snapshots
aligned at a round boundary; learning then happens on this thread, as collectives must.

With --labels-topic the loop reads the prediction log and the labels topic instead of --topic,
merged in event time, and learns what the label join (labeljoin.py) makes of them. Their offsets
count as done once joined: the join's state, and the joined records not yet handed over, are in
the snapshot with them.
"""

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import torch
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import CollectorRegistry

from streamlearn import kafka
from streamlearn.announcements import COMPACTED, Announcement, Announcer
from streamlearn.config import TrainSettings
from streamlearn.decoding import DecodedBatch, RecordDecoder, Rejected
from streamlearn.errors import ConfigError
from streamlearn.metrics import TrainerMetrics
from streamlearn.records import FeatureSpec, LabelSpec, feature_kinds
from streamlearn.snapshots import Snapshot, SnapshotContent, open_store
from streamlearn.train.aligned import AlignedCheckpointer
from streamlearn.train.checkpoint import Checkpointer, run_bounded
from streamlearn.train.dlq import DeadLetterQueue, Source, already_dead_lettered
from streamlearn.train.isolate import Isolator
from streamlearn.train.joinlog import reread
from streamlearn.train.labeljoin import LabelJoin
from streamlearn.train.learner import Learner
from streamlearn.train.lockstep import Agreement, Lockstep, Shared, World, digest
from streamlearn.train.order import Batching, EventTimeOrder, OffsetBatches, PartitionRounds
from streamlearn.train.partitions import Offsets, Partitions, position
from streamlearn.train.resume import ResumeGuard, fetched_watermarks
from streamlearn.train.telemetry import Telemetry
from streamlearn.train.trainer import pick_device

log = logging.getLogger("streamlearn.train")

# More unforeseen exceptions in a row than this is no poison record but a broken trainer (a bug
# hit by every record, a failed device): the trainer stops rather than dead-letter the stream.
MAX_IN_FLIGHT = 2  # micro-batches handed to the learning thread and not yet learned
JOIN_STATE = "join.state"  # the label join's state, as JSON bytes, in the snapshot's training file


class Pipeline:
    """Consumes one topic and keeps one model learning from it."""

    def __init__(self, settings: TrainSettings, metrics: TrainerMetrics) -> None:
        self.settings = s = settings
        self.metrics = metrics
        self.running = True
        self.device = pick_device(s.device)  # --device cuda without one: ConfigError
        self.world = world = World.from_env()
        if world.size > 1 and self.device.type == "cuda":  # one GPU per rank on its host
            self.device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        if world.size > 1 and s.labels_topic:
            raise ConfigError("--labels-topic learns in one process: run the label join with one rank")
        if s.deterministic:
            torch.use_deterministic_algorithms(True)
        if self.device.type == "cpu":  # one core stays with the loop that polls and decodes
            cores = _cores()
            torch.set_num_threads(max(1, cores - 1 if world.size == 1 else cores // world.local_size))
        # many ranks: collectives from the first; the model-level metrics are rank 0's to export
        self.lockstep = Lockstep(world, s.collective_timeout_s, self.device) if world.size > 1 else None
        self.agreed = Agreement(0, False, False, False)
        self.shares: deque[list[Message]] = deque()  # this rank's batches not yet learned in a round
        self.store = open_store(s.snapshot_dir, s.keep_snapshots)
        labels = LabelSpec.create(s.task, s.classes, s.num_classes)
        kinds = feature_kinds(s)
        features = None
        if s.feature_names:  # the numeric ones named: with the declared categorical ones, all are known
            features = FeatureSpec(
                len(s.feature_names), s.feature_names, s.categorical, s.multi_categorical,
                s.hash_buckets, s.max_categories, s.embedding_dim, s.min_count,
            )  # fmt: skip
        elif s.n_features:
            features = FeatureSpec(s.n_features)
        self.decoder = RecordDecoder(labels, features, s.max_record_bytes, kinds)
        self.partitions: Partitions[Message] = Partitions()
        self.order: EventTimeOrder[Message] | None = None
        self.join: LabelJoin | None = None
        self.batching: Batching[Message]
        if s.labels_topic and s.prediction_log_topic:  # the two topics in one event-time order
            self.join = LabelJoin(
                s.prediction_log_topic, s.labels_topic, s.model_name, labels, round(s.join_window * 1000),
                on_missing=s.on_missing_label, max_pending=s.join_max_pending,
                max_pending_bytes=s.join_max_pending_bytes, max_skew_ms=round(s.join_max_skew_s * 1000),
                idle_ms=None if s.deterministic else round(s.join_idle_s * 1000),
                max_record_bytes=s.max_record_bytes, batch_size=s.batch_size,
            )  # fmt: skip
            # --deterministic: no partition idles, so their merge depends on the records alone
            wait = None if s.deterministic else s.max_order_wait_ms
            self.batching = self.order = EventTimeOrder(s.batch_size, wait)
        elif s.deterministic and world.size > 1:  # rounds defined by offsets, on every rank
            self.batching = PartitionRounds(s.batch_size)
        elif s.deterministic:  # batches defined by offsets, whatever order messages arrive in
            self.batching = OffsetBatches(s.batch_size)
        else:
            self.batching = self.order = EventTimeOrder(s.batch_size, s.max_order_wait_ms)
        self.telemetry = Telemetry(metrics, s.drift_per_feature)
        metrics.trainer_rank.labels(str(world.rank), str(world.size)).set(1)
        # Every rank learns the same global batches: only rank 0 exports what the model does, so
        # a sum over the ranks counts each record once.
        learning = self.telemetry
        if world.rank > 0:
            learning = Telemetry(TrainerMetrics(CollectorRegistry()), s.drift_per_feature)
        reducer = self.lockstep.reducer if self.lockstep is not None else None
        self.learner = Learner(s, labels, self.device, learning, reducer)
        joined = self.join.learned_records if self.join is not None else None  # told what was learned
        self.isolator: Isolator[Message] = Isolator(
            self.decoder.decode,
            self._learn_valid,
            self._reject,
            joined,  # type: ignore[arg-type]
            self.telemetry.limited,
        )
        self.learning = ThreadPoolExecutor(max_workers=1, thread_name_prefix="learn")
        # micro-batches handed over: the messages, their learning, whether it moves their offsets
        self.in_flight: deque[tuple[Sequence[Message], Future[None], bool]] = deque()
        self.waiting = 0  # micro-batches handed over that the learning thread has not started
        self.backlog = False  # whether the last poll came back full
        self.waiting_lock = threading.Lock()
        self.checkpoints = self._checkpointer()
        self.dlq: DeadLetterQueue | None = None
        self.announcer: Announcer | None = None
        self.dlq_marks: dict[int, int] = {}
        self.skip_dead_letters: set[Source] = set()
        self.consumer: Consumer | None = None
        watermarks = fetched_watermarks(s.bootstrap, s.kafka, s.connect_timeout_s)
        self.resume = ResumeGuard(s.on_offset_out_of_range, metrics, watermarks)

    # -- start-up -------------------------------------------------------------------------------

    @property
    def records_learned(self) -> int:
        return self.learner.records_learned

    def restore(self) -> Snapshot | None:
        """Resume from the newest valid snapshot of this model, if any."""
        s = self.settings
        snapshot = self._newest()
        if snapshot is None:
            return None
        features = self.learner.restore(snapshot, self.decoder.features)
        if features is not None:
            self.decoder.fix(features)
        self.checkpoints.restored(snapshot)
        how = "at the group's offsets" if s.resume_from == "group" else "at its offsets"
        log.info("resuming %s from snapshot v%d (%d records learned), %s", s.model_name, snapshot.version,
                 self.records_learned, how)  # fmt: skip
        if s.resume_from == "group":  # keep the weights; positions come from Kafka (and join afresh)
            return snapshot
        state = snapshot.tensors.get(JOIN_STATE)
        if self.join is not None and state is not None:  # waiting predictions: read from the log again
            log_reader = partial(reread, s.bootstrap, s.kafka, self.join.log_topic)
            self.join.restore(state.numpy().tobytes(), log_reader)
        self.partitions.learned = {
            (topic, partition): offset
            for topic, partitions in snapshot.meta.offsets.items()
            for partition, offset in partitions.items()
        }
        dlq = snapshot.meta.dlq
        if dlq is not None and dlq.topic == s.dead_letter_topic:
            self.dlq_marks = dict(dlq.marks)
        return snapshot

    def _newest(self) -> Snapshot | None:
        """The newest valid snapshot; with many ranks, the one rank 0 found, on every rank."""
        lockstep = self.lockstep
        if lockstep is None:
            return self.store.load_latest(self.settings.model_name)
        newest = self.store.load_latest(self.settings.model_name) if lockstep.rank == 0 else None
        version = lockstep.broadcast_json(newest.version if newest is not None else 0, at_start=True)
        if lockstep.rank == 0 or not version:
            return newest
        return self.store.load(self.settings.model_name, version)

    def _connect(self) -> Consumer:
        """Create the Kafka clients: the announcer and the dead-letter producer, then the consumer."""
        s = self.settings
        if s.announce_topic:
            kafka.ensure_topic(s.bootstrap, s.kafka, s.announce_topic, config=COMPACTED)
            self.announcer = Announcer(s.bootstrap, s.kafka, s.announce_topic, self.telemetry.announced)
            self.checkpoints.writer.on_published = self._announce
        if s.dead_letter_topic:
            kafka.ensure_topic(s.bootstrap, s.kafka, s.dead_letter_topic)
            self.dlq = DeadLetterQueue(
                s.bootstrap, s.kafka, s.dead_letter_topic, self.dlq_marks, s.max_record_bytes
            )
            self.checkpoints.dlq = self.dlq
            # A run that crashed may have dead-lettered records after its last snapshot: find them.
            found = self._dead_lettered(s.dead_letter_topic)
            learned = self.partitions.learned
            self.skip_dead_letters = {src for src in found if src[2] >= learned.get((src[0], src[1]), 0)}
            if self.join is not None:  # a joined record's source may lie before the offsets: its
                self.skip_dead_letters = set(found)  # entry was joined before the snapshot, itself not
        topics = [s.topic] if self.join is None else self._join_topics()
        owned = self._owned() if self.lockstep is not None else []
        consumer = kafka.make_consumer(
            s.bootstrap, s.kafka, s.group, s.start_offset, s.session_timeout_ms, s.group_instance_id,
            on_error=self.telemetry.kafka_error, on_commit=self.telemetry.committed,
            report_end=True,  # a partition at its end holds nobody back in event time
            # joining: partition p of both topics to the same trainer
            assignor="cooperative-sticky" if self.join is None else "range",
        )  # fmt: skip
        if self.lockstep is not None:  # static ownership: no rebalance moves a partition mid-round
            self._on_assign(consumer, [TopicPartition(s.topic, p) for p in owned])
            self.lockstep.ready()
            return consumer
        consumer.subscribe(
            topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        return consumer

    def _dead_lettered(self, topic: str) -> set[Source]:
        """The sources of the dead letters sent after the snapshot's marks; with many ranks, rank 0
        reads the topic once for all of them."""
        s, lockstep = self.settings, self.lockstep
        if lockstep is None:
            return already_dead_lettered(s.bootstrap, s.kafka, topic, self.dlq_marks)
        found = (
            already_dead_lettered(s.bootstrap, s.kafka, topic, self.dlq_marks)
            if lockstep.rank == 0
            else set()
        )
        shared = lockstep.broadcast_json(sorted(found), at_start=True)
        return {(topic_, partition, offset) for topic_, partition, offset in shared}

    def _owned(self) -> list[int]:
        """The topic's partitions this rank reads (p mod ranks == rank); too few is an error."""
        s, world = self.settings, self.world
        assert self.lockstep is not None
        count = None  # rank 0 asks, so that every rank divides the same partitions
        if world.rank == 0:
            count = kafka.partition_counts(s.bootstrap, s.kafka, [s.topic], s.connect_timeout_s)[s.topic]
        count = self.lockstep.broadcast_json(count, at_start=True)
        if count is None:
            raise ConfigError(
                f"--topic {s.topic} does not exist: with {world.size} ranks, create it with a multiple "
                f"of {world.size} partitions first"
            )
        if count < world.size:
            raise ConfigError(
                f"--topic {s.topic} has {count} partitions, fewer than the {world.size} ranks: every rank "
                "must own one (add partitions, or run fewer ranks)"
            )
        if count % world.size and world.rank == 0:
            log.warning(
                "--topic %s has %d partitions for %d ranks: some ranks read more of them than others",
                s.topic, count, world.size,
            )  # fmt: skip
        return world.owned(count)

    def _join_topics(self) -> list[str]:
        """The prediction log and the labels topic, created if missing, with as many partitions."""
        s = self.settings
        assert s.prediction_log_topic is not None and s.labels_topic is not None
        topics = [s.prediction_log_topic, s.labels_topic]
        counts = kafka.partition_counts(s.bootstrap, s.kafka, topics, s.connect_timeout_s)
        known = {count for count in counts.values() if count is not None}
        if len(known) > 1:
            raise ConfigError(
                f"--prediction-log-topic {topics[0]} has {counts[topics[0]]} partitions and --labels-topic "
                f"{topics[1]} has {counts[topics[1]]}: the join needs as many on both (an id's "
                "prediction and label must be in the same partition)"
            )
        for topic in topics:
            if counts[topic] is None:
                kafka.ensure_topic(s.bootstrap, s.kafka, topic, partitions=min(known, default=1))
        return topics

    def _checkpointer(self) -> Checkpointer:
        """One process's checkpoints, or those the ranks in lockstep take together."""
        s = self.settings
        args = (self.store, s.model_name, self.metrics, self.partitions, self._content, None,
                s.snapshot_interval_s, s.shutdown_timeout_s)  # fmt: skip
        if self.lockstep is None:
            return Checkpointer(*args, settle=self.settle)
        return AlignedCheckpointer(
            *args, settle=self.settle, ranks=self.lockstep, world_size=self.world.size,
            weights_digest=self._weights_digest, collective_timeout_s=s.collective_timeout_s,
        )  # fmt: skip

    def _weights_digest(self) -> str:
        trainer = self.learner.trainer
        return digest(trainer.model.state()) if trainer is not None else ""

    def _content(self, offsets: Offsets) -> tuple[dict[str, torch.Tensor], SnapshotContent]:
        """What a checkpoint holds: the learner's state, and the label join's (taken on this thread,
        after the learning in flight settled, so it agrees with the offsets and the weights)."""
        tensors, content = self.learner.content(offsets)
        if self.join is None:
            return tensors, content
        state = torch.frombuffer(bytearray(self.join.state()), dtype=torch.uint8)
        return {**tensors, JOIN_STATE: state}, content.model_copy(update={"join": self.join.summary()})

    def _announce(self, snapshot: Snapshot) -> None:
        """Tell the servers, on the writer thread, the moment a snapshot is published."""
        assert self.announcer is not None
        self.announcer.announce(
            Announcement(
                model=snapshot.model_name,
                version=snapshot.version,
                location=self.store.location,
                created_at_ms=snapshot.meta.created_at_ms,
            )
        )

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        s = self.settings
        self.consumer = consumer = self._connect()
        log.info("training %s on %s from %s (device %s)", s.model_name, s.topic, s.bootstrap, self.device)
        rate = self.records_learned if self.world.rank == 0 else 0
        try:
            while self.running if self.lockstep is None else not self.agreed.stop:
                more = self.order is not None and self.order.more_ready  # learn those before waiting
                more = more or self.agreed.rounds > 0 or self.agreed.pressed  # another rank is busy
                messages = consumer.consume(s.batch_size, timeout=0 if more else s.max_batch_wait_ms / 1000)
                self.process(messages)
                if self.lockstep is None:
                    self.checkpoints.commit(consumer)  # commits a written snapshot; starts one when due
                rate = self.records_learned if self.world.rank == 0 else 0
                self.telemetry.tick(rate, consumer, self.partitions, self.order)
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
        if self.lockstep is None:  # many ranks: the final checkpoint was the last round's
            run_bounded(lambda: self.checkpoints.commit(consumer, force=True), timeout, "final checkpoint")
        self.learning.shutdown(wait=False, cancel_futures=True)
        # Leaving the group revokes our partitions (static members keep theirs).
        run_bounded(consumer.close, timeout, "leaving the consumer group")
        self.consumer = None
        self.checkpoints.close()
        if self.announcer is not None:
            self.announcer.close(timeout_s=1.0)
        if self.dlq is not None:
            self.dlq.close(timeout_s=1.0)
        if self.lockstep is not None:
            self.lockstep.close()
        log.info("stopped after %d records learned", self.records_learned)

    def process(self, messages: Sequence[Message]) -> None:
        """Hand polled messages to learning, each once, from owned partitions only, oldest first."""
        readable = []
        for message in messages:
            error = kafka.message_error(message, self.settings.group)  # a refused group raises
            if error is None:
                readable.append(message)
            elif error.code() == KafkaError._PARTITION_EOF:
                if isinstance(self.batching, EventTimeOrder | PartitionRounds):  # seen or not, its last
                    self.batching.reached_end(*_end_of(message))  # messages are before it
            else:
                self.telemetry.kafka_error(error)
        taken = self.partitions.take(readable)
        self.metrics.records_consumed.inc(len(taken))
        self.backlog = backlog = len(messages) >= self.settings.batch_size  # more is waiting in Kafka
        for batch in self.batching.batches(taken, backlog):
            if self.lockstep is not None:
                self.shares.append(batch)
            elif self.join is None:
                self._hand_over(batch)
            else:
                self._join_in(batch)
        if self.lockstep is not None:
            self._rounds(self.lockstep, backlog)
        if self.join is not None:
            self._join_out(whole=backlog or self.settings.deterministic)
        self._collect(keep=MAX_IN_FLIGHT)
        if isinstance(self.batching, EventTimeOrder | PartitionRounds) and self.consumer is not None:
            self._flow(self.consumer, self.batching)

    def settle(self) -> None:
        """Wait until every micro-batch handed over is learned: its offsets may then be checkpointed."""
        self._collect(keep=0)

    def _join_in(self, messages: list[Message]) -> None:
        """Join a micro-batch of either topic; its offsets are done once joined (or refused)."""
        assert self.join is not None
        for message, rejected in self.join.feed(messages, _wall_ms()):
            self._reject(message, rejected)  # type: ignore[arg-type]
        self.partitions.learned_through(messages)
        self.checkpoints.dirty = True

    def _join_out(self, whole: bool) -> None:
        """Hand over what the join made ready (partial micro-batches too, unless `whole`)."""
        assert self.join is not None and self.order is not None
        now = _wall_ms()
        for key in self.order.drained():  # read to its end, and all of it joined
            self.join.reached_end(key, now)
        if self.join.tick(now):
            self.checkpoints.dirty = True
        for records in self.join.batches(whole):
            self._hand_over(records, offsets=False)  # type: ignore[arg-type]
            self.checkpoints.dirty = True
        self.telemetry.join(self.join)

    def _hand_over(self, messages: Sequence[Message], offsets: bool = True) -> None:
        """Decode a micro-batch here and have the learning thread learn it; once learned, its
        `offsets` count as done (joined records: their offsets were done once joined)."""
        if not self.decoder.fixed:  # the first valid record fixes the decoder: one at a time till then
            self.settle()
        try:
            decoded: DecodedBatch | None = self.decoder.decode([m.value() for m in messages])
        except Exception:  # a bug of ours; isolated on the learning thread, record by record
            decoded = None
        self._collect(keep=MAX_IN_FLIGHT - 1)
        with self.waiting_lock:
            self.waiting += 1
        future = self.learning.submit(self._learn_handed, messages, decoded)
        self.in_flight.append((messages, future, offsets))

    def _collect(self, keep: int) -> None:
        """Account for learned batches, oldest first, until at most `keep` are in flight.

        A batch whose learning failed stops the trainer: it and every batch after it stay
        unlearned as far as offsets go, and no checkpoint is taken any more (the weights may
        hold batches after it), so a restart resumes at the newest snapshot's offsets.
        """
        while self.in_flight and (len(self.in_flight) > keep or self.in_flight[0][1].done()):
            messages, future, offsets = self.in_flight.popleft()
            if self.checkpoints.halted:
                if future.cancel():  # never to start: no longer waiting
                    with self.waiting_lock:
                        self.waiting -= 1
                continue
            try:
                future.result()
            except BaseException:
                self.checkpoints.halted = True
                raise
            if offsets:
                self.partitions.learned_through(messages)
                self.checkpoints.dirty = True

    def _flow(self, consumer: Consumer, order: "EventTimeOrder[Message] | PartitionRounds[Message]") -> None:
        """Pause partitions that ran ahead in event time; resume them once the others caught up."""
        pause, resume = order.flow()
        if pause:
            consumer.pause([TopicPartition(topic, partition) for topic, partition in pause])
        if resume:
            consumer.resume([TopicPartition(topic, partition) for topic, partition in resume])

    def _learn_handed(self, messages: Sequence[Message], decoded: DecodedBatch | None) -> None:
        """The learning thread's work for a handed-over micro-batch."""
        with self.waiting_lock:
            self.waiting -= 1
        self.isolator.learn(messages, decoded)

    def _pressed(self) -> bool:
        """The step policy's cue: another micro-batch waits for the learning thread, or the last
        poll came back full (a backlog: the next one is being decoded); many ranks: any rank's."""
        if self.lockstep is not None:
            return self.agreed.pressed
        return self.waiting > 0 or self.backlog

    def _learn_valid(self, batch: DecodedBatch) -> int:
        """Learn a decoded batch's valid records; how many were learned before a step met a non-finite."""
        assert self.decoder.features is not None  # fixed by the first valid record
        return self.learner.learn(batch, self.decoder.features, self._pressed)

    def _reject(self, message: Message, rejected: Rejected) -> None:
        if isinstance(message, Shared):  # another rank's record: that rank reports it
            return
        topic, partition, offset = source = position(message)
        self.telemetry.rejected(f"{topic}[{partition}]@{offset}", rejected.reason.value, rejected.detail)
        if self.dlq is None:
            return
        if source in self.skip_dead_letters:
            self.skip_dead_letters.discard(source)  # dead-lettered by the run before a crash
            return
        self.dlq.send(message, rejected)

    # -- many ranks in lockstep -----------------------------------------------------------------

    def _rounds(self, lockstep: Lockstep, backlog: bool) -> None:
        """Agree with the other ranks, learn the agreed rounds, and checkpoint when agreed."""
        if isinstance(self.batching, PartitionRounds):
            ready, blocked = self.batching.ready()
        else:
            ready, blocked = len(self.shares), None  # a rank with nothing adds an empty share
        checkpoints = self.checkpoints
        assert isinstance(checkpoints, AlignedCheckpointer)
        self.agreed = agreed = lockstep.agree(ready, blocked, backlog, not self.running, checkpoints.due())
        for _ in range(agreed.rounds):
            if isinstance(self.batching, PartitionRounds):
                mine = self.batching.take()
            else:
                mine = self.shares.popleft() if self.shares else []
            self._learn_round(lockstep, mine)
        if (agreed.due or agreed.stop) and checkpoints.dirty:  # dirty alike on every rank
            checkpoints.checkpoint_round(self.consumer, final=agreed.stop)
        elif agreed.stop:  # nothing new: the newest snapshot holds these offsets; Kafka gets them too
            checkpoints.commit_bounded(self.consumer, self.partitions.to_commit())

    def _learn_round(self, lockstep: Lockstep, mine: list[Message]) -> None:
        """Learn one round: every rank's share, in rank order, here and on every rank."""
        records = [record for share in lockstep.gather_records(mine) for record in share]
        if not records:
            return
        before = self.records_learned
        self.isolator.learn(records)  # type: ignore[arg-type]
        steps = self.learner.trainer.steps if self.learner.trainer is not None else 0
        lockstep.same("learning a round", self.records_learned - before, steps)
        self.partitions.learned_through(mine)
        self.checkpoints.dirty = True

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
        resets = self.resume.resets(
            self.partitions, committed, [(tp.topic, tp.partition) for tp in partitions]
        )
        for tp in partitions:
            key = (tp.topic, tp.partition)
            start = self.partitions.assign(key, committed.get(key, -1), resets.get(key))
            if start is not None:
                tp.offset = start
        if isinstance(self.batching, EventTimeOrder | PartitionRounds):
            self.batching.assigned((tp.topic, tp.partition) for tp in partitions)
        if self.lockstep is not None:
            consumer.assign(partitions)
        elif self.join is None:
            consumer.incremental_assign(partitions)
        else:  # the range assignor is eager: each assignment is the whole of it
            consumer.assign(partitions)
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Hand partitions over cleanly: what we learned from them is checkpointed and committed first."""
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self.checkpoints.commit(consumer, force=True, revoking=revoked)  # within --shutdown-timeout-s
        self._release(consumer, partitions)
        log.info("revoked %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member may own these already: committing now could move its offsets backwards.
        self.settle()  # what is in flight is learned; only what is not handed over yet is dropped
        self._release(consumer, partitions)
        log.warning("lost %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    def _release(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        if self.order is not None:  # librdkafka keeps a pause across unassign and assign
            paused = set(self.order.paused_keys())
            resume = [tp for tp in partitions if (tp.topic, tp.partition) in paused]
            if resume:
                consumer.resume(resume)
        self.partitions.release(keys)
        self.batching.release(keys)
        for tp in partitions:
            self.telemetry.released(tp.partition)
        if self.join is None:
            consumer.incremental_unassign(partitions)
        else:  # eager: all of them are revoked
            consumer.unassign()


def _cores() -> int:
    """The cores this process may run on (all of the machine's where the OS does not say)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _wall_ms() -> float:
    return time.monotonic() * 1000


def _end_of(event: Message) -> tuple[tuple[str, int], int]:
    """The partition an end-of-partition event is about, and the offset of its end."""
    topic, partition, offset = position(event)
    return (topic, partition), offset
