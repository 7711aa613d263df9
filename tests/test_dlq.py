"""Dead letters: what a letter holds when the record is too large to keep whole."""

import hashlib
from types import SimpleNamespace

import pytest
from confluent_kafka import TopicPartition

from streamlearn.errors import KafkaOperationError
from streamlearn.train.dlq import (
    H_OMITTED,
    H_REASON,
    H_TOPIC,
    H_VALUE_BYTES,
    H_VALUE_SHA256,
    MAX_KEPT_KEY_BYTES,
    Letter,
    header,
    read_partitions,
)


def test_a_letter_without_its_value_keeps_our_headers_and_the_values_fingerprint():
    value = b"x" * 2_000_000
    letter = Letter(b"key-1", value, [("trace", b"t1"), (H_TOPIC, b"events"), (H_REASON, b"too_large")])

    small = letter.without_value()

    assert small.value is None and small.key == b"key-1" and not small.whole
    assert header(small.headers, "trace") is None  # the original headers may be what was too large
    assert header(small.headers, H_TOPIC) == "events" and header(small.headers, H_REASON) == "too_large"
    assert header(small.headers, H_VALUE_BYTES) == "2000000"
    assert header(small.headers, H_VALUE_SHA256) == hashlib.sha256(value).hexdigest()
    assert header(small.headers, H_OMITTED) == "value,headers"


def test_a_key_too_large_to_keep_is_left_out_as_well():
    letter = Letter(b"k" * (MAX_KEPT_KEY_BYTES + 1), None, [(H_REASON, b"empty")])

    small = letter.without_value()

    assert small.key is None
    assert header(small.headers, H_OMITTED) == "value,key,headers"
    assert header(small.headers, H_VALUE_BYTES) == "0"


class TansuLikeConsumer:
    """The consumer calls read_partitions makes, against one partition's log held in memory.

    As Tansu does, ListOffsets answers the end as the offset after the first record of the last
    batch, while fetch responses carry the true high watermark.
    """

    def __init__(self, topic: str, batches: list[int]) -> None:
        self.topic = topic
        self.batch_starts = [sum(batches[:i]) for i in range(len(batches))]
        self.end = sum(batches)
        self.fetched_end = -1001  # the high watermark of the last fetch response; none yet
        self.answers = True  # False: the partition's leader never answers a fetch
        self.next: int | None = None

    def list_topics(self, topic, timeout):
        return SimpleNamespace(topics={topic: SimpleNamespace(error=None, partitions={0: None})})

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        if cached:
            return 0, self.fetched_end
        return 0, (self.batch_starts[-1] + 1 if self.batch_starts else 0)

    def assign(self, partitions):
        self.next = partitions[0].offset if partitions else None

    def consume(self, count, timeout):
        if self.next is None or not self.answers:
            return []
        self.fetched_end = self.end
        taken = [Record(self.topic, offset) for offset in range(self.next, min(self.next + count, self.end))]
        self.next += len(taken)
        return taken

    def position(self, partitions):
        return [TopicPartition(tp.topic, tp.partition, self.next if self.next is not None else -1001)
                for tp in partitions]  # fmt: skip


class Record:
    def __init__(self, topic: str, offset: int) -> None:
        self._topic, self._offset = topic, offset

    def error(self):
        return None

    def offset(self) -> int:
        return self._offset


@pytest.mark.parametrize("start", [0, 1, 3, 4, 5])
def test_letters_after_a_mark_inside_the_last_batch_are_all_read(start):
    # letters 0-2 went in one produce request, 3-5 in another: a snapshot's mark may fall inside
    # the last one (letters sent before and after its barrier, batched together by the producer)
    consumer = TansuLikeConsumer("events.dlq", batches=[3, 3])

    letters = read_partitions(consumer, "events.dlq", {0: start}, limit=0, timeout_s=5)  # type: ignore[arg-type]

    assert [letter.offset() for letter in letters] == list(range(start, 6))


@pytest.mark.parametrize("start", [0, 2])
def test_reading_from_the_end_or_an_empty_topic_returns_nothing_at_once(start):
    consumer = TansuLikeConsumer("events.dlq", batches=[2] if start else [])

    assert read_partitions(consumer, "events.dlq", {0: start}, limit=0, timeout_s=5) == []  # type: ignore[arg-type]


def test_a_topic_not_read_to_its_end_in_time_is_an_error_not_a_part_taken_for_the_whole():
    consumer = TansuLikeConsumer("events.dlq", batches=[3])
    consumer.answers = False

    with pytest.raises(KafkaOperationError, match=r"could not read events\.dlq to its end"):
        read_partitions(consumer, "events.dlq", {0: 1}, limit=0, timeout_s=0.3)  # type: ignore[arg-type]
