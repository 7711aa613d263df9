"""The dead-letter topic: invalid records kept byte for byte, with their reason, exactly once.

A record is published with its original key, value and headers, plus Kafka Connect style
`__connect.errors.*` headers naming the source and the reason. Exactly once across crashes:
- a snapshot is written only after every dead letter sent before it was delivered, and records
  in `marks` where the dead-letter topic stood then (the offset after the last such delivery);
- after a restart, the records from the snapshot's offsets on are read again, and those already
  dead-lettered after the marks (by the run that crashed) are not sent a second time.
A letter too large for the dead-letter topic (refused by the producer, whose message.max.bytes
is --max-record-bytes plus 64 KiB, or by the broker) is sent again without its value and
original headers: it keeps our headers, the value's size and SHA-256, and says what it left out.
"""

import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from streamlearn import kafka
from streamlearn.decoding import Rejected
from streamlearn.errors import KafkaOperationError
from streamlearn.faults import crash_point

log = logging.getLogger(__name__)

H_TOPIC = "__connect.errors.topic"
H_PARTITION = "__connect.errors.partition"
H_OFFSET = "__connect.errors.offset"
H_REASON = "__connect.errors.exception.class.name"
H_MESSAGE = "__connect.errors.exception.message"
H_STAGE = "__connect.errors.stage"
H_TIME = "streamlearn.errors.timestamp"
H_OMITTED = "streamlearn.errors.omitted"  # what a letter too large to keep whole left out
H_VALUE_BYTES = "streamlearn.errors.value.bytes"
H_VALUE_SHA256 = "streamlearn.errors.value.sha256"
OUR_HEADERS = (
    H_TOPIC,
    H_PARTITION,
    H_OFFSET,
    H_REASON,
    H_MESSAGE,
    H_STAGE,
    H_TIME,
    H_OMITTED,
    H_VALUE_BYTES,
    H_VALUE_SHA256,
)
# Room for the key, the headers and the record's framing beside a value of --max-record-bytes.
LETTER_OVERHEAD_BYTES = 64 * 1024
MAX_KEPT_KEY_BYTES = 1024  # a letter without its value keeps a key up to this size
MAX_DETAIL_CHARS = 1000  # the reason's detail in a header: details are short, this bounds them
# Errors that say the letter itself is too large: resending it unchanged would fail forever.
TOO_LARGE = (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD)
Source = tuple[str, int, int]  # (topic, partition, offset) of the original record
Headers = list[tuple[str, Any]]


class NoSuchTopic(KafkaOperationError):
    """The topic to read does not exist."""


class Letter(NamedTuple):
    """What is produced to the dead-letter topic for one record."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    whole: bool = True  # False once the value (and the original headers) have been left out

    def without_value(self) -> "Letter":
        """The same letter without the value and the original headers, which fits any topic."""
        value = self.value or b""
        keep_key = self.key is not None and len(self.key) <= MAX_KEPT_KEY_BYTES
        omitted = "value,headers" if keep_key or self.key is None else "value,key,headers"
        ours = [(k, v) for k, v in self.headers if k in OUR_HEADERS]
        return Letter(
            self.key if keep_key else None,
            None,
            [
                *ours,
                (H_OMITTED, omitted.encode()),
                (H_VALUE_BYTES, str(len(value)).encode()),
                (H_VALUE_SHA256, hashlib.sha256(value).hexdigest().encode()),
            ],
            whole=False,
        )


def dead_letter_headers(message: Message, rejected: Rejected) -> Headers:
    """The original headers, then ours: where the record came from, why and when it was rejected."""
    try:
        original: Headers = [(str(pair[0]), pair[1]) for pair in message.headers() or []]
    except Exception:  # a header key that is not UTF-8 cannot even be read; keep ours at least
        original = []
    return [
        *original,
        (H_TOPIC, str(message.topic()).encode()),
        (H_PARTITION, str(message.partition()).encode()),
        (H_OFFSET, str(message.offset()).encode()),
        (H_REASON, rejected.reason.value.encode()),
        (H_MESSAGE, rejected.detail[:MAX_DETAIL_CHARS].encode(errors="replace")),
        (H_STAGE, b"VALUE_CONVERTER"),
        (H_TIME, str(int(time.time() * 1000)).encode()),
    ]


def header(headers: Any, name: str) -> str | None:
    """The last header called `name` (ours come after the original ones), as text."""
    for key, value in reversed(list(headers or [])):
        if key == name:
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return None


def source_of(message: Message) -> Source | None:
    try:
        headers = message.headers()
    except Exception:  # a header key that is not UTF-8: not a letter of ours
        return None
    topic, partition, offset = (header(headers, h) for h in (H_TOPIC, H_PARTITION, H_OFFSET))
    if topic is None or partition is None or offset is None:
        return None
    try:
        return topic, int(partition), int(offset)
    except ValueError:  # not a letter of ours: anyone can write to the topic
        return None


class DeadLetterQueue:
    """Publishes dead letters and knows which ones are delivered, and where."""

    def __init__(
        self,
        bootstrap: str,
        overrides: Mapping[str, str],
        topic: str,
        marks: Mapping[int, int] | None = None,
        max_record_bytes: int = 1_000_000,
    ) -> None:
        self.topic = topic
        # A letter is its record plus our headers: let the producer take what the trainer accepts.
        limit = {"message.max.bytes": str(max_record_bytes + LETTER_OVERHEAD_BYTES), **overrides}
        self.producer: Producer = kafka.make_producer(bootstrap, limit)
        self._lock = threading.Condition()
        self._sent = 0  # sequence number of the newest letter handed to the producer
        self._outstanding: set[int] = set()
        self._retry: list[tuple[int, Letter]] = []
        self._deliveries: list[tuple[int, int, int]] = []  # (seq, DLQ partition, offset), not yet folded
        self._marks: dict[int, int] = dict(
            marks or {}
        )  # DLQ partition -> offset after the last folded letter
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._serve_deliveries, name="dlq-deliveries", daemon=True)
        self._poller.start()

    def send(self, message: Message, rejected: Rejected) -> None:
        letter = Letter(message.key(), message.value(), dead_letter_headers(message, rejected))
        with self._lock:
            self._sent += 1
            seq = self._sent
            self._outstanding.add(seq)
        self._produce(seq, letter)
        crash_point("dlq.after_send")

    def _produce(self, seq: int, letter: Letter) -> None:
        def on_delivery(error: KafkaError | None, message: Message) -> None:
            self._delivered(seq, letter, error, message)

        while True:
            try:
                self.producer.produce(
                    self.topic, letter.value, letter.key, headers=letter.headers, on_delivery=on_delivery
                )
                return
            except BufferError:
                self.producer.poll(0.05)
            except KafkaException as exc:
                if letter.whole and exc.args[0].code() in TOO_LARGE:
                    letter = letter.without_value()  # over the producer's message.max.bytes
                    continue
                raise KafkaOperationError(f"cannot dead-letter a record: {exc.args[0].str()}") from None

    def _delivered(self, seq: int, letter: Letter, error: KafkaError | None, message: Message) -> None:
        with self._lock:
            if error is not None:
                if letter.whole and error.code() in TOO_LARGE:  # the broker or topic refuses its size
                    letter = letter.without_value()
                    log.warning("dead letter too large for %s, resending without its value", self.topic)
                else:
                    log.warning("dead letter not delivered, will retry: %s", error.str())
                self._retry.append((seq, letter))
                return
            self._outstanding.discard(seq)
            partition, offset = message.partition(), message.offset()
            if partition is not None and offset is not None:
                self._deliveries.append((seq, partition, offset))
            self._lock.notify_all()

    def _serve_deliveries(self) -> None:
        """Delivery reports arrive on this thread, whatever the consumer loop is doing."""
        while not self._closed.is_set():
            self.producer.poll(0.05)
            with self._lock:
                retry, self._retry = self._retry, []
            for seq, letter in retry:
                try:
                    self._produce(seq, letter)
                except Exception as exc:  # keep it outstanding, and this thread alive: retry later
                    log.error("dead letter not resent, will retry: %s", exc)
                    with self._lock:
                        self._retry.append((seq, letter))
                    self._closed.wait(1.0)

    def barrier(self) -> int:
        """A point to wait for: every dead letter sent so far."""
        with self._lock:
            return self._sent

    def wait_delivered(self, barrier: int, timeout_s: float) -> dict[int, int] | None:
        """Wait until every letter up to `barrier` is delivered; return where the topic stood then.

        Within a DLQ partition letters are appended in the order sent, so every letter sent after
        the barrier lies at or beyond the returned mark (barring a resend after a failed delivery).
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while any(seq <= barrier for seq in self._outstanding):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._lock.wait(min(remaining, 0.1))
            later = []
            for seq, partition, offset in self._deliveries:
                if seq <= barrier:
                    self._marks[partition] = max(self._marks.get(partition, 0), offset + 1)
                else:
                    later.append((seq, partition, offset))
            self._deliveries = later
            return dict(self._marks)

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything sent so far is delivered (failures resent meanwhile)."""
        return self.wait_delivered(self.barrier(), timeout_s) is not None

    def close(self, timeout_s: float = 10.0) -> None:
        self.flush(timeout_s)
        self._closed.set()
        self._poller.join(timeout_s)


def read_from(
    bootstrap: str,
    overrides: Mapping[str, str],
    topic: str,
    start: Mapping[int, int] | None = None,
    limit: int = 0,
    timeout_s: float = 30.0,
) -> list[Message]:
    """The messages of a topic from `start` (per partition; default its beginning) to its end now."""
    consumer = Consumer(
        kafka.client_config(
            bootstrap, overrides, **{"group.id": "streamlearn-reader", "enable.auto.commit": False}
        )
    )
    try:
        return read_partitions(consumer, topic, start, limit, timeout_s)
    finally:
        consumer.close()


def read_partitions(
    consumer: Consumer, topic: str, start: Mapping[int, int] | None, limit: int, timeout_s: float
) -> list[Message]:
    """Read every partition of `topic` with `consumer` from `start` to its end now.

    The end is the high watermark of the fetch responses, never ListOffsets' answer: Tansu
    answers it with the offset after the first record of the last batch, so a start inside the
    last batch (a snapshot's mark between letters produced together) would read none of the rest.
    """
    messages: list[Message] = []
    metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if metadata is None or metadata.error is not None:
        raise NoSuchTopic(f"topic {topic!r} does not exist")
    first = {}
    for partition in sorted(metadata.partitions):
        low, _high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
        first[partition] = max((start or {}).get(partition, low), low)
    reading = [TopicPartition(topic, partition, offset) for partition, offset in first.items()]
    consumer.assign(reading)
    deadline = time.monotonic() + timeout_s
    while reading and (limit == 0 or len(messages) < limit) and time.monotonic() < deadline:
        for message in consumer.consume(500, timeout=0.2):
            if kafka.message_error(message) is None:
                messages.append(message)
        reading = [tp for tp in consumer.position(reading) if not _at_end(consumer, tp, first)]
    if reading and (limit == 0 or len(messages) < limit):  # a part read as the whole is worse than none
        unread = ", ".join(str(tp.partition) for tp in reading)
        raise KafkaOperationError(
            f"could not read {topic} to its end within {timeout_s:g}s (partitions {unread})"
        )
    return messages[:limit] if limit else messages


def _at_end(consumer: Consumer, position: TopicPartition, first: Mapping[int, int]) -> bool:
    """Whether a fetch response said the partition ends at or before where we are."""
    _low, high = consumer.get_watermark_offsets(position, cached=True)
    at = position.offset if position.offset >= 0 else first[position.partition]  # none consumed yet
    return high >= 0 and at >= high


def already_dead_lettered(
    bootstrap: str, overrides: Mapping[str, str], topic: str, marks: Mapping[int, int]
) -> set[Source]:
    """Sources of the dead letters published after `marks` (all of a partition without a mark)."""
    try:
        letters = read_from(bootstrap, overrides, topic, marks)
    except NoSuchTopic:  # no dead-letter topic yet: nothing was dead-lettered
        return set()
    found = (source_of(message) for message in letters)
    return {source for source in found if source is not None}


def describe(message: Message) -> str:
    """One dead letter as readable lines."""
    headers = message.headers()
    source = source_of(message)
    where = f"{source[0]}[{source[1]}]@{source[2]}" if source else "unknown source"
    stamp = header(headers, H_TIME)
    when = "?"
    if stamp and stamp.isdigit():
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(stamp) / 1000)) + "Z"
    value = message.value()
    shown = repr(value[:200] if isinstance(value, bytes) else value)
    if isinstance(value, bytes) and len(value) > 200:
        shown += " ..."
    omitted = header(headers, H_OMITTED)
    if omitted:
        size, digest = header(headers, H_VALUE_BYTES), header(headers, H_VALUE_SHA256)
        shown = f"<left out: {omitted}; the value had {size} bytes, sha256 {digest}>"
    return (
        f"{message.topic()}[{message.partition()}]@{message.offset()}  {when}  from {where}\n"
        f"  reason: {header(headers, H_REASON)}: {header(headers, H_MESSAGE)}\n"
        f"  key:    {message.key()!r}\n"
        f"  value:  {shown}"
    )


def replay(bootstrap: str, overrides: Mapping[str, str], topic: str, to: str | None, limit: int = 0) -> int:
    """Republish dead letters (original key, value and headers) to `to` or their source topic."""
    letters = read_from(bootstrap, overrides, topic, limit=limit)
    producer = kafka.make_producer(bootstrap, overrides)
    failures = kafka.DeliveryFailures()
    replayed = 0
    for message in letters:
        if "value" in (header(message.headers(), H_OMITTED) or ""):
            log.warning(
                "not replaying %s@%d: it was dead-lettered without its value", topic, message.offset()
            )
            continue
        source = source_of(message)
        target = to or (source[0] if source else None)
        if target is None:
            raise KafkaOperationError(
                f"dead letter at offset {message.offset()} names no source topic; use --to"
            )
        original: list[tuple[str, Any]] = [
            (str(key), value) for key, value in list(message.headers() or []) if key not in OUR_HEADERS
        ]
        producer.produce(target, message.value(), message.key(), headers=original, on_delivery=failures)
        producer.poll(0)
        replayed += 1
    if producer.flush(30) or failures.errors:
        raise KafkaOperationError(
            f"replay incomplete: {len(failures.errors) or 'some'} records not delivered"
        )
    return replayed
