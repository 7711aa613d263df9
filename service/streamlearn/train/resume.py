"""Resuming a partition at an offset its log no longer has: noticed, counted, and decided.

A snapshot's (or the group's) offset is a position in one incarnation of a partition's log.
After the topic is deleted and created again, or a broker that keeps its data in memory
restarts, the log starts over at 0: resuming at the old offset would skip every new record
below it, silently (the lag reads 0). An offset below the log's start means retention deleted
records before they were learned. Either is logged as an error and counted
(streamlearn_trainer_offset_resets_total{kind=beyond_end|before_start}); then
--on-offset-out-of-range decides: `earliest` resumes within the log (at the later of our
offset and the group's that it still holds, else at its start), `stop` stops the trainer.

The end is the high watermark of a fetch response: Tansu answers ListOffsets with less (the
offset after the first record of the last batch), so ListOffsets only clears an offset at or
below its answer, and a fetch is asked about the others.
"""

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

from confluent_kafka import Consumer, KafkaException, TopicPartition

from streamlearn import kafka
from streamlearn.errors import KafkaOperationError, StreamlearnError
from streamlearn.metrics import TrainerMetrics
from streamlearn.train.partitions import Key, Offsets, Partitions

log = logging.getLogger(__name__)

Policy = Literal["earliest", "stop"]
PROBE_BYTES = 1024  # the probe reads a fetch response for its watermark, not for its records


class OffsetOutOfRange(StreamlearnError):
    """A partition's resume offset lies outside its log, and --on-offset-out-of-range is stop."""


class Reset(NamedTuple):
    """A resume offset outside its partition's log, and where `earliest` resumes instead."""

    kind: Literal["beyond_end", "before_start"]
    offset: int  # where the partition would have resumed
    low: int
    high: int
    resume: int


def check(ours: int | None, committed: int, low: int, high: int) -> Reset | None:
    """None when the partition resumes within [low, high] (or where --start-offset says); else the
    Reset: resume at the later of `ours` and `committed` still within the log, else at `low`."""
    start = _start(ours, committed)
    if start < 0 or low <= start <= high:
        return None
    within = [offset for offset in (ours, committed) if offset is not None and low <= offset <= high]
    kind: Literal["beyond_end", "before_start"] = "beyond_end" if start > high else "before_start"
    return Reset(kind, start, low, high, max(within, default=low))


def _start(ours: int | None, committed: int) -> int:
    """Where Partitions.assign resumes a partition (negative: where --start-offset says)."""
    return committed if ours is None else max(ours, committed)


Watermarks = Callable[[Mapping[Key, int]], dict[Key, tuple[int, int]]]


class ResumeGuard:
    """Checks, at each assignment, that every partition resumes within its log."""

    def __init__(self, policy: Policy, metrics: TrainerMetrics, watermarks: Watermarks) -> None:
        self.policy = policy
        self.metrics = metrics
        self.watermarks = watermarks

    def resets(
        self, partitions: Partitions[Any], committed: Mapping[Key, int], keys: Iterable[Key]
    ) -> Offsets:
        """Where the partitions whose resume offset lies outside their log resume instead."""
        starts = {key: _start(partitions.learned.get(key), committed.get(key, -1)) for key in keys}
        starts = {key: start for key, start in starts.items() if start >= 0}
        if not starts:
            return {}
        try:
            bounds = self.watermarks(starts)
        except (KafkaException, StreamlearnError) as exc:  # unknown: resume as before, and say so
            log.warning("could not check the resume offsets against the logs: %s", exc)
            return {}
        resets = {}
        for key, (low, high) in bounds.items():
            reset = check(partitions.learned.get(key), committed.get(key, -1), low, high)
            if reset is not None:
                resets[key] = self._report(key, reset)
        return resets

    def _report(self, key: Key, reset: Reset) -> int:
        topic, partition = key
        self.metrics.offset_resets.labels(topic, str(partition), reset.kind).inc()
        where = f"{topic}[{partition}]"
        if reset.kind == "beyond_end":
            what = (f"resume offset {reset.offset} of {where} is beyond its end ({reset.high}): the topic "
                    "was recreated or its log truncated")  # fmt: skip
        else:
            what = (f"resume offset {reset.offset} of {where} is before its start ({reset.low}): "
                    f"{reset.low - reset.offset} records were deleted before they were learned")  # fmt: skip
        if self.policy == "stop":
            raise OffsetOutOfRange(f"{what} (--on-offset-out-of-range stop)")
        log.error("%s; resuming at %d (--on-offset-out-of-range earliest)", what, reset.resume)
        return reset.resume


def fetched_watermarks(bootstrap: str, overrides: Mapping[str, str], timeout_s: float) -> Watermarks:
    """The (low, high) watermarks of partitions, read by a consumer of their own (so the trainer's
    consumer keeps no stale end); a fetch confirms each start that ListOffsets does not clear."""

    def watermarks(starts: Mapping[Key, int]) -> dict[Key, tuple[int, int]]:
        config = {"group.id": "streamlearn-watermarks", "enable.auto.commit": False,
                  "max.partition.fetch.bytes": PROBE_BYTES}  # fmt: skip
        consumer = Consumer(kafka.client_config(bootstrap, overrides, **config))
        try:
            return probe(consumer, starts, timeout_s)
        finally:
            consumer.close()

    return watermarks


def probe(consumer: Consumer, starts: Mapping[Key, int], timeout_s: float) -> dict[Key, tuple[int, int]]:
    """(low, high) of each partition, `high` from a fetch response unless ListOffsets clears `start`."""
    bounds = {}
    for key in starts:
        bounds[key] = consumer.get_watermark_offsets(TopicPartition(*key), timeout=timeout_s)
    unsure = [key for key, start in starts.items() if start > bounds[key][1]]
    if not unsure:
        return bounds
    consumer.assign(
        [TopicPartition(topic, partition, bounds[(topic, partition)][0]) for topic, partition in unsure]
    )
    deadline = time.monotonic() + timeout_s
    while unsure:
        if time.monotonic() > deadline:
            raise KafkaOperationError(f"no fetch response within {timeout_s:g}s for {unsure}")
        consumer.consume(1, timeout=0.1)
        for key in list(unsure):
            _low, high = consumer.get_watermark_offsets(TopicPartition(*key), cached=True)
            if high >= 0:
                bounds[key] = (bounds[key][0], high)
                unsure.remove(key)
    return bounds
