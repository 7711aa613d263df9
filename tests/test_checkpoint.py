"""The checkpoint order, with a stand-in consumer: no offset is committed before its snapshot is durable."""

import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from streamlearn.metrics import TrainerMetrics
from streamlearn.snapshots import LocalSnapshotStore
from streamlearn.train.checkpoint import Checkpointer, snapshot_content
from streamlearn.train.partitions import Partitions


class GatedStore(LocalSnapshotStore):
    """A directory store whose writes wait until the test opens the gate (or fail, if told to)."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.fail = False

    def save(self, model_name, tensors, meta):
        self.gate.wait(10)
        if self.fail:
            raise OSError("disk full")
        return super().save(model_name, tensors, meta)


class RecordingConsumer:
    """Records each commit with the offsets of the newest durable snapshot at that moment."""

    def __init__(self, store: LocalSnapshotStore) -> None:
        self.store = store
        self.commits: list[tuple[dict, bool, dict | None]] = []

    def commit(self, offsets, asynchronous):
        snapshot = self.store.load_latest("m")
        durable = snapshot.meta.offsets if snapshot else None
        self.commits.append(({(tp.topic, tp.partition): tp.offset for tp in offsets}, asynchronous, durable))


@pytest.fixture
def setup(tmp_path):
    store = GatedStore(tmp_path)
    partitions = Partitions()
    for partition in (0, 1):
        partitions.assign(("events", partition), committed=0)

    def content(offsets):
        return snapshot_content(None, 0, offsets, {})

    checkpoints = Checkpointer(
        store, "m", TrainerMetrics(CollectorRegistry()), partitions, content, interval_s=0.0, timeout_s=0.5
    )
    yield store, partitions, checkpoints, RecordingConsumer(store)
    store.gate.set()
    checkpoints.close()


def learn(partitions: Partitions, checkpoints: Checkpointer, partition: int, upto: int) -> None:
    partitions.learned[("events", partition)] = upto
    checkpoints.dirty = True


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_offsets_are_committed_only_once_their_snapshot_is_durable(setup):
    store, partitions, checkpoints, consumer = setup
    learn(partitions, checkpoints, 0, 40)

    checkpoints.commit(consumer)  # starts the write, which waits at the gate
    checkpoints.commit(consumer)
    assert consumer.commits == [] and checkpoints.pending is not None

    store.gate.set()
    wait_until(lambda: checkpoints.pending.future.done())
    checkpoints.commit(consumer)

    assert consumer.commits == [({("events", 0): 40}, True, {"events": {0: 40}})]


def test_a_failed_write_commits_nothing_and_is_retried(setup):
    store, partitions, checkpoints, consumer = setup
    store.fail = True
    store.gate.set()
    learn(partitions, checkpoints, 1, 5)
    checkpoints.commit(consumer)
    wait_until(lambda: checkpoints.pending.future.done())

    checkpoints.commit(consumer)  # sees the failure, marks dirty, and starts again (interval 0)

    assert consumer.commits == []
    assert checkpoints.pending is not None


def test_a_revoke_commits_only_the_revoked_partitions_synchronously(setup):
    store, partitions, checkpoints, consumer = setup
    store.gate.set()
    learn(partitions, checkpoints, 0, 10)
    learn(partitions, checkpoints, 1, 20)

    assert checkpoints.commit(consumer, force=True, revoking={("events", 1)})

    assert consumer.commits == [({("events", 1): 20}, False, {"events": {0: 10, 1: 20}})]


def test_a_revoke_gives_up_within_its_deadline_and_commits_nothing(setup):
    _store, partitions, checkpoints, consumer = setup  # the gate stays shut: storage hangs
    learn(partitions, checkpoints, 0, 10)
    started = time.monotonic()

    durable = checkpoints.commit(consumer, force=True, revoking={("events", 0)})

    assert not durable and consumer.commits == []
    assert time.monotonic() - started < 2.0


def test_shutdown_with_nothing_new_still_commits_every_owned_partition(setup):
    store, partitions, checkpoints, consumer = setup
    store.gate.set()
    learn(partitions, checkpoints, 0, 3)
    learn(partitions, checkpoints, 1, 4)
    assert checkpoints.commit(consumer, force=True)
    consumer.commits.clear()
    partitions.release([("events", 0)])

    assert checkpoints.commit(consumer, force=True)  # nothing learned since: the offsets again

    assert consumer.commits == [({("events", 1): 4}, False, {"events": {0: 3, 1: 4}})]


def test_a_failed_forced_checkpoint_never_lets_a_later_one_commit_what_it_did_not_save(setup):
    store, partitions, checkpoints, consumer = setup
    store.fail = True
    store.gate.set()
    learn(partitions, checkpoints, 0, 10)

    assert not checkpoints.commit(consumer, force=True)  # shutdown: the write fails
    assert not checkpoints.commit(consumer, force=True, revoking={("events", 0)})  # then the revoke

    assert consumer.commits == []
    store.fail = False
    assert checkpoints.commit(consumer, force=True)
    assert consumer.commits == [({("events", 0): 10}, False, {"events": {0: 10}})]
