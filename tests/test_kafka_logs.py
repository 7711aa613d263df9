"""A broker away makes every Kafka client repeat itself: each kind of line is logged once per interval."""

import logging

from confluent_kafka import KafkaError

from streamlearn import kafka
from streamlearn.dev.broker import free_port
from streamlearn.logfilter import RateLimitFilter

from .conftest import wait_for


def librdkafka_line(facility: str, text: str) -> logging.LogRecord:
    """A record as confluent-kafka logs librdkafka's lines: one template, the facility first."""
    args = (facility, "rdkafka#consumer-1", text)
    return logging.LogRecord("streamlearn.librdkafka", logging.ERROR, "", 0, "%s [%s] %s", args, None)


def test_librdkafka_lines_are_limited_per_facility():
    now = [0.0]
    limiter = RateLimitFilter(5.0, clock=lambda: now[0], key=kafka._facility)
    assert limiter.filter(librdkafka_line("FAIL", "Connect to 127.0.0.1:9092 failed"))
    assert not limiter.filter(librdkafka_line("FAIL", "Connect to 127.0.0.1:9093 failed"))
    assert limiter.filter(librdkafka_line("SASL", "authentication failed"))  # not hidden by the flood
    now[0] = 5.0
    shown = librdkafka_line("FAIL", "Connect to 127.0.0.1:9092 failed")
    assert limiter.filter(shown)
    assert shown.getMessage().endswith("failed [1 more like this in the last 5s not logged]")


class Counting(logging.Filter):
    """Counts the records offered to a logger, before its other filters decide."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.count += 1
        return True


def installed_limiter(logger: logging.Logger, monkeypatch) -> RateLimitFilter:
    """The limiter kafka.py installs on `logger`, as if nothing had been logged in this process yet,
    on a clock that stands still (however slowly this machine runs, the test stays in one interval)."""
    (limiter,) = [f for f in logger.filters if isinstance(f, RateLimitFilter)]
    monkeypatch.setattr(limiter, "_seen", {})
    monkeypatch.setattr(limiter, "clock", lambda: 0.0)
    return limiter


def test_a_client_of_an_absent_broker_logs_its_reconnect_attempts_once_per_interval(caplog, monkeypatch):
    # Every client the trainer makes (consumer, dead-letter and announcement producers) is built
    # from kafka.client_config, whose logger is streamlearn.librdkafka.
    config = kafka.client_config(f"127.0.0.1:{free_port()}", {}, **{"reconnect.backoff.max.ms": 100})
    assert config["logger"] is kafka.kafka_log
    assert installed_limiter(kafka.kafka_log, monkeypatch).interval_s == kafka.LOG_INTERVAL_S
    offered = Counting()
    monkeypatch.setattr(kafka.kafka_log, "filters", [offered, *kafka.kafka_log.filters])
    caplog.set_level(logging.DEBUG, logger="streamlearn.librdkafka")
    producer = kafka.Producer(config)

    def reconnect_lines() -> bool:
        producer.poll(0.1)  # librdkafka's lines reach the logger as the client is polled
        return offered.count >= 5

    wait_for(reconnect_lines, 20, what="5 reconnect lines")
    failures = [r for r in caplog.records if r.name == "streamlearn.librdkafka" and r.args[0] == "FAIL"]
    assert len(failures) == 1, [r.getMessage() for r in failures]


def test_the_errors_a_client_reports_are_limited_too(caplog, monkeypatch):
    installed_limiter(kafka.log, monkeypatch)
    caplog.set_level(logging.WARNING, logger="streamlearn.kafka")
    for port in range(10):
        kafka._log_error(KafkaError(KafkaError._TRANSPORT, f"127.0.0.1:{port}: Connection refused"))
    assert len([r for r in caplog.records if r.name == "streamlearn.kafka"]) == 1


def test_delivery_failures_keep_each_error_and_ignore_deliveries():
    failures = kafka.DeliveryFailures()
    failures(None, None)
    failures(KafkaError(KafkaError._MSG_TIMED_OUT, "timed out"), None)
    failures(None, None)
    failures(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large"), None)
    assert failures.errors == ["timed out", "too large"]
