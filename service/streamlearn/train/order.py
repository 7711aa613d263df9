"""In which order taken messages are learned: by event time across partitions, or by offsets.

Kafka orders records only within a partition. After any backlog (a restart, an outage, a slow
period) the consumer hands over one partition's chunk, then another's, so learning them as they
come would learn a drifting stream out of time order. `EventTimeOrder` merges the owned
partitions by the Kafka message timestamp instead, the way Kafka Streams' task idling and
Flink's watermark alignment do:
- a record is released once every partition still being read has reached its timestamp (the
  watermark), so nothing older can still arrive;
- a partition at its end (EOF) holds nobody back;
- a partition with nothing buffered that has sent nothing for `max_wait_ms` is idle and holds
  nobody back either, so a partition that cannot deliver delays learning by at most that long
  (Kafka Streams' max.task.idle.ms). The bound is on wall-clock time on purpose: in a backlog,
  event time stops advancing while one partition is silent, and one partition's first fetch can
  span more event time than any sensible bound before the others have answered;
- a partition buffering BUFFER_RECORDS records or BUFFER_BYTES bytes is paused until it is
  drained to half, so memory stays bounded while the others catch up.
Within a partition, offsets are never reordered: a timestamp that goes backwards counts as its
predecessor's; equal timestamps of two partitions go in partition order. Without `max_wait_ms`
(the label join under --deterministic) no partition is ever idle and a record is released only
once every partition still being read is past its timestamp, so the order is a function of the
records alone, never of when they arrived. `OffsetBatches` (--deterministic) ignores time: a
batch is exactly the next `batch_size` records of one partition, whatever order messages arrive in.
Pure bookkeeping, no Kafka client: the loop pauses and resumes what `flow()` says.
"""

import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol

import numpy as np

from streamlearn.train.partitions import Consumed, Key, M, position

NEVER = float("-inf")
RELEASE_BATCHES = 8  # micro-batches released per poll at most
BUFFER_RECORDS, BUFFER_BYTES = 30_000, 16 << 20  # per partition, before it is paused


class Batching(Protocol[M]):
    """Turns taken messages into the micro-batches to learn, in the order to learn them."""

    def batches(self, taken: Sequence[M], backlog: bool = False) -> list[list[M]]: ...
    def release(self, keys: Iterable[Key]) -> None: ...


class _PartitionBuffers(Generic[M]):
    """Taken messages buffered per partition in offset order, cut into batches of `batch_size`."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._buffers: dict[Key, list[M]] = {}
        self._next: dict[Key, int] = {}  # the offset after the last record taken

    def _buffer(self, taken: Sequence[M]) -> None:
        for message in taken:
            topic, partition, offset = position(message)
            self._buffers.setdefault((topic, partition), []).append(message)
            self._next[(topic, partition)] = offset + 1

    def _cut(self, key: Key) -> list[M]:
        """The partition's next `batch_size` messages, off its buffer (none until it holds them)."""
        buffer = self._buffers[key]
        if len(buffer) < self.batch_size:
            return []
        batch = buffer[: self.batch_size]
        del buffer[: self.batch_size]
        return batch


class OffsetBatches(_PartitionBuffers[M]):
    """Batches of exactly `batch_size` records of one partition, defined by offsets (--deterministic)."""

    def batches(self, taken: Sequence[M], backlog: bool = False) -> list[list[M]]:
        self._buffer(taken)
        batches = []
        for key in self._buffers:
            while batch := self._cut(key):
                batches.append(batch)
        return batches

    def release(self, keys: Iterable[Key]) -> None:
        """An unfinished batch of a partition we no longer own is dropped, not learned."""
        for key in keys:
            self._buffers.pop(key, None)


class PartitionRounds(_PartitionBuffers[M]):
    """--deterministic with many ranks: round k of a rank holds the k-th `batch_size` records of
    each partition it owns, in partition order, so a round is a function of the records alone.

    A rank can take part in a round once each of its partitions has that round's records, or has
    been read to its end (a partition at its end never holds a round back: it adds nothing).
    """

    def __init__(self, batch_size: int) -> None:
        super().__init__(batch_size)
        self._ends: dict[Key, int] = {}  # where each partition's end was reported
        self._paused: set[Key] = set()

    def assigned(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self._buffers.setdefault(key, [])

    def batches(self, taken: Sequence[M], backlog: bool = False) -> list[list[M]]:
        """Buffer the taken messages; rounds are taken with take(), never as loose batches."""
        self._buffer(taken)
        return []

    def reached_end(self, key: Key, offset: int) -> None:
        self._ends[key] = offset

    def ready(self) -> tuple[int, int | None]:
        """The rounds this rank has records for, and those it can take part in before it must wait
        for more records (None: every partition is at its end, it never holds a round back)."""
        full = {key: len(buffer) // self.batch_size for key, buffer in self._buffers.items()}
        reading = [n for key, n in full.items() if not self._at_end(key)]
        return max(full.values(), default=0), min(reading) if reading else None

    def take(self) -> list[M]:
        """The next round's records: the next `batch_size` of each partition that has them."""
        records: list[M] = []
        for key in sorted(self._buffers):
            records += self._cut(key)
        return records

    def release(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self._buffers.pop(key, None)

    def flow(self) -> tuple[list[Key], list[Key]]:
        """Partitions to pause (far ahead of a round another partition holds back) and to resume
        (drained to half): a paused one holds whole rounds, so it never holds a round back."""
        limit = max(BUFFER_RECORDS, 2 * self.batch_size)
        pause, resume = [], []
        for key, buffer in self._buffers.items():
            if key not in self._paused and len(buffer) >= limit:
                self._paused.add(key)
                pause.append(key)
            elif key in self._paused and len(buffer) <= limit // 2:
                self._paused.discard(key)
                resume.append(key)
        return pause, resume

    @property
    def paused(self) -> int:
        return len(self._paused)

    def paused_keys(self) -> list[Key]:
        return sorted(self._paused)

    def _at_end(self, key: Key) -> bool:
        """Read to its end: its end was reported at or after the last record taken (after it, when
        control records such as a transaction's commit marker follow), and no round is buffered."""
        end = self._ends.get(key)
        return (
            end is not None and end >= self._next.get(key, end) and len(self._buffers[key]) < self.batch_size
        )


class Timestamped(Consumed, Protocol):
    def timestamp(self) -> tuple[int, int]: ...


@dataclass
class _Lane:
    """One partition's taken, not yet released messages, and how far its event time has come."""

    heard: float  # monotonic time of its last message or end of partition
    messages: list[Timestamped] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # event time (ms), never decreasing
    frontier: float = NEVER  # newest event time taken
    bytes: int = 0  # value bytes buffered
    next_offset: int = 0  # after the last message taken
    end: int = -1  # where the partition's end was last reported (-1: not yet)
    paused: bool = False

    @property
    def at_end(self) -> bool:
        """Everything up to the reported end is taken: nothing is known to be on its way."""
        return self.end >= self.next_offset


class EventTimeOrder(Generic[M]):
    """Releases taken messages in event-time order across partitions, with bounded buffering."""

    def __init__(
        self, batch_size: int, max_wait_ms: int | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.batch_size = batch_size
        self.max_wait_ms = max_wait_ms
        self.buffer_records = max(BUFFER_RECORDS, 4 * batch_size)
        self.clock = clock
        self._lanes: dict[Key, _Lane] = {}
        self.more_ready = False  # the last release was capped: poll without waiting

    # -- what the loop reports --------------------------------------------------------------

    def assigned(self, keys: Iterable[Key]) -> None:
        now = self.clock()
        for key in keys:
            self._lanes.setdefault(key, _Lane(heard=now))

    def release(self, keys: Iterable[Key]) -> None:
        """Forget partitions we no longer own; their unreleased messages are not learned."""
        for key in keys:
            self._lanes.pop(key, None)

    def reached_end(self, key: Key, offset: int) -> None:
        """The consumer reached the end of a partition, at `offset` (the end event's offset)."""
        lane = self._lanes.get(key)
        if lane is not None:
            lane.end, lane.heard = offset, self.clock()

    def batches(self, taken: Sequence[M], backlog: bool = False) -> list[list[M]]:
        """Add the taken messages; the micro-batches that may be learned now, oldest first.

        In a `backlog` (the poll came back full), only whole micro-batches are released, as a
        single partition's polls would give them; the rest waits for the next poll.
        """
        self._add(taken)
        ready = self._ready(whole=backlog)
        size = self.batch_size
        return [ready[start : start + size] for start in range(0, len(ready), size)]

    # -- what the loop asks -----------------------------------------------------------------

    def flow(self) -> tuple[list[Key], list[Key]]:
        """Partitions to pause (buffering too much) and to resume (drained to half)."""
        pause, resume = [], []
        # without idling, the partition at the watermark must keep coming: paused, it would
        # never release (its records are not before the watermark) and never resume
        held_back = self._watermark() if self.max_wait_ms is None else NEVER
        for key, lane in self._lanes.items():
            records, size = len(lane.messages), lane.bytes
            if lane.frontier <= held_back:
                if lane.paused:
                    lane.paused, lane.heard = False, self.clock()
                    resume.append(key)
                continue
            if not lane.paused and (records >= self.buffer_records or size >= BUFFER_BYTES):
                lane.paused = True
                pause.append(key)
            elif lane.paused and records <= self.buffer_records // 2 and size <= BUFFER_BYTES // 2:
                lane.paused, lane.heard = False, self.clock()  # silent from now on only if it stays so
                resume.append(key)
        return pause, resume

    @property
    def paused(self) -> int:
        return sum(lane.paused for lane in self._lanes.values())

    def paused_keys(self) -> list[Key]:
        return [key for key, lane in self._lanes.items() if lane.paused]

    def drained(self) -> list[Key]:
        """Partitions read to their end whose every message was released."""
        return [key for key, lane in self._lanes.items() if lane.at_end and not lane.messages]

    @property
    def buffered(self) -> int:
        return sum(len(lane.messages) for lane in self._lanes.values())

    def skew_ms(self) -> float:
        """How far the newest event time taken is ahead of the watermark (0 when nobody waits)."""
        watermark, newest = self._watermark(), self._newest()
        if watermark in (NEVER, float("inf")) or newest == NEVER:
            return 0.0
        return max(newest - watermark, 0.0)

    # -- the rules --------------------------------------------------------------------------

    def _add(self, taken: Sequence[M]) -> None:
        now = self.clock()
        for message in taken:
            topic, partition, offset = position(message)
            lane = self._lanes.get((topic, partition))
            if lane is None:  # taken from a partition we own: assigned() was told
                lane = self._lanes[(topic, partition)] = _Lane(heard=now)
            kind, stamp = message.timestamp()  # type: ignore[attr-defined]
            if kind != 0 and stamp > lane.frontier:  # 0: no timestamp; the predecessor's counts
                lane.frontier = stamp
            lane.messages.append(message)  # type: ignore[arg-type]
            lane.times.append(lane.frontier)
            lane.bytes += len(message.value() or b"")
            lane.next_offset, lane.heard = offset + 1, now

    def _watermark(self) -> float:
        """The event time every partition still being read has reached (+inf: none is read)."""
        now = self.clock()
        idle_s = float("inf") if self.max_wait_ms is None else self.max_wait_ms / 1000
        waiting = [
            lane.frontier
            for lane in self._lanes.values()
            if not lane.at_end and (lane.messages or now - lane.heard < idle_s)
        ]
        return min(waiting, default=float("inf"))

    def _newest(self) -> float:
        return max((lane.frontier for lane in self._lanes.values()), default=NEVER)

    def _ready(self, whole: bool = False) -> list[M]:
        """The released messages, oldest first: at most RELEASE_BATCHES micro-batches a call, so
        a watermark that jumps far (a lagging partition reached its end) never keeps the loop
        from polling and checkpointing."""
        limit, cap = self._watermark(), RELEASE_BATCHES * self.batch_size
        # strictly before the watermark, when no partition may idle: one still at it may yet
        # send another record of that timestamp
        strict = self.max_wait_ms is None and limit != float("inf")
        upto = bisect_left if strict else bisect_right
        lanes = [
            (lane, count)
            for _, lane in sorted(self._lanes.items())
            if (count := min(upto(lane.times, limit), cap))
        ]
        self.more_ready = False
        if not lanes:
            return []
        candidates: list[Timestamped] = []
        times: list[float] = []
        for lane, count in lanes:
            candidates += lane.messages[:count]
            times += lane.times[:count]
        # a stable sort keeps each partition's offset order, so what is released of a
        # partition is a prefix of its buffer
        order = np.argsort(np.asarray(times), kind="stable")
        if len(order) > cap:
            order, self.more_ready = order[:cap], True
        elif whole:
            order = order[: len(order) - len(order) % self.batch_size]
        released = [candidates[i] for i in order]
        per_lane = np.bincount(
            np.repeat(np.arange(len(lanes)), [c for _, c in lanes])[order], minlength=len(lanes)
        )
        for (lane, _), count in zip(lanes, per_lane.tolist(), strict=True):
            if count:
                lane.bytes -= sum(len(m.value() or b"") for m in lane.messages[:count])
                del lane.messages[:count], lane.times[:count]
        return released  # type: ignore[return-value]
