"""Aligned snapshots of ranks in lockstep, through a stand-in for the collectives: rank 0 writes
one snapshot of every rank's offsets once their weights agree; each rank commits its own."""

import pytest
from prometheus_client import CollectorRegistry

from streamlearn.metrics import TrainerMetrics
from streamlearn.snapshots import LocalSnapshotStore
from streamlearn.train.aligned import AlignedCheckpointer
from streamlearn.train.checkpoint import snapshot_content
from streamlearn.train.partitions import Partitions


class Lost(Exception):
    pass


class Ranks:
    """One rank's view of the collectives: what the other ranks send is set by the test."""

    def __init__(self, rank: int, others: list[dict], version_from_rank_0: int = 0) -> None:
        self.rank = rank
        self.others = others
        self.version_from_rank_0 = version_from_rank_0
        self.gathered: list[dict] = []

    def gather_json(self, value):
        self.gathered = [value, *self.others] if self.rank == 0 else [*self.others, value]
        return self.gathered

    def broadcast_json(self, value):
        return value if self.rank == 0 else self.version_from_rank_0

    def lost(self, what, exc):
        raise Lost(what)


class DeadLetters:
    """A dead-letter queue whose letters are delivered (marks) or not (None)."""

    topic = "events.dlq"

    def __init__(self, marks: dict[int, int] | None) -> None:
        self.marks = marks

    def barrier(self) -> int:
        return 0

    def wait_delivered(self, barrier, timeout_s):
        return self.marks


class Commits:
    def __init__(self) -> None:
        self.made: list[tuple[dict, bool]] = []

    def commit(self, offsets, asynchronous):
        self.made.append(({(tp.topic, tp.partition): tp.offset for tp in offsets}, asynchronous))


def other(offsets, marks=None, digest="d", ok=True) -> dict:
    return {"offsets": offsets, "marks": marks or {}, "digest": digest, "ok": ok}


@pytest.fixture
def aligned(tmp_path):
    made = []

    def factory(ranks: Ranks, marks: dict[int, int] | None = None, digest: str = "d") -> AlignedCheckpointer:
        partitions = Partitions()
        for partition in (0, 2):  # this rank's: p mod 2 == 0
            partitions.assign(("events", partition), committed=0)
        partitions.learned.update({("events", 0): 40, ("events", 2): 20})
        checkpoints = AlignedCheckpointer(
            LocalSnapshotStore(tmp_path), "m", TrainerMetrics(CollectorRegistry()), partitions,
            lambda offsets: snapshot_content(None, 60, offsets, {}), DeadLetters(marks), 0.0, 5.0,
            ranks=ranks, world_size=2, weights_digest=lambda: digest, collective_timeout_s=10.0,
        )  # fmt: skip
        checkpoints.dirty = True
        made.append(checkpoints)
        return checkpoints

    yield factory
    for checkpoints in made:
        checkpoints.close()


def test_rank_0_writes_every_ranks_offsets_and_marks_then_commits_its_own(aligned, tmp_path):
    ranks = Ranks(0, [other([["events", 1, 30], ["events", 3, 10]], marks={"0": 7, "1": 9})])
    checkpoints, consumer = aligned(ranks, marks={0: 5, 1: 9}), Commits()

    checkpoints.checkpoint_round(consumer, final=False)

    snapshot = LocalSnapshotStore(tmp_path).load_latest("m")
    assert snapshot.meta.offsets == {"events": {0: 40, 1: 30, 2: 20, 3: 10}}
    assert snapshot.meta.dlq.marks == {0: 7, 1: 9}  # each partition's highest mark
    assert snapshot.meta.world == {"size": 2, "digest": "d"}
    assert consumer.made == [({("events", 0): 40, ("events", 2): 20}, True)]  # its own, asynchronously
    assert not checkpoints.dirty


def test_a_final_round_commits_synchronously(aligned):
    checkpoints, consumer = aligned(Ranks(0, [other([["events", 1, 30]])]), marks={}), Commits()
    checkpoints.checkpoint_round(consumer, final=True)
    assert consumer.made == [({("events", 0): 40, ("events", 2): 20}, False)]


def test_ranks_whose_weights_differ_write_nothing_and_end_the_group(aligned, tmp_path):
    checkpoints, consumer = aligned(Ranks(0, [other([["events", 1, 30]], digest="e")]), marks={}), Commits()
    with pytest.raises(Lost, match="weights"):
        checkpoints.checkpoint_round(consumer, final=False)
    assert LocalSnapshotStore(tmp_path).load_latest("m") is None
    assert consumer.made == []


@pytest.mark.parametrize("late", ["this rank", "another rank"])
def test_dead_letters_not_delivered_in_time_mean_no_snapshot_and_no_commit(aligned, tmp_path, late):
    others = [other([["events", 1, 30]], ok=late == "this rank")]
    checkpoints = aligned(Ranks(0, others), marks=None if late == "this rank" else {})
    consumer = Commits()
    checkpoints.checkpoint_round(consumer, final=False)
    assert LocalSnapshotStore(tmp_path).load_latest("m") is None
    assert consumer.made == []
    assert checkpoints.dirty  # the next due round tries again
    assert checkpoints.ranks.gathered[0]["ok"] is (late != "this rank")


def test_another_rank_writes_nothing_and_commits_its_own_once_rank_0_published(aligned, tmp_path):
    checkpoints, consumer = aligned(Ranks(1, [other([["events", 1, 30]])], version_from_rank_0=4)), Commits()
    checkpoints.checkpoint_round(consumer, final=False)
    assert LocalSnapshotStore(tmp_path).load_latest("m") is None  # rank 0 writes, not this rank
    assert consumer.made == [({("events", 0): 40, ("events", 2): 20}, True)]
    assert not checkpoints.dirty


def test_a_snapshot_not_published_by_rank_0_commits_nothing(aligned):
    checkpoints, consumer = aligned(Ranks(1, [other([])], version_from_rank_0=0)), Commits()
    checkpoints.checkpoint_round(consumer, final=False)
    assert consumer.made == []
    assert checkpoints.dirty
