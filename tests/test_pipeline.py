"""The run loop's guard against its own bugs: one record that makes our code raise is isolated."""

import math
from dataclasses import dataclass

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from streamlearn import faults
from streamlearn.config import TrainSettings
from streamlearn.metrics import TrainerMetrics
from streamlearn.train.pipeline import Pipeline

TOPIC = "events"


@dataclass
class Consumed:
    """A consumed message as the loop sees it (an in-process seam for confluent_kafka.Message)."""

    offset_: int
    value_: bytes | None

    def value(self) -> bytes | None:
        return self.value_

    def key(self) -> bytes | None:
        return None

    def headers(self) -> list:
        return []

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self.offset_

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000 + self.offset_)

    def error(self) -> None:
        return None


@pytest.fixture
def pipeline(tmp_path) -> Pipeline:
    settings = TrainSettings(task="binary", topic=TOPIC, snapshot_dir=tmp_path, dlq_topic="", arch="linear")
    pipeline = Pipeline(settings, TrainerMetrics(CollectorRegistry()))
    pipeline.partitions.assign((TOPIC, 0), committed=-1)
    return pipeline


def records(n: int, marked: set[int] = frozenset()) -> list[Consumed]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        record = {"features": rng.normal(size=3).round(3).tolist(), "label": int(i % 2)}
        if i in marked:
            record["id"] = "poison"
        out.append(Consumed(i, orjson.dumps(record)))
    return out


def sample(pipeline: Pipeline, name: str, **labels: str) -> float:
    return pipeline.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_record_that_makes_decoding_raise_is_dead_lettered_and_the_rest_learned(pipeline, monkeypatch):
    monkeypatch.setenv("STREAMLEARN_RAISE_ON", "poison")
    faults._marker.cache_clear()
    try:
        pipeline.process(records(64, marked={5, 40}))
        pipeline.settle()
    finally:
        faults._marker.cache_clear()

    assert pipeline.records_learned == 62
    assert sample(pipeline, "streamlearn_records_invalid_total", reason="internal_error") == 2
    assert pipeline.partitions.learned == {(TOPIC, 0): 64}


def test_a_record_that_makes_learning_raise_is_isolated_by_bisection(pipeline, monkeypatch):
    pipeline.process(records(8))  # builds the trainer
    pipeline.settle()
    step = pipeline.learner.trainer.step
    stepped: list[int] = []

    def fragile_step(batch, pressed=None):
        stepped.append(len(batch))
        if (batch.features == np.float32(1234.5)).any():
            raise ZeroDivisionError("a bug of ours")
        return step(batch, pressed)

    monkeypatch.setattr(pipeline.learner.trainer, "step", fragile_step)
    batch = records(40)
    batch[17] = Consumed(17, b'{"features": [1, 1234.5, 2], "label": 1}')
    pipeline.process([Consumed(m.offset_ + 8, m.value_) for m in batch])
    pipeline.settle()

    assert pipeline.records_learned == 8 + 39
    assert sample(pipeline, "streamlearn_records_invalid_total", reason="internal_error") == 1
    assert len(stepped) <= 2 * 6 + 1  # bisection: a few steps per level, not one per record
    assert pipeline.partitions.learned == {(TOPIC, 0): 48}


def test_a_record_whose_loss_overflows_is_isolated_and_the_rest_learned(tmp_path):
    """A regression label within float32 whose squared error is not: one record, not its batch."""
    settings = TrainSettings(
        task="regression", topic=TOPIC, snapshot_dir=tmp_path, dlq_topic="", arch="linear"
    )
    pipeline = Pipeline(settings, TrainerMetrics(CollectorRegistry()))
    pipeline.partitions.assign((TOPIC, 0), committed=-1)
    values = [orjson.dumps({"features": [i % 7, 1.0, 2.0], "label": float(i % 5)}) for i in range(64)]
    values[21] = b'{"features": [1, 2, 3], "label": 3.0e38}'

    pipeline.process([Consumed(i, value) for i, value in enumerate(values)])
    pipeline.settle()

    assert pipeline.records_learned == 63
    assert sample(pipeline, "streamlearn_records_invalid_total", reason="non_finite") == 1
    prequential = pipeline.learner.trainer.state()[1]["prequential"]  # what a restart reads back
    assert math.isfinite(prequential["loss_sum"])
    assert all(math.isfinite(v) for v in prequential["faded_loss"].values())


def test_scores_of_a_snapshot_that_held_an_infinite_loss_load_afresh():
    from streamlearn.train.trainer import Prequential

    scores = Prequential.from_dict(
        {"records": 5, "loss_sum": None, "weight_sum": 5.0, "correct": 0, "faded_loss": {"100": None}}
    )

    assert scores.records == 5 and scores.loss_sum == 0.0 and scores.faded_loss == {}


def test_a_batch_whose_learning_fails_stops_the_trainer_and_nothing_after_it_counts(pipeline, monkeypatch):
    learn = pipeline.isolator.learn
    calls = []

    def failing_first(messages, decoded=None):
        calls.append(len(messages))
        if len(calls) == 1:
            raise RuntimeError("the device is gone")
        return learn(messages, decoded)

    monkeypatch.setattr(pipeline.isolator, "learn", failing_first)
    with pytest.raises(RuntimeError, match="device is gone"):
        pipeline.process(records(512))  # two micro-batches handed over; the first fails
        pipeline.settle()
    pipeline.settle()  # whatever was handed over after it is discarded, never counted as learned

    assert pipeline.partitions.learned == {}
    assert pipeline.checkpoints.halted
    assert pipeline.checkpoints.commit(None, force=True) is False
    assert pipeline.store.load_latest("default") is None  # nothing saved after the failure


class Consumer:
    """The calls a release makes on the Kafka consumer (an in-process seam)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list]] = []

    def resume(self, partitions) -> None:
        self.calls.append(("resume", [tp.partition for tp in partitions]))

    def incremental_unassign(self, partitions) -> None:
        self.calls.append(("unassign", [tp.partition for tp in partitions]))


def test_a_paused_partition_is_resumed_before_it_is_given_up(pipeline):
    from confluent_kafka import TopicPartition

    pipeline.order.assigned([(TOPIC, 0), (TOPIC, 1)])
    pipeline.order._lanes[(TOPIC, 1)].paused = True  # it ran ahead while partition 0 lagged
    consumer = Consumer()

    pipeline._release(consumer, [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)])

    # librdkafka keeps a pause across unassign and assign: a partition given back to us later
    # would never be fetched again
    assert consumer.calls == [("resume", [1]), ("unassign", [0, 1])]


def test_the_learning_thread_takes_small_steps_until_the_next_batch_waits(pipeline, monkeypatch):
    import threading

    pipeline.process(records(8))  # builds the trainer
    pipeline.settle()
    trainer = pipeline.learner.trainer
    step = trainer.step
    release = threading.Event()
    steps: list[int] = []

    def held_step(batch, pressed=None):
        if not steps:
            release.wait(10)  # the first batch is learned only once the second was handed over
        result = step(batch, pressed)
        steps.append(result.steps)
        return result

    monkeypatch.setattr(trainer, "step", held_step)
    batch = [Consumed(m.offset_ + 8, m.value_) for m in records(512)]
    pipeline._hand_over(batch[:256])
    pipeline._hand_over(batch[256:])  # waits behind the first: the first is pressed
    release.set()
    pipeline.settle()
    # the first batch, pressed from the start: one step; the second, with none behind: small steps
    assert steps == [1, 256 // pipeline.settings.sub_batch_size]
    assert pipeline.waiting == 0 and pipeline.records_learned == 8 + 512
    assert sample(pipeline, "streamlearn_optimizer_steps_total") == trainer.steps


def test_a_full_poll_means_a_backlog_and_one_step_per_micro_batch(pipeline):
    pipeline.process(records(8))  # builds the trainer
    pipeline.settle()
    trainer = pipeline.learner.trainer
    before = trainer.steps
    full = [Consumed(m.offset_ + 8, m.value_) for m in records(pipeline.settings.batch_size)]
    pipeline.process(full)  # as many as asked for: more is waiting in Kafka
    pipeline.settle()
    assert trainer.steps - before == 1
    before = trainer.steps
    pipeline.process([Consumed(m.offset_ + 8 + len(full), m.value_) for m in records(100)])  # caught up
    pipeline.settle()
    assert trainer.steps - before == -(-100 // pipeline.settings.sub_batch_size)
