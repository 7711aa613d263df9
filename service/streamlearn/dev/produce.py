"""Publishing a synthetic stream to Kafka at a steady rate (`streamlearn produce`), or, with
--predict-url, playing a client whose labels come later (client.py)."""

import logging
import time
from collections.abc import Callable

import orjson

from streamlearn import kafka
from streamlearn.config import ProduceSettings
from streamlearn.dev.client import play
from streamlearn.dev.streams import INVALID_VALUES, records
from streamlearn.errors import KafkaOperationError

log = logging.getLogger(__name__)


def publish(settings: ProduceSettings, stopped: Callable[[], bool] = lambda: False) -> int:
    """Publish until --count records are delivered or `stopped()`; return how many were sent.

    With --predict-url, play a client instead: return how many labels it published.
    """
    if settings.predict_url:
        return play(settings, stopped).labels_published
    kafka.check_reachable(settings.bootstrap, settings.kafka, settings.connect_timeout_s)
    producer = kafka.make_producer(settings.bootstrap, settings.kafka)
    failures = kafka.DeliveryFailures()
    source = records(settings.stream, settings.stream_seed, settings.drift_every)
    started = time.monotonic()
    sent = 0
    while not stopped() and (settings.count == 0 or sent < settings.count):
        if settings.rate:
            delay = started + sent / settings.rate - time.monotonic()
            if delay > 0:
                producer.poll(min(delay, 0.1))
                continue
        invalid = settings.invalid_every and (sent + 1) % settings.invalid_every == 0
        if invalid:
            value = INVALID_VALUES[(sent // settings.invalid_every) % len(INVALID_VALUES)]
        else:
            value = orjson.dumps(next(source))
        try:
            producer.produce(settings.topic, value, on_delivery=failures)
        except BufferError:  # the local queue is full: let deliveries drain, then try again
            producer.poll(0.1)
            continue
        producer.poll(0)
        sent += 1
    remaining = producer.flush(30)
    if remaining or failures.errors:
        raise KafkaOperationError(
            f"{remaining + len(failures.errors)} of {sent} records were not delivered"
            + (f" (first error: {failures.errors[0]})" if failures.errors else "")
        )
    log.info("published %d records to %s", sent, settings.topic)
    return sent
