"""End-to-end trainer throughput through a real (embedded) broker, and snapshot freshness."""

import itertools
import threading
import time

import orjson
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry

from common import table
from streamlearn import kafka
from streamlearn.config import TrainSettings
from streamlearn.dev.broker import EmbeddedBroker, free_port
from streamlearn.dev.streams import records
from streamlearn.metrics import TrainerMetrics
from streamlearn.train.pipeline import Pipeline

N_RECORDS = 200_000
BATCH_SIZES = (256, 1024)


def publish(bootstrap: str, topic: str, n: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1_000_000})
    for record in itertools.islice(records("hyperplane", seed=0), n):
        while True:
            try:
                producer.produce(topic, orjson.dumps(record))
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(60)


def run_trainer(bootstrap: str, topic: str, batch_size: int, snapshot_dir: str) -> tuple[float, float]:
    settings = TrainSettings(
        bootstrap=bootstrap, topic=topic, group=f"bench-{topic}-{batch_size}", task="binary",
        batch_size=batch_size, snapshot_dir=snapshot_dir, metrics_port=0,
        kafka={"session.timeout.ms": "6000"},
    )  # fmt: skip
    metrics = TrainerMetrics(CollectorRegistry())
    pipeline = Pipeline(settings, metrics)
    thread = threading.Thread(target=pipeline.run)
    thread.start()
    while pipeline.records_learned == 0:
        time.sleep(0.001)
    started, first = time.perf_counter(), pipeline.records_learned
    while pipeline.records_learned < N_RECORDS:
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    pipeline.stop()
    thread.join()
    write_count = metrics.snapshot_write._sum.get()
    return (N_RECORDS - first) / elapsed, write_count


def main() -> list[str]:
    import tempfile

    rows = []
    with EmbeddedBroker(port=free_port()) as broker:
        topic = "bench-events"
        kafka.ensure_topic(broker.bootstrap, {}, topic)
        publish(broker.bootstrap, topic, N_RECORDS)
        for batch_size in BATCH_SIZES:
            with tempfile.TemporaryDirectory() as snapshots:
                rate, _ = run_trainer(broker.bootstrap, topic, batch_size, snapshots)
            rows.append((batch_size, f"{rate:,.0f}"))
    return [
        table(
            "Trainer through Kafka",
            ("batch size", "records/s learned"),
            rows,
            f"{N_RECORDS:,} hyperplane records (10 features) already in the embedded broker; default "
            "MLP [64, 64], Adam; snapshots every 2 s; from the first learned record to the last.",
        )
    ]


if __name__ == "__main__":
    main()
