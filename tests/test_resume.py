"""A partition resuming at an offset its log no longer has: the rule, and how it is reported."""

import pytest
from confluent_kafka import TopicPartition
from prometheus_client import CollectorRegistry

from streamlearn.metrics import TrainerMetrics
from streamlearn.train.partitions import Partitions
from streamlearn.train.resume import OffsetOutOfRange, Reset, ResumeGuard, check, probe

NONE = -1001  # what consumer.committed() says of a partition the group never committed


def test_an_offset_within_the_log_or_none_at_all_resumes_as_before():
    assert check(ours=300, committed=NONE, low=0, high=300) is None  # at the end: nothing new yet
    assert check(ours=None, committed=120, low=100, high=300) is None
    assert check(ours=None, committed=NONE, low=0, high=0) is None  # --start-offset decides


def test_a_log_recreated_under_the_snapshot_resumes_at_its_start():
    # the snapshot learned 3,000 records; the topic was recreated and holds 2,000 new ones
    assert check(ours=3000, committed=3000, low=0, high=2000) == Reset("beyond_end", 3000, 0, 2000, 0)


def test_a_stale_group_offset_beyond_the_end_does_not_move_ours_back():
    # learned 100 of the new log, crashed before the commit: the group still holds the old log's 3,000
    assert check(ours=100, committed=3000, low=0, high=150) == Reset("beyond_end", 3000, 0, 150, 100)


def test_records_deleted_before_they_were_learned_are_noticed():
    assert check(ours=100, committed=NONE, low=150, high=400) == Reset("before_start", 100, 150, 400, 150)


def guard(policy, bounds):
    metrics = TrainerMetrics(CollectorRegistry())
    return ResumeGuard(policy, metrics, lambda starts: {key: bounds for key in starts}), metrics


def resets_counted(metrics, kind, partition=0):
    labels = {"topic": "events", "partition": str(partition), "kind": kind}
    return metrics.registry.get_sample_value("streamlearn_trainer_offset_resets_total", labels)


def test_earliest_resumes_within_the_log_and_counts_it(caplog):
    resume, metrics = guard("earliest", (0, 2000))
    partitions = Partitions(learned={("events", 0): 3000, ("events", 1): 1500})

    resets = resume.resets(partitions, {}, [("events", 0), ("events", 1)])

    assert resets == {("events", 0): 0}
    assert resets_counted(metrics, "beyond_end") == 1
    assert resets_counted(metrics, "beyond_end", partition=1) is None
    assert "resume offset 3000 of events[0] is beyond its end (2000)" in caplog.text


def test_stop_stops_with_one_line():
    resume, metrics = guard("stop", (0, 2000))

    with pytest.raises(OffsetOutOfRange, match=r"beyond its end.*--on-offset-out-of-range stop") as raised:
        resume.resets(Partitions(learned={("events", 0): 3000}), {}, [("events", 0)])
    assert "\n" not in str(raised.value)
    assert resets_counted(metrics, "beyond_end") == 1


def test_watermarks_that_cannot_be_read_leave_the_resume_offsets_as_they_were():
    def unreachable(starts):
        raise OffsetOutOfRange("no fetch response")

    resume = ResumeGuard("stop", TrainerMetrics(CollectorRegistry()), unreachable)

    assert resume.resets(Partitions(learned={("events", 0): 3000}), {}, [("events", 0)]) == {}


class TansuLikeConsumer:
    """ListOffsets answers the end as the offset after the first record of the last batch; fetch
    responses carry the true one (seen once the consumer has fetched, as librdkafka caches it)."""

    def __init__(self, last_batch_start: int, end: int) -> None:
        self.listed, self.end = last_batch_start + 1, end
        self.fetched = False
        self.assigned: list[TopicPartition] = []

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        if cached:
            return (0, self.end) if self.fetched else (NONE, NONE)
        return 0, self.listed

    def assign(self, partitions):
        self.assigned = partitions

    def consume(self, count, timeout):
        self.fetched = bool(self.assigned)
        return []


def test_an_end_understated_by_list_offsets_is_read_from_a_fetch():
    consumer = TansuLikeConsumer(last_batch_start=2950, end=3000)  # the last batch: 2950-2999

    assert probe(consumer, {("events", 0): 3000}, timeout_s=5) == {("events", 0): (0, 3000)}  # type: ignore[arg-type]
    assert probe(TansuLikeConsumer(0, 3000), {("events", 0): 1}, timeout_s=5) == {("events", 0): (0, 1)}  # type: ignore[arg-type]
