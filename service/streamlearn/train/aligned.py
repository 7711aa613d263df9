"""Aligned checkpoints: one snapshot of ranks in lockstep, taken at a round boundary.

Every rank has its dead letters delivered, then contributes its partitions' offsets, its
dead-letter marks and a digest of its weights; rank 0 checks that the digests agree, merges the
offsets and marks, and writes one snapshot (with `world: {size, digest}`) through the same
background writer as a single trainer's; once it is published each rank commits its own
offsets. The order, and so exactly-once, is the Checkpointer's.
"""

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

from confluent_kafka import Consumer

from streamlearn.errors import SnapshotError
from streamlearn.faults import crash_point
from streamlearn.snapshots import DeadLetterMarks, Snapshot
from streamlearn.train.checkpoint import Checkpointer, run_bounded
from streamlearn.train.partitions import Offsets

log = logging.getLogger(__name__)


class Collectives(Protocol):
    """What an aligned checkpoint needs of the ranks (Lockstep; a stand-in in tests)."""

    rank: int

    def gather_json(self, value: Any) -> list[Any]: ...
    def broadcast_json(self, value: Any) -> Any: ...
    def lost(self, what: str, exc: BaseException) -> Any: ...


class AlignedCheckpointer(Checkpointer):
    """A Checkpointer whose snapshots the ranks take together, at the rounds they agree on."""

    def __init__(
        self,
        *args: Any,
        ranks: Collectives,
        world_size: int,
        weights_digest: Callable[[], str],
        collective_timeout_s: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.ranks = ranks
        self.world_size = world_size
        self.weights_digest = weights_digest
        self.wait_s = min(self.timeout_s, collective_timeout_s / 2)  # the other ranks wait meanwhile
        self.aligned_write: Future[Snapshot] | None = None  # rank 0's newest snapshot write

    def due(self) -> bool:
        """Whether this rank would checkpoint now (the ranks agree on it before anyone does)."""
        return self.dirty and time.monotonic() - self.last_started >= self.interval_s

    def checkpoint_round(self, consumer: Consumer | None, final: bool) -> None:
        """A snapshot at this round boundary, on every rank at once; then each rank's own commit."""
        marks: dict[int, int] | None = {}
        if self.dlq is not None:  # the dead letters of what was learned are delivered first
            marks = self.dlq.wait_delivered(self.dlq.barrier(), self.wait_s)
        own = self.partitions.to_commit()
        mine = {
            "offsets": [[t, p, o] for (t, p), o in own.items()],
            "marks": {str(partition): mark for partition, mark in (marks or {}).items()},
            "digest": self.weights_digest(),
            "ok": marks is not None,
        }
        everyone = self.ranks.gather_json(mine)
        crash_point("lockstep.gathered")
        version = self._write(everyone) if self.ranks.rank == 0 else 0
        version = self.ranks.broadcast_json(version)
        if version < 0:
            self.ranks.lost("the weights check", RuntimeError("the ranks' weights differ"))
        self.last_started = time.monotonic()
        if version == 0:
            return  # not written: the next due round tries again
        self.dirty = False
        self.last_written = time.time()
        self.metrics.snapshot_version.set(version)
        crash_point("lockstep.published")
        if final:
            self.commit_bounded(consumer, own)
        else:
            self.commit_offsets(consumer, own, asynchronous=True)

    def commit_bounded(self, consumer: Consumer | None, offsets: Offsets) -> None:
        """A last synchronous commit, given up after the timeout (the snapshot has the offsets)."""
        run_bounded(
            lambda: self.commit_offsets(consumer, offsets, asynchronous=False),
            self.timeout_s,
            "committing the offsets",
        )

    def _write(self, everyone: list[dict[str, Any]]) -> int:
        """Rank 0: write the snapshot of a round boundary; its version, 0 when not written, -1
        when the ranks' weights differ (which lockstep makes impossible, and this proves)."""
        if self.aligned_write is not None and not self.aligned_write.done():
            log.warning("the last snapshot is still being written: none more until it is")
            return 0
        if not all(rank["ok"] for rank in everyone):
            log.warning("a rank's dead letters were not delivered in time: no snapshot this time")
            return 0
        digests = {rank["digest"] for rank in everyone}
        if len(digests) > 1:
            log.error("the ranks' weights differ at a round boundary: %s", [r["digest"] for r in everyone])
            return -1
        offsets, marks = _merged(dict(self.partitions.learned), everyone)
        try:
            tensors, content = self.content(offsets)
        except SnapshotError as exc:
            self.metrics.snapshot_failures.inc()
            log.error("%s", exc)
            return 0
        content = content.model_copy(update={"world": {"size": self.world_size, "digest": digests.pop()}})
        extra: dict[str, Any] = {}
        if self.dlq is not None:
            extra["dlq"] = DeadLetterMarks(topic=self.dlq.topic, marks=dict(sorted(marks.items())))
        started = time.monotonic()
        self.aligned_write = future = self.writer.submit(self.model_name, tensors, content, lambda: extra)
        try:  # the other ranks wait meanwhile, for half --collective-timeout-s at most
            snapshot = future.result(timeout=self.wait_s)
        except FutureTimeout:  # it may still be published: a whole snapshot, its offsets not committed
            log.warning("snapshot not written within half --collective-timeout-s; offsets not committed")
            return 0
        except Exception as exc:
            self.metrics.snapshot_failures.inc()
            log.error("snapshot failed, offsets not committed (will retry): %s", exc)
            return 0
        self.metrics.snapshot_write.observe(time.monotonic() - started)
        return snapshot.version


def _merged(offsets: Offsets, everyone: list[dict[str, Any]]) -> tuple[Offsets, dict[int, int]]:
    """Every rank's offsets over rank 0's learned ones, and each partition's highest dead-letter mark."""
    marks: dict[int, int] = {}
    for rank in everyone:
        offsets.update({(topic, partition): offset for topic, partition, offset in rank["offsets"]})
        for partition, mark in rank["marks"].items():
            marks[int(partition)] = max(marks.get(int(partition), 0), mark)
    return offsets, marks
