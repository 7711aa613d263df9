"""A real Kafka-protocol broker for the integration tests, and factories that use it.

The broker is the embedded one on a free loopback port, or an external cluster when
STREAMLEARN_TEST_BOOTSTRAP is set. Nothing here stands in for Kafka.
"""

import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import CollectorRegistry

from streamlearn import kafka
from streamlearn.config import TrainSettings
from streamlearn.dev.broker import EmbeddedBroker, free_port
from streamlearn.metrics import TrainerMetrics
from streamlearn.train.pipeline import Pipeline

# A first group join takes about half the session timeout; keep it short for tests.
FAST_GROUP = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}


_spawned: list[subprocess.Popen] = []
HERE = os.path.dirname(__file__)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder talks to the broker: mark it, so `-m "not integration"` skips it."""
    for item in items:
        if str(item.path).startswith(HERE):
            item.add_marker(pytest.mark.integration)


def track(process: subprocess.Popen) -> subprocess.Popen:
    """Remember a process a test started, so that it is killed even when the test fails."""
    _spawned.append(process)
    return process


@pytest.fixture(autouse=True)
def _no_process_left_behind() -> Iterator[None]:
    yield
    while _spawned:
        process = _spawned.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def bootstrap() -> Iterator[str]:
    external = os.environ.get("STREAMLEARN_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    with EmbeddedBroker(port=free_port()) as broker:
        yield broker.bootstrap


@pytest.fixture
def make_topic(bootstrap: str) -> Callable[..., str]:
    def factory(partitions: int = 1) -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        kafka.ensure_topic(bootstrap, {}, name, partitions=partitions)
        return name

    return factory


def publish(bootstrap: str, topic: str, values: list[bytes | None], partition: int | None = None) -> None:
    """Publish values in order and wait until every one is delivered."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    failures = []
    for value in values:
        extra = {} if partition is None else {"partition": partition}
        producer.produce(topic, value, on_delivery=lambda err, _m: err and failures.append(err), **extra)
        producer.poll(0)
    assert producer.flush(30) == 0 and not failures, failures


def read_topic(bootstrap: str, topic: str) -> list:
    """Every message in the topic now (the reader the dead-letter commands use)."""
    from streamlearn.train.dlq import read_from

    return read_from(bootstrap, {}, topic)


def committed(bootstrap: str, group: str, topic: str, partitions: int = 1) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return [tp.offset for tp in found]
    finally:
        consumer.close()


class RunningTrainer:
    """A Pipeline running its loop on a thread, as `streamlearn train` runs it on the main one."""

    def __init__(self, settings: TrainSettings) -> None:
        self.registry = CollectorRegistry()
        self.pipeline = Pipeline(settings, TrainerMetrics(self.registry))
        self.pipeline.restore()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.pipeline.run()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def stop(self) -> None:
        self.pipeline.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "trainer did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def start_trainer(bootstrap: str, tmp_path) -> Iterator[Callable[..., RunningTrainer]]:
    running: list[RunningTrainer] = []

    def factory(topic: str, **overrides) -> RunningTrainer:
        values = {
            "bootstrap": bootstrap,
            "topic": topic,
            "group": f"group-{topic}",
            "snapshot_dir": tmp_path / "snapshots",
            "snapshot_interval_s": 0.5,
            "metrics_port": 0,
            **overrides,
        }
        trainer = RunningTrainer(TrainSettings(**values))
        running.append(trainer)
        return trainer

    yield factory
    for trainer in running:
        if trainer.thread.is_alive():
            trainer.stop()
