"""What the trainer tells the world: scores, drift, rates, lag and Kafka errors, as metrics and logs.

Every log line that a stream or a broker could repeat is rate-limited, so a flood of bad records
or an outage writes one line per reason every few seconds, with a count of the ones held back.
"""

import contextlib
import dataclasses
import logging
import socket
import sys
import threading
import time
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry, make_wsgi_app

from streamlearn.metrics import TrainerMetrics
from streamlearn.train.drift import DriftReport
from streamlearn.train.labeljoin import LabelJoin, Served
from streamlearn.train.order import EventTimeOrder
from streamlearn.train.partitions import Partitions
from streamlearn.train.trainer import WINDOWS, Trainer

log = logging.getLogger("streamlearn.train")

METRICS_IDLE_TIMEOUT_S = 5.0  # a /metrics connection silent this long is closed, and its thread ends
METRICS_MAX_CONNECTIONS = 32  # served at once (a thread each); more are closed as they arrive
CONNECTION_THREAD = "metrics-connection"  # the name of each thread serving one


class RateLimitedLog:
    """Logs each key at most once per `interval_s`, counting what it held back."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: Any) -> None:
        self.log(logging.WARNING, key, message, *args)

    def log(
        self, level: int, key: str, message: str, *args: Any, exc_info: BaseException | None = None
    ) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        log.log(
            level, message + (f" (+{held} more since last report)" if held else ""), *args, exc_info=exc_info
        )


class Telemetry:
    """Exports the trainer's state as metrics, and logs what needs a human, without floods."""

    def __init__(self, metrics: TrainerMetrics, drift_per_feature: bool = False) -> None:
        self.metrics = metrics
        self.drift_per_feature = drift_per_feature
        self.limited = RateLimitedLog()
        self._rate_mark = (time.monotonic(), 0)
        self._served: dict[int, Served] = {}  # the served scores exported, per version

    def scores(self, trainer: Trainer) -> None:
        scores, m = trainer.scores, self.metrics
        m.prequential_loss.labels("all").set(scores.mean_loss)
        for window in WINDOWS:
            m.prequential_loss.labels(str(window)).set(scores.faded_loss[window])
        if trainer.classification:
            m.prequential_accuracy.labels("all").set(scores.accuracy)
            for window in WINDOWS:
                m.prequential_accuracy.labels(str(window)).set(scores.faded_accuracy[window])

    def drift(self, report: DriftReport, event: dict[str, Any] | None) -> None:
        m = self.metrics
        for detector, score in report.scores.items():
            m.drift_score.labels(detector).set(score)
        if report.feature_psi_max is not None:
            m.feature_drift_psi.set(report.feature_psi_max)
            m.feature_drift_ks.set(report.feature_ks_max or 0.0)
            if self.drift_per_feature and len(report.feature_psi) <= 100:  # cardinality guard
                for name, psi in report.feature_psi.items():
                    m.feature_psi.labels(name).set(psi)
        if len(report.unseen) <= 100:  # cardinality guard
            for name, share in report.unseen.items():
                m.category_unseen.labels(name).set(share)
        if report.label_score is not None:
            m.label_drift.set(report.label_score)
        for detector in report.detected:
            m.drift_detections.labels(detector).inc()
        if event is not None:
            log.warning("%s", orjson.dumps(event).decode())  # one structured line per detection

    def rejected(self, where: str, reason: str, detail: str) -> None:
        self.metrics.records_invalid.labels(reason).inc()
        self.limited.warning(reason, "invalid record at %s: %s: %s", where, reason, detail)

    def tick(
        self,
        records_learned: int,
        consumer: Consumer | None,
        partitions: "Partitions[Any]",
        order: "EventTimeOrder[Any] | None" = None,
    ) -> None:
        """Once a second: the learning rate, the event-time skew and each owned partition's lag."""
        now = time.monotonic()
        since, count = self._rate_mark
        if now - since < 1.0:
            return
        self.metrics.records_per_second.set((records_learned - count) / (now - since))
        self._rate_mark = (now, records_learned)
        if order is not None:
            self.metrics.event_time_skew.set(order.skew_ms() / 1000)
            self.metrics.partitions_paused.set(order.paused)
        if consumer is None:
            return
        try:
            positions = consumer.position(consumer.assignment())
        except KafkaException:
            return
        lag: dict[int, int] = {}  # joining, a partition's lag is that of both topics
        for tp in positions:
            _low, high = consumer.get_watermark_offsets(tp, cached=True)
            # Before its first message librdkafka reports no position: a partition resumed at its
            # end has none at all, yet its lag is known (0), from where we resumed it.
            offset = partitions.known_position((tp.topic, tp.partition), tp.offset)
            if offset >= 0 and high >= 0:
                lag[tp.partition] = lag.get(tp.partition, 0) + max(high - offset, 0)
        for partition, records in lag.items():
            self.metrics.consumer_lag.labels(str(partition)).set(records)

    def join(self, join: "LabelJoin") -> None:
        """The label join's outcomes, pending entries, coverage, label delays and served scores."""
        m = self.metrics
        for outcome, count in join.outcomes().items():
            m.join_outcomes.labels(outcome).inc(count)
        for side, count in join.pending().items():
            m.join_pending.labels(side).set(count)
        m.join_pending_bytes.set(join.pending_bytes())
        if join.coverage is not None:
            m.join_coverage.set(join.coverage)
        for delay in join.delays_s:
            m.label_delay.observe(delay)
        join.delays_s.clear()
        for version, scores in join.scores.items():
            done = self._served.get(version)
            label = str(version)
            m.served_labelled.labels(label).inc(scores.labelled - (done.labelled if done else 0))
            if join.labels.task == "regression":
                error = scores.squared_error - (done.squared_error if done else 0.0)
                m.served_squared_error.labels(label).inc(max(error, 0.0))
            else:
                m.served_correct.labels(label).inc(scores.correct - (done.correct if done else 0))
            self._served[version] = dataclasses.replace(scores)
        for version in set(self._served) - set(join.scores):  # no longer among the newest scored
            del self._served[version]
            for metric in (m.served_labelled, m.served_correct, m.served_squared_error):
                with contextlib.suppress(KeyError):
                    metric.remove(str(version))

    def released(self, partition: int) -> None:
        with contextlib.suppress(KeyError):
            self.metrics.consumer_lag.remove(str(partition))

    def kafka_error(self, error: KafkaError) -> None:
        self.metrics.kafka_errors.inc()
        if error.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            self.limited.warning("kafka-down", "Kafka unreachable, retrying: %s", error.str())
        else:
            self.limited.warning(f"kafka-{error.code()}", "Kafka error: %s", error.str())

    def announced(self, sent: bool) -> None:
        self.metrics.announcements.labels("sent" if sent else "failed").inc()

    def committed(self, error: KafkaError | None, _partitions: list[TopicPartition]) -> None:
        if error is None:
            self.metrics.offsets_committed.inc()
        else:
            log.warning("offset commit failed (the snapshot still holds the offsets): %s", error.str())


class _QuietHandler(WSGIRequestHandler):
    """One request per connection, not logged; `timeout` bounds each wait on the client."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer(WSGIServer):
    """The trainer's /metrics: a thread per connection, at most `max_connections` of them, each
    closed after `idle_timeout_s` without a byte from or to its client (prometheus_client's own
    server keeps a thread per idle connection forever)."""

    def __init__(self, address: tuple[str, int], idle_timeout_s: float, max_connections: int) -> None:
        self.address_family = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0][0]
        self._slots = threading.BoundedSemaphore(max_connections)
        handler = type("MetricsHandler", (_QuietHandler,), {"timeout": idle_timeout_s})
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # every slot taken: closed at once, the scraper retries
            return
        args = (request, client_address)
        threading.Thread(target=self._serve, args=args, name=CONNECTION_THREAD, daemon=True).start()

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # a client silent past the timeout, or gone
            return
        super().handle_error(request, client_address)


def serve_metrics(
    port: int,
    host: str,
    registry: CollectorRegistry,
    idle_timeout_s: float = METRICS_IDLE_TIMEOUT_S,
    max_connections: int = METRICS_MAX_CONNECTIONS,
) -> MetricsServer:
    """Serve `registry` on http://host:port/ from a daemon thread; `shutdown()` stops it."""
    server = MetricsServer((host, port), idle_timeout_s, max_connections)
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
