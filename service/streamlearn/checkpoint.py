"""Checkpoints: a durable snapshot of the model and its offsets, then the offset commit.

The order is what makes learning exactly-once:
1. every dead letter sent for records before the checkpoint is delivered;
2. the snapshot (model, optimizer, normalizer, offsets, dead-letter marks) is durable on disk;
3. only then are the offsets committed to Kafka.
A crash between any two steps is harmless: the trainer resumes from the newest snapshot and
seeks to its offsets, which are exactly where its learning stopped.
"""

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from confluent_kafka import Consumer, KafkaException, TopicPartition
from torch import Tensor

from streamlearn.dlq import DeadLetterQueue
from streamlearn.errors import SnapshotError
from streamlearn.faults import crash_point
from streamlearn.metrics import TrainerMetrics
from streamlearn.snapshots import BackgroundWriter, Snapshot, SnapshotStore
from streamlearn.trainer import Trainer

log = logging.getLogger(__name__)

Offsets = dict[tuple[str, int], int]  # (topic, partition) -> next offset to learn from
NORMALIZER_IN_META = 1024  # features up to which the normalizer is also written into meta.json


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
    """Writes snapshots in the background and commits their offsets once they are durable."""

    def __init__(
        self,
        store: SnapshotStore,
        model_name: str,
        metrics: TrainerMetrics,
        dlq: DeadLetterQueue | None,
        owned: Callable[[], set[tuple[str, int]]],
        dlq_timeout_s: float = 30.0,
    ) -> None:
        self.model_name = model_name
        self.owned = owned  # the partitions assigned to us now: the only ones we may commit
        self.metrics = metrics
        self.dlq = dlq
        self.dlq_timeout_s = dlq_timeout_s
        self.writer = BackgroundWriter(store)
        self.pending: Pending | None = None
        self.last_started = time.monotonic()
        self.last_written = time.time()
        metrics.snapshot_age.set_function(lambda: time.time() - self.last_written)

    def restored(self, snapshot: Snapshot) -> None:
        self.last_written = snapshot.meta["created_at_ms"] / 1000
        self.metrics.snapshot_version.set(snapshot.version)

    def start(self, tensors: dict[str, Tensor], meta: dict[str, Any], offsets: Offsets) -> bool:
        """Begin a checkpoint unless one is under way; False when one is."""
        if self.pending is not None:
            return False
        barrier = self.dlq.barrier() if self.dlq is not None else 0

        def deliver_dead_letters_first() -> dict[str, Any]:
            if self.dlq is None:
                return {}
            marks = self.dlq.wait_delivered(barrier, self.dlq_timeout_s)
            if marks is None:
                raise SnapshotError("dead letters were not delivered in time; offsets not advanced")
            return {"dlq": {"topic": self.dlq.topic, "marks": {str(p): o for p, o in sorted(marks.items())}}}

        future = self.writer.submit(self.model_name, tensors, meta, deliver_dead_letters_first)
        self.pending = Pending(future, dict(offsets), time.monotonic())
        self.last_started = time.monotonic()
        return True

    def finish(self, consumer: Consumer | None, wait: bool, asynchronous: bool = True) -> bool | None:
        """Commit a written checkpoint: True when done, False if the write failed, None if none was ready."""
        pending = self.pending
        if pending is None or (not wait and not pending.future.done()):
            return None
        self.pending = None
        try:
            snapshot = pending.future.result()
        except Exception as exc:
            self.metrics.snapshot_failures.inc()
            log.error("snapshot failed, offsets not committed (will retry): %s", exc)
            return False
        self.metrics.snapshot_write.observe(time.monotonic() - pending.started)
        self.metrics.snapshot_version.set(snapshot.version)
        self.last_written = snapshot.meta["created_at_ms"] / 1000
        crash_point("commit.before")
        self.commit(consumer, pending.offsets, asynchronous)
        return True

    def commit(self, consumer: Consumer | None, offsets: Offsets, asynchronous: bool) -> bool:
        """Commit the offsets of partitions we still own; a synchronous commit says whether it succeeded."""
        owned = self.owned()
        offsets = {key: offset for key, offset in offsets.items() if key in owned}
        if consumer is None or not offsets:
            return not offsets
        partitions = [
            TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()
        ]
        try:
            if asynchronous:
                consumer.commit(offsets=partitions, asynchronous=True)  # acknowledged through on_commit
                return False
            consumer.commit(offsets=partitions, asynchronous=False)
        except KafkaException as exc:
            # Harmless: the snapshot holds these offsets, and a restart seeks to them.
            log.warning("offset commit failed (the snapshot still holds the offsets): %s", exc.args[0].str())
            return False
        self.metrics.offsets_committed.inc()
        return True

    def close(self) -> None:
        self.writer.close()


def snapshot_content(
    trainer: Trainer | None, records_learned: int, offsets: Offsets, config: dict[str, Any]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and metadata of a snapshot: model, optimizer, normalizer, offsets, config."""
    by_topic: dict[str, dict[str, int]] = {}
    for (topic, partition), offset in sorted(offsets.items()):
        by_topic.setdefault(topic, {})[str(partition)] = offset
    meta: dict[str, Any] = {"records_trained": records_learned, "offsets": by_topic, "config": config}
    if trainer is None:  # nothing valid seen yet: the snapshot only records offsets
        return {}, {**meta, "model": None, "training": None}
    tensors, training = trainer.state()
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):
        raise SnapshotError("the model has non-finite weights: no snapshot written")
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
