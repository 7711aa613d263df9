"""Produce -> train -> snapshot -> predict, through a real broker."""

import itertools

import numpy as np
import orjson
from fastapi.testclient import TestClient

from streamlearn.config import ServeSettings
from streamlearn.dev.streams import records
from streamlearn.errors import InvalidReason
from streamlearn.serve.app import create_app
from streamlearn.snapshots import LocalSnapshotStore, SnapshotStore

from ..conftest import wait_for
from .conftest import committed, publish


def sea_values(n: int, seed: int) -> list[dict]:
    return list(itertools.islice(records("sea", seed=seed, drift_every=0), n))


def latest(store: SnapshotStore, model: str = "default"):
    return store.load_latest(model)


def test_a_concept_streamed_through_kafka_is_learned_and_served(
    bootstrap, make_topic, start_trainer, tmp_path
):
    topic = make_topic()
    train = sea_values(8000, seed=1)
    publish(bootstrap, topic, [orjson.dumps(r) for r in train])
    trainer = start_trainer(topic, task="binary", arch="mlp")
    store = LocalSnapshotStore(tmp_path / "snapshots")
    wait_for(lambda: (s := latest(store)) and s.meta.records_trained == 8000, 60, what="all records learned")

    held_out = sea_values(1000, seed=2)
    with TestClient(create_app(ServeSettings(snapshot_dir=store.root))) as client:
        response = client.post(
            "/v1/models/default:predict", json={"instances": [r["features"] for r in held_out]}
        )
        status = client.get("/v1/models/default").json()
    assert response.status_code == 200, response.text
    accuracy = np.mean(
        np.array(response.json()["predictions"]) == np.array([int(r["label"]) for r in held_out])
    )
    assert accuracy > 0.93, f"held-out accuracy {accuracy:.3f} is below the 0.93 bar"
    assert status["records_trained"] == 8000
    assert trainer.metric("streamlearn_prequential_accuracy_ratio", {"window": "1000"}) > 0.9
    assert trainer.metric("streamlearn_records_trained_total") == 8000


def test_invalid_records_are_counted_by_reason_and_never_learned(
    bootstrap, make_topic, start_trainer, tmp_path
):
    topic = make_topic()
    valid = [orjson.dumps(r) for r in sea_values(300, seed=3)]
    invalid = {
        InvalidReason.BAD_JSON: b'{"features": [1, 2',
        InvalidReason.NOT_UTF8: b"\xff\xfe",
        InvalidReason.WRONG_LENGTH: b'{"features": [1, 2], "label": 1}',
        InvalidReason.NON_FINITE: b'{"features": [1, NaN, 2], "label": 1}',
        InvalidReason.MISSING_LABEL: b'{"features": [1, 2, 3]}',
        InvalidReason.UNKNOWN_CLASS: b'{"features": [1, 2, 3], "label": 7}',
        InvalidReason.EMPTY: None,
    }
    values = valid[:100] + list(invalid.values()) + valid[100:]
    publish(bootstrap, topic, values)
    trainer = start_trainer(topic, task="binary", n_features=3)
    store = LocalSnapshotStore(tmp_path / "snapshots")
    snapshot = wait_for(
        lambda: (s := latest(store)) and s.meta.offsets.get(topic, {}).get(0) == len(values) and s,
        60,
        what="every offset processed",
    )
    assert snapshot.meta.records_trained == 300
    for reason in invalid:
        assert trainer.metric("streamlearn_records_invalid_total", {"reason": reason.value}) == 1, reason
    assert trainer.metric("streamlearn_records_consumed_total") == len(values)


def test_offsets_are_committed_once_the_snapshot_holding_them_is_written(
    bootstrap, make_topic, start_trainer, tmp_path
):
    topic = make_topic(partitions=3)
    for partition in range(3):
        publish(
            bootstrap,
            topic,
            [orjson.dumps(r) for r in sea_values(100 * (partition + 1), seed=partition)],
            partition,
        )
    trainer = start_trainer(topic, task="binary")
    store = LocalSnapshotStore(tmp_path / "snapshots")
    snapshot = wait_for(
        lambda: (s := latest(store)) and s.meta.records_trained == 600 and s,
        60,
        what="600 records learned",
    )
    assert snapshot.meta.offsets[topic] == {0: 100, 1: 200, 2: 300}
    wait_for(lambda: committed(bootstrap, f"group-{topic}", topic, 3) == [100, 200, 300], 30, what="commits")
    wait_for(
        lambda: (
            all(
                trainer.metric("streamlearn_consumer_lag_records", {"partition": str(p)}) == 0
                for p in range(3)
            )
            and trainer.metric("streamlearn_snapshot_version") >= 1
        ),
        30,
        what="zero lag",
    )


def test_a_restarted_trainer_resumes_where_its_snapshot_ends(bootstrap, make_topic, start_trainer, tmp_path):
    topic = make_topic()
    publish(bootstrap, topic, [orjson.dumps(r) for r in sea_values(500, seed=4)])
    first = start_trainer(topic, task="binary")
    store = LocalSnapshotStore(tmp_path / "snapshots")
    wait_for(lambda: (s := latest(store)) and s.meta.records_trained == 500, 60, what="first 500")
    first.stop()
    version = latest(store).version
    publish(bootstrap, topic, [orjson.dumps(r) for r in sea_values(700, seed=5)])
    second = start_trainer(topic, task="binary")
    wait_for(lambda: (s := latest(store)) and s.meta.records_trained >= 1200, 60, what="1200 records")
    second.stop()
    final = latest(store)
    assert final.meta.records_trained == 1200 and final.version > version
    assert final.meta.training["prequential"]["records"] == 1200
    assert committed(bootstrap, f"group-{topic}", topic) == [1200]


def test_a_snapshot_of_another_task_is_refused_with_a_clear_error(
    bootstrap, make_topic, start_trainer, tmp_path
):
    import pytest

    from streamlearn.errors import SnapshotMismatch

    topic = make_topic()
    publish(bootstrap, topic, [orjson.dumps(r) for r in sea_values(50, seed=6)])
    first = start_trainer(topic, task="binary")
    wait_for(lambda: latest(LocalSnapshotStore(tmp_path / "snapshots")), 60, what="a snapshot")
    first.stop()
    with pytest.raises(SnapshotMismatch, match="use another --model-name"):
        start_trainer(topic, task="regression")


def test_a_trainer_resumed_with_nothing_left_to_fetch_reports_zero_lag(
    bootstrap, make_topic, start_trainer, tmp_path
):
    topic = make_topic()
    publish(bootstrap, topic, [orjson.dumps(r) for r in sea_values(200, seed=5)])
    first = start_trainer(topic, task="binary")
    store = LocalSnapshotStore(tmp_path / "snapshots")
    wait_for(lambda: (s := latest(store)) and s.meta.records_trained == 200, 60, what="all learned")
    first.stop()

    # librdkafka has no position for a partition until it fetches a message; this one has none
    # left, and its lag must still read 0 (dashboards and `caught up` checks rely on it).
    resumed = start_trainer(topic, task="binary")
    lag = {"partition": "0"}
    wait_for(
        lambda: resumed.registry.get_sample_value("streamlearn_consumer_lag_records", lag) == 0,
        60,
        what="a lag of 0 for the resumed partition",
    )
    assert resumed.metric("streamlearn_records_consumed_total") == 0
