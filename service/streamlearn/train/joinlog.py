"""Reading the prediction log again: the entries a restored label join still waits for.

A snapshot keeps each waiting prediction as a reference to its offset in the prediction log, not
as its features (labeljoin.py): the log holds them already, durably, for at least its retention.
On restore the trainer reads each partition once from the first offset it needs to the last;
an offset the log no longer holds (past its retention, a recreated topic) is simply absent.
"""

import time
from collections.abc import Mapping, Sequence

from confluent_kafka import Consumer, KafkaError, TopicPartition

from streamlearn import kafka
from streamlearn.errors import KafkaOperationError
from streamlearn.train.partitions import position

REREAD_TIMEOUT_S = 120.0  # to read what the join waits for: a window's worth of the log at most
ENDS = (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART)  # nothing more to come from there


def reread(
    bootstrap: str,
    overrides: Mapping[str, str],
    topic: str,
    wanted: Mapping[int, Sequence[int]],
    timeout_s: float = REREAD_TIMEOUT_S,
) -> dict[tuple[int, int], bytes | None]:
    """The values at these offsets of `topic`, per partition: {(partition, offset): value}."""
    config = {
        "group.id": "streamlearn-reader",
        "enable.auto.commit": False,
        "enable.partition.eof": True,  # an offset past the end: stop there, it is not coming
        "auto.offset.reset": "earliest",  # an offset past the retention: read from what is left
    }
    consumer = Consumer(kafka.client_config(bootstrap, overrides, **config))
    last = {partition: max(offsets) for partition, offsets in wanted.items() if offsets}
    needed = {(partition, offset) for partition, offsets in wanted.items() for offset in offsets}
    found: dict[tuple[int, int], bytes | None] = {}
    try:
        consumer.assign([TopicPartition(topic, p, min(wanted[p])) for p in last])
        deadline = time.monotonic() + timeout_s
        while last:
            if time.monotonic() > deadline:
                raise KafkaOperationError(
                    f"could not read the {sum(map(len, wanted.values()))} waiting predictions of the "
                    f"label join from {topic!r} again within {timeout_s:.0f} s"
                )
            for message in consumer.consume(500, timeout=0.2):
                error = kafka.message_error(message)
                if error is not None:  # its end: what is wanted beyond it is not coming
                    if error.code() in ENDS:  # (other errors are transient: librdkafka retries)
                        last.pop(message.partition(), None)  # type: ignore[arg-type]
                    continue
                _, partition, offset = position(message)
                if (partition, offset) in needed:
                    found[(partition, offset)] = message.value()
                if offset >= last.get(partition, offset):
                    last.pop(partition, None)  # past the last offset wanted
        return found
    finally:
        consumer.close()
