"""Snapshot announcements: the trainer says on a small compacted Kafka topic which snapshot it has
just published, and every server follows the topic and loads that version at once.

A message is keyed by the model's name, so compaction keeps the newest per model. Its value is
JSON: {"kind": "snapshot", "model", "version", "location", "created_at_ms"}. An operator's
change to what is served (a pin, an unpin) is announced as {"kind": "serving", "model", ...},
and every replica re-reads the model's serving.json. Servers never trust an announcement: they
load the version from their own store and check it, and ignore what they cannot use.

Kafka at the edge: the rest of the server sees only `Announcement`s and a healthy flag.
"""

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Annotated, Literal

import msgspec
from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streamlearn import kafka
from streamlearn.config import MODEL_NAME
from streamlearn.snapshots.store import VERSION_DIGITS

log = logging.getLogger(__name__)

CHECK_EVERY_S = 5.0  # how often a follower asks for the topic's metadata (its health, new partitions)
CHECK_TIMEOUT_S = 2.0
FETCH_WAIT_MS = 50  # a follower's longest fetch wait: an announcement is read within about this
COMPACTED = {"cleanup.policy": "compact"}
DELIVERY_WAIT_S = 0.5  # an announcement still undelivered by then is reported when it is


ModelName = Annotated[str, msgspec.Meta(pattern=f"^{MODEL_NAME}$")]  # never a path elsewhere
Version = Annotated[int, msgspec.Meta(ge=1, le=10**VERSION_DIGITS - 1)]


class Announcement(msgspec.Struct, frozen=True):
    """One snapshot published, or one model's serving state changed."""

    model: ModelName
    version: Version
    location: str = ""  # the trainer's snapshot store, for a human; servers read their own
    created_at_ms: int = 0
    kind: Literal["snapshot", "serving"] = "snapshot"


_DECODER = msgspec.json.Decoder(Announcement)


def decode(value: bytes | None) -> Announcement | None:
    """The announcement in a message's value, or None when it is not one."""
    try:
        return None if value is None else _DECODER.decode(value)
    except (msgspec.MsgspecError, RecursionError):
        return None


class Announcer:
    """Publishes announcements, waiting at most DELIVERY_WAIT_S for each; `outcome` hears of each delivery."""

    def __init__(
        self,
        bootstrap: str,
        overrides: Mapping[str, str],
        topic: str,
        outcome: Callable[[bool], None] = lambda sent: None,
    ) -> None:
        self.topic = topic
        self.outcome = outcome
        config = kafka.client_config(
            bootstrap,
            overrides,
            **{"linger.ms": 0, "acks": "all", "message.timeout.ms": 10_000, "error_cb": _quiet},
        )
        self._producer = Producer(config)

    def announce(self, announcement: Announcement) -> None:
        try:
            self._producer.produce(
                self.topic,
                key=announcement.model.encode(),
                value=msgspec.json.encode(announcement),
                on_delivery=self._delivered,
            )
        except (BufferError, KafkaException) as exc:  # a full queue while Kafka is away: drop it
            self.outcome(False)
            log.warning("snapshot announcement dropped: %s", exc)
        self._producer.flush(DELIVERY_WAIT_S)  # its delivery report, in milliseconds while Kafka is up

    def _delivered(self, error: KafkaError | None, _message: object) -> None:
        self.outcome(error is None)
        if error is not None:
            log.warning("snapshot announcement not delivered: %s", error.str())

    def close(self, timeout_s: float = 2.0) -> None:
        self._producer.flush(timeout_s)


class Follower:
    """Reads the announcements on a thread of its own, from the topic's end, and hands each over.

    `healthy` is whether it is following: the topic's metadata answered within the last checks.
    `on_health(True)` is called whenever following (re)starts, so that the caller can look at the
    store once for anything announced while it was not.
    """

    def __init__(
        self,
        bootstrap: str,
        overrides: Mapping[str, str],
        topic: str,
        on_announcement: Callable[[Announcement], None],
        on_health: Callable[[bool], None] = lambda healthy: None,
        on_invalid: Callable[[], None] = lambda: None,
    ) -> None:
        self.topic = topic
        self.on_announcement = on_announcement
        self.on_health = on_health
        self.on_invalid = on_invalid
        self.healthy = False
        self._config = kafka.client_config(
            bootstrap,
            overrides,
            **{
                "group.id": f"streamlearn-serve-{uuid.uuid4().hex}",  # never joined: partitions are assigned
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "fetch.wait.max.ms": FETCH_WAIT_MS,
                "error_cb": self._on_error,
            },
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="announcements", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        consumer = Consumer(self._config)
        assigned: set[int] = set()
        next_check = 0.0
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + CHECK_EVERY_S
                    assigned |= self._check(consumer, assigned)
                message = consumer.poll(0.1)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:  # e.g. not authorized to read
                        self._set_health(False, error.str())  # poll the store until the next check
                    continue
                self._hand_over(message.value())
        except Exception:  # the server keeps polling the store; never die silently
            log.exception("the announcement follower stopped")
            self._set_health(False)
        finally:
            consumer.close()

    def _check(self, consumer: Consumer, assigned: set[int]) -> set[int]:
        """Ask for the topic's partitions; assign new ones at their end. Returns those assigned."""
        try:
            metadata = consumer.list_topics(self.topic, timeout=CHECK_TIMEOUT_S).topics.get(self.topic)
        except KafkaException as exc:
            self._set_health(False, f"Kafka does not answer ({exc.args[0].str()})")
            return set()
        if metadata is None or metadata.error is not None or not metadata.partitions:
            why = metadata.error.str() if metadata is not None and metadata.error else "no such topic"
            self._set_health(False, f"topic {self.topic!r}: {why}")
            return set()
        new = set(metadata.partitions) - assigned
        if new:
            consumer.incremental_assign(
                [TopicPartition(self.topic, partition, OFFSET_END) for partition in sorted(new)]
            )
        self._set_health(True)
        return new

    def _hand_over(self, value: bytes | None) -> None:
        announcement = decode(value)
        if announcement is None:
            self.on_invalid()
            log.warning("ignoring a message on %s that is no snapshot announcement", self.topic)
            return
        try:
            self.on_announcement(announcement)
        except Exception:  # one announcement never stops the following
            log.exception("handling %s v%d failed", announcement.model, announcement.version)

    def _on_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self._set_health(False, error.str())

    def _set_health(self, healthy: bool, why: str = "") -> None:
        if healthy == self.healthy:
            return
        self.healthy = healthy
        if healthy:
            log.info("following snapshot announcements on %s", self.topic)
        else:
            log.warning("not following snapshot announcements (%s): polling the store", why)
        self.on_health(healthy)


def _quiet(error: KafkaError) -> None:
    log.debug("announcements: %s", error.str())
