"""Records spread over several partitions are learned in event-time order, through a real broker.

Every record carries its event index as its first feature and a Kafka timestamp of
BASE_MS + 10 ms * index; the check reads the order the learner was handed the records in.
"""

import threading
import time

import numpy as np
import orjson
import pytest
from confluent_kafka import Producer

from streamlearn.train.learner import Learner

from ..conftest import wait_for

BASE_MS = int(time.time() * 1000) - 3_600_000  # an hour ago: a backlog
STEP_MS = 10


@pytest.fixture
def learned_order(monkeypatch) -> list[int]:
    """The event index of every record learned, in the order learned."""
    order: list[int] = []
    lock = threading.Lock()
    learn = Learner.learn

    def recording(self, batch, features, pressed=None):
        learned = learn(self, batch, features, pressed)
        with lock:
            order.extend(int(i) for i in batch.features[:learned, 0])  # the records learned: a prefix
        return learned

    monkeypatch.setattr(Learner, "learn", recording)
    return order


def publish_events(bootstrap: str, topic: str, events: list[tuple[int, int]]) -> None:
    """(index, partition) pairs, each produced with its event time as the Kafka timestamp."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    rng = np.random.default_rng(7)
    for index, partition in events:
        value = orjson.dumps({"features": [index, *rng.normal(size=2).round(3).tolist()], "label": index % 2})
        producer.produce(topic, value, partition=partition, timestamp=BASE_MS + STEP_MS * index)
        producer.poll(0)
    assert producer.flush(30) == 0


def test_a_backlog_over_four_partitions_is_learned_in_event_time_order(
    bootstrap, make_topic, start_trainer, learned_order
):
    topic = make_topic(partitions=4)
    n = 4000  # 40 s of event time, unevenly spread: partition 0 holds twice the others' share
    publish_events(bootstrap, topic, [(i, 0 if i % 5 < 2 else i % 5 - 1) for i in range(n)])

    trainer = start_trainer(topic, task="binary", n_features=3)
    wait_for(lambda: trainer.pipeline.records_learned == n, 60, what="the backlog learned")

    assert sorted(learned_order) == list(range(n))
    assert learned_order == list(range(n))  # every partition answered within --max-order-wait-ms


def test_an_empty_partition_holds_nobody_back_and_a_lagging_one_is_caught_up_first(
    bootstrap, make_topic, start_trainer, learned_order
):
    topic = make_topic(partitions=4)
    # partitions 0 and 1 hold the recent records; partition 2 lags far behind (older records,
    # produced last); partition 3 stays empty
    recent = [(i, i % 2) for i in range(1000, 3000)]
    lagging = [(i, 2) for i in range(1000)]
    publish_events(bootstrap, topic, recent + lagging)

    trainer = start_trainer(topic, task="binary", n_features=3)
    wait_for(lambda: trainer.pipeline.records_learned == 3000, 60, what="every record learned")

    assert learned_order == list(range(3000))  # the lagging partition first, then the others in order
    assert trainer.metric("streamlearn_partitions_paused") == 0
