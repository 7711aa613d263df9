"""The prediction log: every prediction the server answers, published to Kafka for the label join.

One message per predicted instance, keyed by its prediction id (so that the labels topic, keyed
the same way, puts an id's label in the same partition), valued by the JSON of a PredictionEntry
(logentry.py, which the label join parses back).

Logging never slows or fails a request: the request hands its predictions over in O(1) to a
bounded queue, and a thread of its own encodes and produces them. A full queue, or a broker
that does not take them in time, drops entries, and every dropped one is counted. Sampling keeps
an id when a hash of it falls below the rate, so a sampled id is sampled wherever it is seen.
"""

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash
from confluent_kafka import KafkaError, Producer

from streamlearn import kafka
from streamlearn.logentry import PredictionEntry

log = logging.getLogger(__name__)

DRAIN_EVERY_S = 0.02  # how often the log's thread takes what requests handed over
HASH_SPACE = 2**64


def sampled(prediction_id: str, rate: float) -> bool:
    """Whether an id is logged at this sampling rate: the same answer for the same id, everywhere."""
    return rate >= 1.0 or xxhash.xxh3_64_intdigest(prediction_id.encode()) < rate * HASH_SPACE


def prediction_ids(request_id: str | None, count: int) -> list[str]:
    """One id per instance: the client's id (suffixed :i when it sent several), else new UUIDs."""
    if request_id is None:
        return [str(uuid.uuid4()) for _ in range(count)]
    return [request_id] if count == 1 else [f"{request_id}:{i}" for i in range(count)]


@dataclass(frozen=True)
class Served:
    """One request's predictions, as the request hands them over (nothing encoded yet)."""

    ids: Sequence[str]
    logged: Sequence[bool]  # by the sampling rate
    received_ms: int
    model: str
    version: int
    features: Sequence[Any]  # per instance: its numbers (an array row) or its {name: value}
    predictions: Sequence[Any]  # class names or indices, or values
    probabilities: np.ndarray | None


class PredictionLog:
    """Publishes what `submit` is handed to `topic`, on a thread of its own."""

    def __init__(
        self,
        bootstrap: str,
        overrides: Mapping[str, str],
        topic: str,
        max_queued: int,
        counted: Callable[[str, int], None],
    ) -> None:
        self.topic = topic
        self.counted = counted  # (outcome, entries): sent, dropped
        config = kafka.client_config(
            bootstrap,
            overrides,
            **{
                "linger.ms": 5,
                "acks": "all",
                "enable.idempotence": True,  # a retry never logs a prediction twice
                "partitioner": kafka.LABEL_JOIN_PARTITIONER,  # as the labels' producers must
                "queue.buffering.max.messages": max_queued,
                "error_cb": _quiet,
            },
        )
        self._producer = Producer(config)
        self.max_queued = max_queued
        self._queue: queue.Queue[Served | None] = queue.Queue()
        self._queued = 0  # predictions handed over and not yet produced
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def submit(self, served: Served) -> None:
        """Hand a request's predictions over; never blocks (a full queue drops them, counted)."""
        count = sum(served.logged)
        with self._lock:
            full = self._queued + count > self.max_queued
            if not full:
                self._queued += count
        if full:
            self.counted("dropped", count)
        elif count:
            self._queue.put_nowait(served)

    def close(self, timeout_s: float = 2.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._producer.flush(timeout_s)

    def _run(self) -> None:
        """Every DRAIN_EVERY_S, produce whatever the requests handed over meanwhile. Waking once per
        request instead would hand Python's global lock back and forth with the event loop, each
        handover up to its 5 ms switch interval: at 200 predicts a second that queued them by
        seconds (bench/bench_prediction_log.py)."""
        while True:
            time.sleep(DRAIN_EVERY_S)
            batch: list[Served | None] = []
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self._queue.get_nowait())
            for served in batch:
                if served is None:
                    return
                self._produce(served)
                with self._lock:
                    self._queued -= sum(served.logged)
            self._producer.poll(0)

    def _produce(self, served: Served) -> None:
        """Produce each logged entry; one that cannot be (a full queue, too large, anything) is
        dropped and counted, and the others go on; a produced one is counted at its delivery."""
        dropped = 0
        for i, prediction_id in enumerate(served.ids):
            if not served.logged[i]:
                continue
            try:
                probabilities = None if served.probabilities is None else served.probabilities[i]
                value = PredictionEntry(
                    prediction_id,
                    served.received_ms,
                    served.model,
                    served.version,
                    served.features[i],
                    served.predictions[i],
                    probabilities,
                ).encode()
                self._producer.produce(
                    self.topic, key=prediction_id.encode(), value=value, on_delivery=self._delivered
                )
            except Exception as exc:  # BufferError: Kafka's queue is full; KafkaException: too large...
                dropped += 1
                error = exc
        if dropped:
            self.counted("dropped", dropped)
            log.warning("prediction log: %d entries of %s dropped: %s", dropped, served.model, error)

    def _delivered(self, error: KafkaError | None, _message: object) -> None:
        self.counted("sent" if error is None else "dropped", 1)


def now_ms() -> int:
    return int(time.time() * 1000)


def _quiet(error: KafkaError) -> None:
    log.debug("prediction log: %s", error.str())
