"""The label join end to end on a real broker: exact outcome sets over 100,000 predictions, served
scores equal to an offline recomputation, idle expiry, kill -9 exactness, and refusals."""

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import orjson
import pytest
import torch
from confluent_kafka import Producer

from streamlearn import kafka
from streamlearn.dev.broker import free_port
from streamlearn.snapshots import LocalSnapshotStore
from streamlearn.train.labeljoin import fingerprint

from ..conftest import wait_for
from .conftest import read_topic, track
from .test_delivery import caught_up

T0 = 1_700_000_000_000  # event time of the first prediction, epoch ms


@dataclass
class Stream:
    """A synthetic prediction log and labels topic, and what the join must make of them."""

    window_ms: int
    predictions: list[tuple[int, dict]] = field(default_factory=list)  # (ts, entry)
    labels: list[tuple[int, dict]] = field(default_factory=list)
    expected: Counter[str] = field(default_factory=Counter)
    joined: list[tuple[str, int]] = field(default_factory=list)  # the (id, label) pairs to learn

    @classmethod
    def make(cls, n: int, window_ms: int, seed: int = 0, every_ms: int = 5, versions: int = 1) -> "Stream":
        """n predictions, every_ms apart: of their labels, most come after an exponential delay
        within the window, some before their prediction, some after the window, some twice, and
        some never."""
        rng, stream = random.Random(seed), cls(window_ms)
        for i in range(n):
            ts, key = T0 + i * every_ms, f"p{seed}-{i}"
            x = [round(rng.uniform(0, 10), 3) for _ in range(3)]
            truth = int(x[0] + x[1] > 10)
            served = truth if rng.random() < 0.8 else 1 - truth
            version = 1 + i * versions // n
            entry = {"id": key, "ts": ts, "model": "default", "version": version, "features": x,
                     "prediction": served, "probabilities": [0.5, 0.5]}  # fmt: skip
            stream.predictions.append((ts, entry))
            share = rng.random()
            if share < 0.55:  # after the prediction, within the window
                delay = int(rng.expovariate(3 / window_ms))
                while delay > window_ms:
                    delay = int(rng.expovariate(3 / window_ms))
            elif share < 0.65:  # before it (the client's clock, a label known at once)
                delay = -rng.randint(1, window_ms // 2)
            elif share < 0.75:  # after the window: late
                delay = rng.randint(window_ms + 1, window_ms * 19 // 10)
            else:  # never
                stream.expected["expired"] += 1
                continue
            stream.labels.append((ts + delay, {"id": key, "ts": ts + delay, "label": truth}))
            if delay > window_ms:
                stream.expected["late"] += 1
                stream.expected["expired"] += 1  # its prediction expired unlabelled
                continue
            stream.expected["joined"] += 1
            stream.joined.append((key, truth))
            stream.expected[f"labelled.{version}"] += 1
            stream.expected[f"correct.{version}"] += int(served == truth)
            if rng.random() < 0.02:  # the same label sent again, a moment later
                stream.labels.append((ts + delay + 50, {"id": key, "ts": ts + delay + 50, "label": truth}))
                stream.expected["duplicate"] += 1
        stream.labels.sort(key=lambda item: item[0])
        return stream

    def totals(self, log_topic: str, labels_topic: str) -> dict[str, int]:
        """How many messages each topic holds once published."""
        return {log_topic: len(self.predictions), labels_topic: len(self.labels)}

    def publish(self, bootstrap: str, log_topic: str, labels_topic: str) -> None:
        """Both topics keyed by id, partitioned by murmur2 as the contract asks, stamped in event time."""
        producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "partitioner": kafka.LABEL_JOIN_PARTITIONER,
                "linger.ms": 20,
                "enable.idempotence": True,
                "queue.buffering.max.messages": 500_000,
            }
        )
        for topic, items in ((log_topic, self.predictions), (labels_topic, self.labels)):
            for ts, value in items:
                producer.produce(topic, orjson.dumps(value), value["id"].encode(), timestamp=ts)
                producer.poll(0)
        assert producer.flush(60) == 0


def join_topics(bootstrap: str, partitions: int = 2) -> tuple[str, str]:
    base = f"join-{random.randrange(16**8):08x}"
    for topic in (f"{base}.predictions", f"{base}.labels"):
        kafka.ensure_topic(bootstrap, {}, topic, partitions=partitions)
    return f"{base}.predictions", f"{base}.labels"


def joined_through(snapshot, totals: dict[str, int]) -> bool:
    """Whether a snapshot's offsets are past every message published (topics made for the test)."""
    return all(sum(snapshot.meta.offsets.get(topic, {}).values()) >= n for topic, n in totals.items())


def settled(store: LocalSnapshotStore, totals: dict[str, int]):
    """The newest snapshot, once it joined every message and nothing waits any more."""
    snapshot = store.load_latest("default", training=False)
    if snapshot is None or snapshot.meta.join is None or not joined_through(snapshot, totals):
        return None
    pending = snapshot.meta.join["pending"]
    return snapshot if pending == {"predictions": 0, "labels": 0} else None


def test_100k_predictions_join_exactly_the_known_sets_and_score_what_was_served(
    bootstrap, start_trainer, tmp_path
):
    window_ms = 5_000
    stream = Stream.make(100_000, window_ms, seed=1, versions=4)
    log_topic, labels_topic = join_topics(bootstrap)
    stream.publish(bootstrap, log_topic, labels_topic)
    trainer = start_trainer(
        "unused", task="binary", labels_topic=labels_topic, prediction_log_topic=log_topic,
        join_window=window_ms / 1000, join_idle_s=1.0, batch_size=500, n_features=3,
    )  # fmt: skip
    store = LocalSnapshotStore(tmp_path / "snapshots")
    totals = stream.totals(log_topic, labels_topic)
    snapshot = wait_for(lambda: settled(store, totals), 180, 0.5, what="the join to finish")
    counts = snapshot.meta.join["counts"]
    expected = stream.expected
    assert counts["joined"] == expected["joined"]
    assert counts["late"] == expected["late"]
    assert counts["expired"] == expected["expired"]
    assert counts["duplicate"] == expected["duplicate"]
    assert counts["orphaned"] == counts["evicted"] == counts["imputed"] == 0
    # every joined pair learned, once
    assert snapshot.meta.records_trained == snapshot.meta.join["learned"] == expected["joined"]
    assert snapshot.meta.join["fingerprint"] == f"{fingerprint(stream.joined):016x}"

    # the served scores, per version, recomputed offline from what the two topics hold
    entries = {
        orjson.loads(m.value())["id"]: orjson.loads(m.value()) for m in read_topic(bootstrap, log_topic)
    }
    offline: Counter[str] = Counter()
    seen = set()
    for message in read_topic(bootstrap, labels_topic):
        label = orjson.loads(message.value())
        entry = entries.get(label["id"])
        if entry is None or label["id"] in seen or abs(label["ts"] - entry["ts"]) > window_ms:
            continue
        seen.add(label["id"])
        offline[f"labelled.{entry['version']}"] += 1
        offline[f"correct.{entry['version']}"] += int(entry["prediction"] == label["label"])
    for version in range(1, 5):
        v = {"model_version": str(version)}
        assert trainer.metric("streamlearn_served_labelled_total", v) == offline[f"labelled.{version}"]
        assert trainer.metric("streamlearn_served_correct_total", v) == offline[f"correct.{version}"]
        assert offline[f"labelled.{version}"] == expected[f"labelled.{version}"]
    assert trainer.metric("streamlearn_join_outcomes_total", {"outcome": "joined"}) == expected["joined"]
    assert trainer.metric("streamlearn_label_delay_seconds_count") == expected["joined"]
    trainer.stop()


def test_with_traffic_stopped_waiting_predictions_expire_within_the_idle_period_and_a_second(
    bootstrap, start_trainer
):
    log_topic, labels_topic = join_topics(bootstrap, partitions=1)
    trainer = start_trainer(
        "unused", task="binary", labels_topic=labels_topic, prediction_log_topic=log_topic,
        join_window=1.0, join_idle_s=2.0, n_features=3,
    )  # fmt: skip
    wait_for(lambda: trainer.pipeline.partitions.owned, 30, what="the partitions assigned")
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": kafka.LABEL_JOIN_PARTITIONER})
    for i in range(20):  # served now, as a server logs them; no label ever comes
        now = int(time.time() * 1000)
        entry = {
            "id": f"e{i}",
            "ts": now,
            "model": "default",
            "version": 1,
            "features": [1, 2, 3],
            "prediction": 0,
        }
        producer.produce(log_topic, orjson.dumps(entry), entry["id"].encode())
    assert producer.flush(10) == 0
    last = time.time()
    expired = wait_for(
        lambda: trainer.metric("streamlearn_join_outcomes_total", {"outcome": "expired"}) >= 20,
        15, 0.05, what="the predictions to expire",
    )  # fmt: skip
    took = time.time() - last
    assert expired and took <= 1.0 + 2.0 + 1.0, took  # the window, the idle period, and a second
    trainer.stop()


def join_process(bootstrap: str, topics: tuple[str, str], snapshots, crash: str | None = None, port: int = 0):
    log_topic, labels_topic = topics
    env = {**os.environ, "STREAMLEARN_CRASH_AT": crash or ""}
    process = subprocess.Popen(
        [
            sys.executable, "-m", "streamlearn", "train", "--bootstrap", bootstrap, "--task", "binary",
            "--labels-topic", labels_topic, "--prediction-log-topic", log_topic, "--join-window", "30s",
            "--group", f"g-{labels_topic}", "--session-timeout-ms", "3000", "--snapshot-dir", str(snapshots),
            "--metrics-port", str(port), "--deterministic", "--batch-size", "100",
            "--snapshot-interval-s", "0.3", "--hidden", "8", "--log-level", "warning",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    return track(process)


def joined_so_far(store: LocalSnapshotStore) -> int:
    snapshot = store.load_latest("default", training=False)
    return snapshot.meta.join["counts"]["joined"] if snapshot and snapshot.meta.join else 0


def test_kill_9_with_thousands_pending_learns_exactly_the_pairs_of_an_uninterrupted_run(
    bootstrap, start_trainer, tmp_path
):
    # a 30 s window over predictions 10 ms apart: about 3,000 predictions wait at any time
    stream = Stream.make(12_000, 30_000, seed=2, every_ms=10)
    topics = join_topics(bootstrap, partitions=1)
    stream.publish(bootstrap, *topics)
    offsets = stream.totals(*topics)
    store = LocalSnapshotStore(tmp_path / "crashing")
    rng = random.Random(4)
    for crash in ["snapshot.before_publish:2", None, "snapshot.after_publish:3", "commit.before:2", None]:
        process = join_process(bootstrap, topics, store.root, crash)
        if crash is None:
            # capped at every pair there is: a run may have joined them all by now, and then no
            # further progress can ever come
            target = min(joined_so_far(store) + rng.randint(500, 1500), stream.expected["joined"])
            wait_for(lambda t=target: joined_so_far(store) >= t, 120, what="progress before a random kill")
            process.send_signal(signal.SIGKILL)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()  # the crash point was not reached in time: a kill -9 all the same
            process.wait()
        assert process.returncode == -signal.SIGKILL, process.stderr.read()
        snapshot = store.load_latest("default", training=False)
        if snapshot is not None and snapshot.meta.join is not None:
            assert (
                snapshot.meta.join["pending"]["predictions"] > 1_000 or crash == "snapshot.before_publish:2"
            )

    port = free_port()
    final = join_process(bootstrap, topics, store.root, port=port)
    wait_for(lambda: caught_up(port), 120, what="the final run to catch up")
    done = wait_for(lambda: _joined_all(store, offsets), 120, 0.2, what="the final run to join everything")
    final.send_signal(signal.SIGTERM)
    assert final.wait(60) == 0, final.stderr.read()

    reference = start_trainer(
        "unused", task="binary", labels_topic=topics[1], prediction_log_topic=topics[0], join_window=30.0,
        group=f"ref-{topics[1]}", snapshot_dir=tmp_path / "reference", deterministic=True, batch_size=100,
        hidden="8", dlq_topic="",
    )  # fmt: skip
    reference_store = LocalSnapshotStore(tmp_path / "reference")
    expected = wait_for(lambda: _joined_all(reference_store, offsets), 120, 0.2, what="the reference run")
    reference.stop()
    assert done.meta.join["counts"] == expected.meta.join["counts"]
    assert done.meta.join["learned"] == expected.meta.join["learned"] > 5_000
    assert done.meta.join["fingerprint"] == expected.meta.join["fingerprint"]
    weights = store.load_latest("default").tensors
    reference_weights = reference_store.load_latest("default").tensors
    for name, tensor in reference_weights.items():
        if name.startswith(("model.", "optim.")):
            assert torch.equal(tensor, weights[name]), name


def _joined_all(store: LocalSnapshotStore, totals: dict[str, int]):
    snapshot = store.load_latest("default", training=False)
    return snapshot if snapshot is not None and joined_through(snapshot, totals) else None


def test_topics_partitioned_differently_are_refused_in_one_line(bootstrap, tmp_path):
    base = f"mismatch-{random.randrange(16**8):08x}"
    kafka.ensure_topic(bootstrap, {}, f"{base}.p", partitions=2)
    kafka.ensure_topic(bootstrap, {}, f"{base}.l", partitions=3)
    command = [
        sys.executable, "-m", "streamlearn", "train", "--bootstrap", bootstrap, "--task", "binary",
        "--labels-topic", f"{base}.l", "--prediction-log-topic", f"{base}.p",
        "--snapshot-dir", str(tmp_path / "snapshots"),  # never a model the checkout holds (make demo's)
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "2 partitions" in lines[0] and "has 3" in lines[0], result.stderr


def test_a_joining_trainer_in_a_plain_trainers_group_exits_in_one_line(bootstrap, tmp_path):
    base = f"regroup-{random.randrange(16**8):08x}"
    for topic in (f"{base}.p", f"{base}.l"):
        kafka.ensure_topic(bootstrap, {}, topic, partitions=1)
    # the plain trainer it replaces, still a member: the cooperative-sticky assignor, as it uses
    plain = kafka.make_consumer(bootstrap, {}, base, "earliest", assignor="cooperative-sticky")
    assigned = []
    plain.subscribe([f"{base}.p"], on_assign=lambda _c, partitions: assigned.extend(partitions))
    try:
        wait_for(lambda: plain.poll(0.1) is None and assigned, 30, what="the plain consumer's assignment")
        command = [
            sys.executable, "-m", "streamlearn", "train", "--bootstrap", bootstrap, "--task", "binary",
            "--group", base, "--labels-topic", f"{base}.l", "--prediction-log-topic", f"{base}.p",
            "--snapshot-dir", str(tmp_path / "snapshots"), "--log-level", "warning",
        ]  # fmt: skip
        # waits for the exit; before, it retried the join every few seconds, forever
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    finally:
        plain.close()
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"consumer group '{base}'" in lines[0] and "--group" in lines[0], result.stderr


@pytest.mark.parametrize("missing", ["labels"])
def test_a_missing_topic_is_created_with_the_partitions_of_the_other(bootstrap, start_trainer, missing):
    base = f"create-{random.randrange(16**8):08x}"
    kafka.ensure_topic(bootstrap, {}, f"{base}.p", partitions=3)
    trainer = start_trainer(
        "unused", task="binary", labels_topic=f"{base}.l", prediction_log_topic=f"{base}.p"
    )
    wait_for(lambda: len(trainer.pipeline.partitions.owned) == 6, 30, what="both topics' partitions assigned")
    assert kafka.partition_counts(bootstrap, {}, [f"{base}.l"]) == {f"{base}.l": 3}
    trainer.stop()
