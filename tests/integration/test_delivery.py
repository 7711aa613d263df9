"""Delivery guarantees under faults: every valid record learned exactly once, every invalid one
dead-lettered exactly once, through kill -9, rebalances, broker outages and disk failures."""

import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest
import torch
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from streamlearn import kafka
from streamlearn.dev.broker import EmbeddedBroker, free_port
from streamlearn.dev.streams import records
from streamlearn.snapshots import LocalSnapshotStore, SnapshotStore
from streamlearn.train.dlq import H_REASON, header, read_from, source_of

from ..conftest import wait_for
from .conftest import committed, publish, read_topic, track
from .proxy import TcpProxy

POISON: dict[str, tuple[bytes | None, str]] = {
    "truncated JSON": (b'{"features": [1, 2', "bad_json"),
    "over the size limit": (
        b'{"features": [1, 2, 3], "label": 1, "pad": "' + b"x" * 5000 + b'"}',
        "too_large",
    ),
    "NaN": (b'{"features": [NaN, 1, 2], "label": 1}', "non_finite"),
    "Infinity": (b'{"features": [1, -Infinity, 2], "label": 0}', "non_finite"),
    "a string for a number": (b'{"features": [1, "2", 3], "label": 1}', "bad_features"),
    "wrong length": (b'{"features": [1, 2], "label": 1}', "wrong_length"),
    "not UTF-8": (b'\xff\xfe{"features"', "not_utf8"),
    "missing features": (b'{"label": 1}', "missing_features"),
    "missing label": (b'{"features": [1, 2, 3]}', "missing_label"),
    "deeply nested junk": (b'{"features": ' + b"[" * 600 + b"]" * 600 + b', "label": 1}', "bad_features"),
    "empty value": (b"", "empty"),
    "null value": (None, "empty"),
    "JSON null": (b"null", "not_an_object"),
}
POISON_VALUES = [value for value, _ in POISON.values()]


def stream(n: int, invalid_every: int, seed: int = 0) -> tuple[list[bytes | None], set[int]]:
    """n values of the sea concept, every invalid_every-th one poison; and the poison offsets."""
    source = records("sea", seed=seed, drift_every=0)
    values, invalid = [], set()
    for i in range(n):
        if invalid_every and i % invalid_every == invalid_every - 1:
            values.append(POISON_VALUES[(i // invalid_every) % len(POISON_VALUES)])
            invalid.add(i)
        else:
            values.append(orjson.dumps(next(source)))
    return values, invalid


class PacedProducer(threading.Thread):
    """Publishes values to one partition at a steady rate, as a live source would."""

    def __init__(
        self, bootstrap: str, topic: str, values: list[bytes | None], per_second: float, partition: int = 0
    ) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.values, self.per_second = bootstrap, topic, values, per_second
        self.partition = partition
        self.failures: list[str] = []

    def run(self) -> None:
        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 5})
        started = time.monotonic()
        for i, value in enumerate(self.values):
            while (delay := started + i / self.per_second - time.monotonic()) > 0:
                producer.poll(delay)  # pacing is the point here: a live stream arriving over time
            producer.produce(self.topic, value, partition=self.partition, on_delivery=self._delivered)
            producer.poll(0)
        producer.flush(60)

    def _delivered(self, error, _message) -> None:
        if error is not None:
            self.failures.append(error.str())


def offsets_done(store: SnapshotStore, topic: str, ends: dict[int, int]):
    snapshot = store.load_latest("default")
    if snapshot is None:
        return None
    done = {int(p): o for p, o in snapshot.meta.offsets.get(topic, {}).items()}
    return snapshot if all(done.get(p) == end for p, end in ends.items()) else None


def caught_up(port: int) -> bool:
    """The trainer owns partition 0 and has consumed it to its end (its lag metric says 0)."""
    try:
        page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
    except httpx.HTTPError:
        return False
    return 'streamlearn_consumer_lag_records{partition="0"} 0.0' in page


def learned(store: SnapshotStore) -> int:
    snapshot = store.load_latest("default")
    return snapshot.meta.records_trained if snapshot else 0


def test_poison_inputs_land_in_the_dlq_with_their_reason(bootstrap, make_topic, start_trainer, tmp_path):
    topic = make_topic()
    valid = [orjson.dumps(r) for r in itertools.islice(records("sea", seed=9), 40)]
    values = valid[:20] + POISON_VALUES + valid[20:]
    producer = Producer({"bootstrap.servers": bootstrap})
    for i, value in enumerate(values):
        producer.produce(topic, value, key=f"key-{i}".encode(), headers=[("trace", f"t{i}".encode())])
    assert producer.flush(30) == 0
    trainer = start_trainer(topic, task="binary", n_features=3, max_record_bytes=4096)
    store = LocalSnapshotStore(tmp_path / "snapshots")
    snapshot = wait_for(
        lambda: offsets_done(store, topic, {0: len(values)}), 60, what="all offsets processed"
    )
    assert snapshot.meta.records_trained == 40
    assert trainer.thread.is_alive()

    letters = read_topic(bootstrap, f"{topic}.dlq")
    assert len(letters) == len(POISON)
    for letter, (name, (value, reason)) in zip(letters, POISON.items(), strict=True):
        offset = 20 + list(POISON).index(name)
        assert letter.value() == value, name  # byte for byte (None stays None)
        assert letter.key() == f"key-{offset}".encode(), name
        assert header(letter.headers(), H_REASON) == reason, name
        assert source_of(letter) == (topic, 0, offset), name
        assert ("trace", f"t{offset}".encode()) in letter.headers(), name


def test_dead_letters_after_a_mark_inside_the_last_batch_are_read(bootstrap, make_topic):
    topic = make_topic()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 100})
    for i in range(3):
        producer.produce(topic, b"letter %d" % i)
    assert producer.flush(10) == 0  # one batch: the broker's ListOffsets answers 1 for its end

    assert [letter.offset() for letter in read_from(bootstrap, {}, topic, {0: 1})] == [1, 2]


def train_process(
    bootstrap: str, topic: str, snapshots: Path | str, crash: str | None = None, metrics_port: int = 0
) -> subprocess.Popen:
    env = {**os.environ, "STREAMLEARN_CRASH_AT": crash or ""}
    process = subprocess.Popen(
        [
            sys.executable, "-m", "streamlearn", "train", "--bootstrap", bootstrap, "--topic", topic,
            "--task", "binary", "--group", f"g-{topic}", "--session-timeout-ms", "3000",
            "--snapshot-dir", str(snapshots), "--metrics-port", str(metrics_port), "--deterministic",
            "--batch-size", "50", "--snapshot-interval-s", "0.3", "--hidden", "16",
            "--max-record-bytes", "4096", "--log-level", "warning",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    return track(process)


def test_kill_9_loses_nothing_and_learns_nothing_twice(bootstrap, make_topic, start_trainer, tmp_path):
    topic, n = make_topic(), 2400
    values, invalid = stream(n, invalid_every=11)
    producer = PacedProducer(bootstrap, topic, values, per_second=50)  # still arriving through every crash
    producer.start()
    store = LocalSnapshotStore(tmp_path / "crashing")
    rng = random.Random(3)
    crashes = [
        "snapshot.before_publish:2",
        "snapshot.after_publish:2",
        None,  # kill -9 at a random moment
        "commit.before:3",
        "dlq.after_send:2",
        None,
    ]
    for crash in crashes:
        process = train_process(bootstrap, topic, store.root, crash)
        if crash is None:
            # capped at every valid record: on a slow machine the stream may be learned by now
            target = min(learned(store) + rng.randint(50, 150), n - len(invalid))
            wait_for(lambda t=target: learned(store) >= t, 120, what="progress before a random kill")
            process.send_signal(signal.SIGKILL)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()  # the crash point was not reached in time: a kill -9 all the same
            process.wait()
        assert process.returncode == -signal.SIGKILL, process.stderr.read()

    producer.join(60)
    assert not producer.failures
    port = free_port()
    final = train_process(bootstrap, topic, store.root, metrics_port=port)
    wait_for(lambda: caught_up(port), 120, what="the final run to catch up")
    snapshot = wait_for(lambda: offsets_done(store, topic, {0: n}), 60, what="the final snapshot")
    final.send_signal(signal.SIGTERM)
    assert final.wait(60) == 0, final.stderr.read()

    assert snapshot.meta.records_trained == n - len(invalid)
    letters = read_topic(bootstrap, f"{topic}.dlq")
    sources = [source_of(letter) for letter in letters]
    assert len(sources) == len(set(sources)), "a record was dead-lettered twice"
    assert {offset for _, _, offset in sources} == invalid
    assert committed(bootstrap, f"g-{topic}", topic) == [n]

    # An uninterrupted run over the same records ends with identical weights.
    reference = start_trainer(
        topic, task="binary", group=f"ref-{topic}", snapshot_dir=tmp_path / "reference", deterministic=True,
        batch_size=50, hidden="16", max_record_bytes=4096, dlq_topic="",
    )  # fmt: skip
    reference_store = LocalSnapshotStore(tmp_path / "reference")
    expected = wait_for(lambda: offsets_done(reference_store, topic, {0: n}), 120, what="the reference run")
    reference.stop()
    assert expected.meta.records_trained == snapshot.meta.records_trained
    final_weights = store.load_latest("default").tensors
    for name, tensor in expected.tensors.items():
        if name.startswith(("model.", "optim.")):
            assert torch.equal(tensor, final_weights[name]), name


def recreate(bootstrap: str, topic: str) -> None:
    """Delete the topic and create it again, empty, under the same name."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.delete_topics([topic])[topic].result(10)
    wait_for(lambda: topic not in admin.list_topics(timeout=5).topics, 10, what="the topic deleted")
    kafka.ensure_topic(bootstrap, {}, topic)


def test_a_topic_recreated_under_the_snapshot_is_learned_from_its_start(
    bootstrap, make_topic, start_trainer, tmp_path
):
    topic, store = make_topic(), LocalSnapshotStore(tmp_path / "snapshots")
    publish(bootstrap, topic, stream(300, invalid_every=0)[0])
    first = start_trainer(topic, task="binary", max_record_bytes=4096)
    wait_for(lambda: offsets_done(store, topic, {0: 300}), 60, what="the first log learned")
    first.stop()

    recreate(bootstrap, topic)  # the new log's 200 records lie below the snapshot's offset, 300
    publish(bootstrap, topic, stream(200, invalid_every=0, seed=1)[0])
    trainer = start_trainer(topic, task="binary", max_record_bytes=4096)

    snapshot = wait_for(lambda: offsets_done(store, topic, {0: 200}), 30, what="the new log learned")
    assert snapshot.meta.records_trained == 500
    labels = {"topic": topic, "partition": "0", "kind": "beyond_end"}
    assert trainer.metric("streamlearn_trainer_offset_resets_total", labels) == 1


def test_a_trainer_joining_and_leaving_shares_the_work_without_overlap(
    bootstrap, make_topic, start_trainer, tmp_path
):
    topic, partitions, per_partition = make_topic(partitions=4), 4, 500
    expected_valid = 0
    for partition in range(partitions):
        values, invalid = stream(per_partition, invalid_every=13, seed=partition)
        publish(bootstrap, topic, values[:100], partition)
        expected_valid += per_partition - len(invalid)
        # still arriving while the second trainer joins (Tansu assigns it partitions ~11 s later)
        PacedProducer(bootstrap, topic, values[100:], per_second=20, partition=partition).start()
    first = start_trainer(topic, task="binary", snapshot_dir=tmp_path / "a", max_record_bytes=4096)
    wait_for(lambda: first.pipeline.records_learned > 0, 60, what="the first trainer learning")
    second = start_trainer(topic, task="binary", snapshot_dir=tmp_path / "b", max_record_bytes=4096)
    wait_for(lambda: second.pipeline.records_learned >= 50, 60, what="the second trainer getting partitions")
    second.stop()
    ends = dict.fromkeys(range(partitions), per_partition)
    wait_for(
        lambda: offsets_done(LocalSnapshotStore(tmp_path / "a"), topic, ends),
        120,
        what="the first catching up",
    )
    first.stop()

    learned_a = LocalSnapshotStore(tmp_path / "a").load_latest("default").meta.records_trained
    learned_b = LocalSnapshotStore(tmp_path / "b").load_latest("default").meta.records_trained
    assert learned_b >= 50 and learned_a > 0
    assert learned_a + learned_b == expected_valid
    sources = [source_of(m) for m in read_topic(bootstrap, f"{topic}.dlq")]
    assert len(sources) == len(set(sources)) == partitions * per_partition - expected_valid


def test_the_trainer_survives_a_broker_outage_and_finishes(make_topic, start_trainer, tmp_path):
    broker_port, proxy_port = free_port(), free_port()
    proxy = TcpProxy(proxy_port, broker_port).start()
    broker = EmbeddedBroker(port=broker_port, advertised_port=proxy_port).start()
    bootstrap = f"127.0.0.1:{proxy_port}"
    try:
        from streamlearn import kafka

        topic = "outage"
        kafka.ensure_topic(bootstrap, {}, topic)
        values, invalid = stream(1200, invalid_every=10)
        publish(bootstrap, topic, values[:600])
        trainer = start_trainer(topic, bootstrap=bootstrap, task="binary", max_record_bytes=4096)
        store = LocalSnapshotStore(tmp_path / "snapshots")
        wait_for(lambda: offsets_done(store, topic, {0: 600}), 60, what="the first half learned")

        proxy.cut()
        cut_at = time.monotonic()
        wait_for(lambda: trainer.metric("streamlearn_kafka_errors_total") > 0, 30, what="the outage noticed")
        time.sleep(max(0.0, 15 - (time.monotonic() - cut_at)))  # the fault itself: 15 s without a broker
        assert trainer.thread.is_alive()
        proxy.restore()

        publish(bootstrap, topic, values[600:])
        snapshot = wait_for(
            lambda: offsets_done(store, topic, {0: 1200}), 120, what="the second half learned"
        )
        assert snapshot.meta.records_trained == 1200 - len(invalid)
        assert trainer.thread.is_alive()
        trainer.stop()
        sources = [source_of(m) for m in read_topic(bootstrap, f"{topic}.dlq")]
        assert sorted(offset for _, _, offset in sources) == sorted(invalid)
    finally:
        proxy.stop()
        broker.stop()


def test_an_unwritable_snapshot_dir_stops_commits_until_it_recovers(
    bootstrap, make_topic, start_trainer, tmp_path
):
    topic = make_topic()
    values, _ = stream(400, invalid_every=0)
    publish(bootstrap, topic, values[:200])
    trainer = start_trainer(topic, task="binary")
    store = LocalSnapshotStore(tmp_path / "snapshots")
    wait_for(lambda: committed(bootstrap, f"group-{topic}", topic) == [200], 60, what="the first commit")

    model_dir = tmp_path / "snapshots" / "default"
    model_dir.rename(tmp_path / "moved-away")
    model_dir.write_text("not a directory")  # every snapshot write now fails
    publish(bootstrap, topic, values[200:])
    wait_for(lambda: trainer.metric("streamlearn_snapshot_failures_total") >= 2, 30, what="failed snapshots")
    assert committed(bootstrap, f"group-{topic}", topic) == [200]  # nothing committed past the last snapshot

    model_dir.unlink()
    (tmp_path / "moved-away").rename(model_dir)
    wait_for(lambda: committed(bootstrap, f"group-{topic}", topic) == [400], 30, what="commits resuming")
    assert store.load_latest("default").meta.records_trained == 400


def test_a_corrupt_newest_snapshot_is_skipped_and_nothing_is_lost(bootstrap, make_topic, tmp_path):
    topic = make_topic()
    values, invalid = stream(1000, invalid_every=20)
    PacedProducer(bootstrap, topic, values[:500], per_second=40).start()  # several snapshots. worth
    store = LocalSnapshotStore(tmp_path)
    crashed = train_process(bootstrap, topic, tmp_path, crash="commit.before:3")
    crashed.wait(60)
    assert crashed.returncode == -signal.SIGKILL
    newest = store.latest_version("default")
    weights = tmp_path / "default" / f"{newest:012d}" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    wait_for(lambda: len(read_topic(bootstrap, topic)) == 500, 30, what="the first half published")
    publish(bootstrap, topic, values[500:])

    port = free_port()
    final = train_process(bootstrap, topic, tmp_path, metrics_port=port)
    wait_for(lambda: caught_up(port), 120, what="the final run to catch up")
    snapshot = wait_for(lambda: offsets_done(store, topic, {0: 1000}), 60, what="the final snapshot")
    final.send_signal(signal.SIGTERM)
    _, errors = final.communicate(timeout=60)
    assert final.returncode == 0
    assert "checksum mismatch" in errors  # it said which snapshot it skipped
    assert snapshot.meta.records_trained == 1000 - len(invalid)


@pytest.fixture(autouse=True)
def _deterministic_off():
    yield
    torch.use_deterministic_algorithms(False)  # the reference run switched it on for this process


def test_dlq_inspect_and_replay_as_users_run_them(bootstrap, make_topic, start_trainer, tmp_path):
    topic, fixed = make_topic(), make_topic()
    poison = [b'{"features": [1, 2', b"\xff\xfe"]
    producer = Producer({"bootstrap.servers": bootstrap})
    for i, value in enumerate([b'{"features": [1, 2, 3], "label": 1}', *poison]):
        producer.produce(topic, value, key=f"k{i}".encode(), headers=[("origin", b"test")])
    assert producer.flush(30) == 0
    trainer = start_trainer(topic, task="binary")
    wait_for(
        lambda: offsets_done(LocalSnapshotStore(tmp_path / "snapshots"), topic, {0: 3}), 60, what="processed"
    )
    trainer.stop()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [
            sys.executable,
            "-m",
            "streamlearn",
            "dlq",
            *args,
            "--bootstrap",
            bootstrap,
            "--dlq-topic",
            f"{topic}.dlq",
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    shown = cli("inspect")
    assert shown.returncode == 0, shown.stderr
    assert f"from {topic}[0]@1" in shown.stdout and "reason: bad_json" in shown.stdout
    assert f"from {topic}[0]@2" in shown.stdout and "reason: not_utf8" in shown.stdout
    assert "2 dead letters shown" in shown.stdout

    replayed = cli("replay", "--to", fixed)
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 2 dead letters" in replayed.stdout
    republished = read_topic(bootstrap, fixed)
    assert [m.value() for m in republished] == poison
    assert [m.key() for m in republished] == [b"k1", b"k2"]
    assert all(m.headers() == [("origin", b"test")] for m in republished)  # no error headers
