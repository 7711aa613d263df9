"""Which partitions the trainer owns, where each stands, and what it has learned up to.

Pure bookkeeping with no Kafka client: the loop reports assignments, revocations and consumed
messages; this answers where to resume a partition, which messages to learn in which batches,
and which offsets a commit may carry. The exactly-once rules live here:
- a partition resumes at the later of what we learned up to and the group's committed offset;
- a message is taken only from a partition we own, and only once (never one fetched before a
  revoke, never one at or below a position already taken);
- a commit carries only partitions we own, at the offset after their last learned record.
"""

from collections.abc import Iterable, Sequence
from typing import Generic, Protocol, TypeVar

Key = tuple[str, int]  # (topic, partition)
Offsets = dict[Key, int]  # next offset per partition
UNKNOWN = -1  # a position not known until the consumer applies --start-offset


class Consumed(Protocol):
    """What the trainer needs of a consumed message (confluent_kafka.Message has it all)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def value(self) -> bytes | None: ...


M = TypeVar("M", bound=Consumed)


def position(message: Consumed) -> tuple[str, int, int]:
    """(topic, partition, offset) of a consumed message, which always has all three."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset


class Partitions(Generic[M]):
    """The partitions we own, the next position of each, and the offsets learned up to."""

    def __init__(self, learned: Offsets | None = None) -> None:
        self.learned: Offsets = dict(learned or {})  # owned or not: a snapshot keeps them all
        self.positions: Offsets = {}  # next offset to take, per owned partition

    @property
    def owned(self) -> set[Key]:
        return set(self.positions)

    def assign(self, key: Key, committed: int, reset: int | None = None) -> int | None:
        """Own a partition; the offset to resume it at, or None to let --start-offset decide.

        Ours is ahead when our commit lagged (a crash before it, a broker outage); the group's is
        ahead when another member learned the records since we last owned the partition. A `reset`
        (the resume offset lay outside the partition's log, see resume.py) overrides both: what we
        learned of that log, and what a commit carries, start there.
        """
        if reset is not None:
            self.positions[key] = self.learned[key] = reset
            return reset
        ours = self.learned.get(key)
        start = committed if ours is None else max(ours, committed)
        self.positions[key] = start if start >= 0 else UNKNOWN
        if ours is not None and start > ours:
            self.learned[key] = start  # others learned up to there: never commit the group backwards
        return start if ours is not None else None

    def release(self, keys: Iterable[Key]) -> None:
        """Stop owning partitions."""
        for key in keys:
            self.positions.pop(key, None)

    def take(self, messages: Sequence[M]) -> list[M]:
        """The polled messages to learn: from owned partitions only, and each only once."""
        taken = []
        for message in messages:
            topic, partition, offset = position(message)
            key = (topic, partition)
            if key in self.positions and offset >= self.positions[key]:
                self.positions[key] = offset + 1
                taken.append(message)
        return taken

    def learned_through(self, batch: Sequence[Consumed]) -> None:
        """Record that a batch is learned (or dead-lettered): its offsets count as done."""
        learned = self.learned
        for message in batch:  # a partition's messages are in offset order: the last one counts
            learned[(message.topic(), message.partition())] = message.offset() + 1  # type: ignore[index,operator]

    def to_commit(self, keys: Iterable[Key] | None = None) -> Offsets:
        """Learned offsets of the partitions we own (of `keys` among them): all a commit may carry."""
        wanted = self.owned if keys is None else self.owned.intersection(keys)
        return {key: offset for key, offset in self.learned.items() if key in wanted}

    def known_position(self, key: Key, reported: int) -> int:
        """The consumer's position, or where we resumed if it has fetched nothing yet (or UNKNOWN)."""
        return reported if reported >= 0 else self.positions.get(key, UNKNOWN)
