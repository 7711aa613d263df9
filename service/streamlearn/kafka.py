"""Thin confluent-kafka wrappers: client configuration, reachability, topics, typed errors.

Nothing here knows the broker is Tansu: every interaction is plain Kafka protocol through
librdkafka, so the same code runs against Apache Kafka or a managed cluster. Extra librdkafka
properties (security, tuning) come from STREAMLEARN_KAFKA_* and override the defaults below.
"""

import logging
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streamlearn.errors import BrokerUnavailable, ConfigError, KafkaOperationError
from streamlearn.logfilter import RateLimitFilter

log = logging.getLogger(__name__)
kafka_log = logging.getLogger("streamlearn.librdkafka")


def _facility(record: logging.LogRecord) -> Hashable:
    """librdkafka logs each line as "%s [%s] %s" (facility, client, text): a key per facility."""
    args = record.args if isinstance(record.args, tuple) and record.args else (record.msg,)
    return record.name, str(args[0])[:50]


# A broker away makes every client log a line per reconnect attempt, ~20 a second in a trainer:
# in every process, each kind of line is logged at most once per LOG_INTERVAL_S, with a count.
LOG_INTERVAL_S = 5.0
kafka_log.addFilter(RateLimitFilter(LOG_INTERVAL_S, key=_facility))
log.addFilter(RateLimitFilter(LOG_INTERVAL_S))  # the errors error_cb hears (_log_error)

# How producers of the prediction log and of the labels topic pick a partition: both keyed by the
# prediction id and hashed with murmur2 as the Java client does, so that an id's prediction and its
# label land in the same partition of each, whichever client produced them (librdkafka's default,
# consistent_random, hashes with CRC32 and would disagree with a Java, Go or Kafka Streams producer).
LABEL_JOIN_PARTITIONER = "murmur2_random"


def client_config(bootstrap: str, overrides: Mapping[str, str], **defaults: Any) -> dict[str, Any]:
    """librdkafka configuration: our defaults, then the user's STREAMLEARN_KAFKA_* overrides."""
    return {"bootstrap.servers": bootstrap, "logger": kafka_log, **defaults, **overrides}


def check_reachable(bootstrap: str, overrides: Mapping[str, str], timeout_s: float = 10.0) -> None:
    """Raise BrokerUnavailable unless the cluster answers a metadata request in time."""
    admin = AdminClient(client_config(bootstrap, overrides))
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise BrokerUnavailable(
            f"cannot reach Kafka at {bootstrap} within {timeout_s:g}s ({exc.args[0].str()})"
        ) from None


def ensure_topic(
    bootstrap: str,
    overrides: Mapping[str, str],
    topic: str,
    partitions: int = 1,
    timeout_s: float = 10.0,
    config: Mapping[str, str] | None = None,
) -> None:
    """Create the topic (with these topic configs, e.g. compaction) unless it exists already."""
    admin = AdminClient(client_config(bootstrap, overrides))
    if topic in admin.list_topics(timeout=timeout_s).topics:
        return
    new = NewTopic(topic, num_partitions=partitions, replication_factor=1, config=dict(config or {}))
    futures = admin.create_topics([new])
    try:
        futures[topic].result(timeout=timeout_s)
    except KafkaException as exc:
        error: KafkaError = exc.args[0]
        if error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise KafkaOperationError(f"cannot create topic {topic!r}: {error.str()}") from None
    except TimeoutError:
        raise BrokerUnavailable(f"cannot reach Kafka at {bootstrap} to create topic {topic!r}") from None


def partition_counts(
    bootstrap: str, overrides: Mapping[str, str], topics: list[str], timeout_s: float = 10.0
) -> dict[str, int | None]:
    """How many partitions each topic has (None: no such topic)."""
    admin = AdminClient(client_config(bootstrap, overrides))
    try:
        known = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        raise BrokerUnavailable(f"cannot reach Kafka at {bootstrap} ({exc.args[0].str()})") from None
    return {topic: len(known[topic].partitions) if topic in known else None for topic in topics}


def make_consumer(
    bootstrap: str,
    overrides: Mapping[str, str],
    group: str,
    start_offset: str,
    session_timeout_ms: int = 6000,
    group_instance_id: str | None = None,
    on_error: Callable[[KafkaError], None] | None = None,
    on_commit: Callable[[KafkaError | None, list[TopicPartition]], None] | None = None,
    report_end: bool = False,
    assignor: str = "cooperative-sticky",
) -> Consumer:
    """A consumer with manual offsets: nothing is committed or stored unless we say so.

    With `report_end`, reaching the end of a partition is reported as a _PARTITION_EOF event.
    The `range` assignor (eager) gives partition p of every subscribed topic to the same member,
    when the topics have as many partitions: what a join of co-partitioned topics needs.
    """
    defaults: dict[str, Any] = {
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": start_offset,
        "partition.assignment.strategy": assignor,
        # A crashed trainer's partitions move after the session timeout (librdkafka's default is 45 s).
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": max(session_timeout_ms // 6, 100),
        "error_cb": on_error or _log_error,
        "enable.partition.eof": report_end,
    }
    if group_instance_id:
        defaults["group.instance.id"] = group_instance_id  # static membership: a restart keeps its partitions
    if on_commit is not None:
        defaults["on_commit"] = on_commit
    return Consumer(client_config(bootstrap, overrides, **defaults))


def make_producer(bootstrap: str, overrides: Mapping[str, str], **properties: Any) -> Producer:
    """An idempotent producer that waits for all in-sync replicas; `properties` add to our defaults
    (partitioner=LABEL_JOIN_PARTITIONER, say), the user's overrides still win."""
    config = client_config(
        bootstrap,
        overrides,
        **{
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "error_cb": _log_error,
            **properties,
        },
    )
    return Producer(config)


class DeliveryFailures:
    """A producer's on_delivery callback that keeps the error of each record it could not deliver."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            self.errors.append(error.str())


# Errors joining the consumer group that no retry ends: librdkafka reports them as non-fatal and
# retries every few seconds forever, so a consumer of that group would learn nothing, silently.
GROUP_REFUSALS = {
    KafkaError.INCONSISTENT_GROUP_PROTOCOL: "is used by members with another partition assignment"
    " strategy (a trainer with --labels-topic uses range, one without cooperative-sticky):"
    " give this trainer its own --group",
    KafkaError.INVALID_GROUP_ID: "is not a valid group id: choose another --group",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "may not be joined with these Kafka credentials:"
    " grant them the group, or choose another --group",
}


def message_error(message: Message, group: str | None = None) -> KafkaError | None:
    """The error a consumed message carries, if any (a partition's end is one); fatal ones raise,
    and so do the errors of joining `group` that retrying cannot end (ConfigError: what to do)."""
    error = message.error()
    if error is None:
        return None
    if error.fatal():
        raise KafkaOperationError(f"fatal Kafka error: {error.str()}")
    if group is not None and error.code() in GROUP_REFUSALS:
        raise ConfigError(f"consumer group {group!r} {GROUP_REFUSALS[error.code()]} ({error.str()})")
    return error


def _log_error(error: KafkaError) -> None:
    if error.fatal():
        log.error("fatal Kafka error: %s", error.str())
    else:
        log.warning("Kafka: %s", error.str())
