"""Checkpoints: a durable snapshot of the model and its offsets, then the offset commit.

The order is what makes learning exactly-once:
1. every dead letter sent for records before the checkpoint is delivered;
2. the snapshot (model, optimizer, normalizer, offsets, dead-letter marks) is durable;
3. only then are the offsets committed to Kafka, and only for partitions we still own.
A crash between any two steps is harmless: the trainer resumes from the newest snapshot and
seeks to its offsets, which are exactly where its learning stopped.
"""

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from torch import Tensor

from streamlearn.errors import SnapshotError
from streamlearn.faults import crash_point
from streamlearn.metrics import TrainerMetrics
from streamlearn.snapshots import BackgroundWriter, DeadLetterMarks, Snapshot, SnapshotContent, SnapshotStore
from streamlearn.snapshots.tensors import all_finite
from streamlearn.train.dlq import DeadLetterQueue
from streamlearn.train.partitions import Key, Offsets, Partitions
from streamlearn.train.trainer import Trainer

log = logging.getLogger(__name__)

NORMALIZER_IN_META = 1024  # features up to which the normalizer is also written into meta.json
Content = Callable[[Offsets], tuple[dict[str, Tensor], SnapshotContent]]  # offsets -> what to save


@dataclass
class Pending:
    """A snapshot being written, and the offsets to commit once it is durable."""

    future: "Future[Snapshot]"
    offsets: Offsets
    started: float


def run_bounded(action: Callable[[], Any], timeout_s: float, what: str) -> bool:
    """Run a call that may block on an unreachable broker; give up on it after `timeout_s`."""
    thread = threading.Thread(target=action, name=what, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("%s did not finish within %gs; giving up on it", what, timeout_s)
        return False
    return True


class Checkpointer:
    """When a checkpoint is due, writing it in the background, and committing once it is durable.

    `dirty` says whether something was learned (or dead-lettered) since the last checkpoint.
    """

    def __init__(
        self,
        store: SnapshotStore,
        model_name: str,
        metrics: TrainerMetrics,
        partitions: Partitions[Any],
        content: Content,
        dlq: DeadLetterQueue | None = None,
        interval_s: float = 2.0,
        timeout_s: float = 30.0,
        settle: Callable[[], None] = lambda: None,
    ) -> None:
        self.model_name = model_name
        self.metrics = metrics
        self.partitions = partitions
        self.content = content
        self.dlq = dlq
        self.interval_s = interval_s
        self.timeout_s = timeout_s  # for dead letters to be delivered, and for a forced checkpoint
        self.settle = settle  # waits for the learning in flight: offsets and weights then agree
        self.halted = False  # learning failed: weights and offsets may disagree, so nothing is saved
        self.writer = BackgroundWriter(store)
        self.pending: Pending | None = None
        self.dirty = False
        self.last_started = time.monotonic()
        self.last_written = time.time()
        metrics.snapshot_age.set_function(lambda: time.time() - self.last_written)

    def restored(self, snapshot: Snapshot) -> None:
        self.last_written = snapshot.meta.created_at_ms / 1000
        self.metrics.snapshot_version.set(snapshot.version)

    def commit(
        self, consumer: Consumer | None, force: bool = False, revoking: set[Key] | None = None
    ) -> bool:
        """Make progress durable; the one checkpoint path for the loop, a revoke and shutdown.

        Without force (the loop, each poll): commit a snapshot whose write has finished, and
        start the next one when it is due; never waits. With force (revoke, shutdown): the
        state learned so far is snapshotted within `timeout_s`, then its offsets (only the
        revoked partitions' when revoking) are committed synchronously. Returns whether the
        learned state is durable. Once halted, nothing more is saved or committed: a restart
        resumes from the newest snapshot, whose weights and offsets agree.
        """
        if self.halted:
            return False
        if not force:
            if self._finish(consumer, wait=False) is False:
                self.dirty = True  # the write failed: try again at the next interval
            due = time.monotonic() - self.last_started >= self.interval_s
            if self.dirty and self.pending is None and due:
                self._start()
            return not self.dirty and self.pending is None
        deadline = time.monotonic() + self.timeout_s
        self.settle()
        if self.pending is not None:
            written = self._finish(consumer, wait=True, deadline=deadline, revoking=revoking)
            if self.pending is not None:
                return False  # still being written at the deadline: commit nothing now
            if not written:
                self.dirty = True
            elif not self.dirty:
                return True
        if self.dirty:
            return self._start() and bool(
                self._finish(consumer, wait=True, deadline=deadline, revoking=revoking)
            )
        # Nothing new: the newest snapshot holds these offsets; make sure Kafka has them too (an
        # earlier asynchronous commit may still be on its way, or may have failed).
        self.commit_offsets(consumer, self.partitions.to_commit(revoking), asynchronous=False)
        return True

    def close(self) -> None:
        self.writer.close()

    def _start(self) -> bool:
        """Begin writing a snapshot of the state now; False when its content cannot be taken."""
        self.settle()
        offsets = dict(self.partitions.learned)
        try:
            tensors, meta = self.content(offsets)
        except SnapshotError as exc:
            self.metrics.snapshot_failures.inc()
            log.error("%s", exc)
            return False
        barrier = self.dlq.barrier() if self.dlq is not None else 0
        future = self.writer.submit(self.model_name, tensors, meta, lambda: self._dead_letters_first(barrier))
        self.pending = Pending(future, offsets, time.monotonic())
        self.last_started = time.monotonic()
        self.dirty = False
        return True

    def _dead_letters_first(self, barrier: int) -> dict[str, Any]:
        """On the writer thread, before the snapshot: wait for the dead letters it must follow."""
        if self.dlq is None:
            return {}
        marks = self.dlq.wait_delivered(barrier, self.timeout_s)
        if marks is None:
            raise SnapshotError("dead letters were not delivered in time; offsets not advanced")
        return {"dlq": DeadLetterMarks(topic=self.dlq.topic, marks=dict(sorted(marks.items())))}

    def _finish(
        self,
        consumer: Consumer | None,
        wait: bool,
        deadline: float | None = None,
        revoking: set[Key] | None = None,
    ) -> bool | None:
        """Commit a written snapshot's offsets: True when it was written, False if the write failed
        or ran past the deadline (then it stays pending), None if none was ready (without wait)."""
        pending = self.pending
        if pending is None or (not wait and not pending.future.done()):
            return None
        try:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            snapshot = pending.future.result(timeout)
        except FutureTimeout:
            log.warning("snapshot not written within %gs; offsets not committed", self.timeout_s)
            return False  # still pending: a later call commits it, for the partitions owned then
        except Exception as exc:
            self.pending = None
            self.dirty = True  # what it held is not durable: never commit past it without a new one
            self.metrics.snapshot_failures.inc()
            log.error("snapshot failed, offsets not committed (will retry): %s", exc)
            return False
        self.pending = None
        self.metrics.snapshot_write.observe(time.monotonic() - pending.started)
        self.metrics.snapshot_version.set(snapshot.version)
        self.last_written = snapshot.meta.created_at_ms / 1000
        crash_point("commit.before")
        offsets = {k: o for k, o in pending.offsets.items() if k in self.partitions.to_commit(revoking)}
        self.commit_offsets(consumer, offsets, asynchronous=not wait)
        return True

    def commit_offsets(self, consumer: Consumer | None, offsets: Offsets, asynchronous: bool) -> bool:
        """Commit the offsets of partitions we still own; a synchronous commit says whether it succeeded."""
        owned = self.partitions.owned
        offsets = {key: offset for key, offset in offsets.items() if key in owned}
        if consumer is None or not offsets:
            return True
        partitions = [
            TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()
        ]
        try:
            if asynchronous:
                consumer.commit(offsets=partitions, asynchronous=True)  # acknowledged through on_commit
            else:
                consumer.commit(offsets=partitions, asynchronous=False)
        except KafkaException as exc:
            # Harmless: the snapshot holds these offsets, and a restart seeks to them.
            log.warning("offset commit failed (the snapshot still holds the offsets): %s", exc.args[0].str())
            return False
        if not asynchronous:  # an asynchronous one is counted when acknowledged (on_commit)
            self.metrics.offsets_committed.inc()
        return True


def snapshot_content(
    trainer: Trainer | None, records_learned: int, offsets: Offsets, config: dict[str, Any]
) -> tuple[dict[str, Tensor], SnapshotContent]:
    """The tensors and content of a snapshot: model, optimizer, normalizer, offsets, config."""
    by_topic: dict[str, dict[int, int]] = {}
    for (topic, partition), offset in sorted(offsets.items()):
        by_topic.setdefault(topic, {})[partition] = offset
    if trainer is None:  # nothing valid seen yet: the snapshot only records offsets
        return {}, SnapshotContent(records_trained=records_learned, offsets=by_topic, config=config)
    tensors, training = trainer.state()
    if not all_finite(tensors.values()):
        raise SnapshotError("the model has non-finite weights: no snapshot written")
    content = SnapshotContent(
        records_trained=records_learned,
        offsets=by_topic,
        config=config,
        model=trainer.model.spec.to_dict(),
        normalizer=_normalizer_summary(trainer),
        training=training,
    )
    return tensors, content


def _normalizer_summary(trainer: Trainer) -> dict[str, Any]:
    norm = trainer.model.normalizer
    summary: dict[str, Any] = {"count": int(norm.count.item())}
    if norm.mean.numel() <= NORMALIZER_IN_META:
        summary.update(mean=norm.mean.tolist(), variance=(norm.m2 / norm.count.clamp_min(1)).tolist())
    return summary
