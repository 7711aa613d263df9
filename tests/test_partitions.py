"""The exactly-once rules of what the trainer takes and commits, without a Kafka client."""

from dataclasses import dataclass

from streamlearn.train.partitions import UNKNOWN, Partitions


@dataclass(frozen=True)
class Msg:
    """A consumed message (an in-process stand-in for confluent_kafka.Message)."""

    partition_: int
    offset_: int
    topic_: str = "events"

    def topic(self) -> str:
        return self.topic_

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def value(self) -> bytes:
        return b"{}"


def fetched(partition: int, offsets: range) -> list[Msg]:
    return [Msg(partition, offset) for offset in offsets]


def test_a_partition_resumes_at_the_later_of_ours_and_the_groups_offset():
    partitions = Partitions(learned={("events", 0): 50, ("events", 1): 10})

    assert partitions.assign(("events", 0), committed=40) == 50  # our commit lagged behind
    assert partitions.assign(("events", 1), committed=30) == 30  # another member learned 10..29
    assert partitions.to_commit({("events", 1)}) == {("events", 1): 30}  # never the group backwards
    assert partitions.assign(("events", 2), committed=7) is None  # never ours: the group decides
    assert partitions.positions[("events", 2)] == 7
    assert partitions.assign(("events", 3), committed=-1001) is None
    assert partitions.positions[("events", 3)] == UNKNOWN


def test_no_record_is_taken_twice_nor_from_a_partition_we_do_not_own():
    partitions = Partitions()
    partitions.assign(("events", 0), committed=0)

    first = partitions.take(fetched(0, range(0, 10)) + fetched(1, range(0, 5)))
    refetched = partitions.take(fetched(0, range(5, 15)))  # a fetch that overlaps the last one

    assert [m.offset_ for m in first] == list(range(10))
    assert [m.offset_ for m in refetched] == list(range(10, 15))


def test_no_record_is_learned_twice_across_a_revoke_and_a_reassignment():
    partitions = Partitions()
    partitions.assign(("events", 0), committed=0)
    partitions.learned_through(partitions.take(fetched(0, range(0, 20))))
    partitions.release([("events", 0)])

    stale = partitions.take(fetched(0, range(20, 30)))  # fetched before the revoke, delivered after
    resume = partitions.assign(("events", 0), committed=12)  # the group's commit is behind ours

    assert stale == []
    assert resume == 20
    assert [m.offset_ for m in partitions.take(fetched(0, range(12, 25)))] == list(range(20, 25))


def test_a_commit_carries_only_owned_partitions_at_the_offset_after_their_last_learned_record():
    partitions = Partitions(learned={("events", 2): 99})  # learned in an earlier assignment
    for partition in (0, 1):
        partitions.assign(("events", partition), committed=0)
    partitions.learned_through(partitions.take(fetched(0, range(0, 8)) + fetched(1, range(0, 3))))

    assert partitions.to_commit() == {("events", 0): 8, ("events", 1): 3}
    assert partitions.to_commit({("events", 1), ("events", 2)}) == {("events", 1): 3}
    partitions.release([("events", 0)])
    assert partitions.to_commit() == {("events", 1): 3}
    assert partitions.learned[("events", 0)] == 8  # kept for the snapshot, never committed by us now


def test_a_reset_resume_offset_overrides_ours_and_the_groups_and_is_what_a_commit_carries():
    partitions = Partitions(learned={("events", 0): 3000})

    assert partitions.assign(("events", 0), committed=3000, reset=0) == 0  # the log starts over
    assert partitions.take(fetched(0, range(0, 3))) == fetched(0, range(0, 3))  # new records, learned
    assert partitions.to_commit() == {("events", 0): 0}  # until learned: the new log's start
