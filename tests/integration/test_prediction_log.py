"""The prediction log against a real broker: every served prediction published, keyed by its id,
sampled by a hash of the id, and never a failed request when Kafka is away."""

import urllib.request

import httpx
import orjson
import pytest

from streamlearn.dev.broker import free_port
from streamlearn.predictionlog import sampled

from ..conftest import wait_for
from ..live_server import live_server, write_trained_model
from .conftest import read_topic


def _counter(base: str, outcome: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f'streamlearn_predictions_logged_total{{outcome="{outcome}"}}'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _entries(bootstrap: str, topic: str, count: int) -> dict[str, dict]:
    def read() -> dict[str, dict] | None:
        messages = read_topic(bootstrap, topic)
        found = {m.key().decode(): orjson.loads(m.value()) for m in messages}
        return found if len(messages) >= count else None

    return wait_for(read, 30, 0.2, what=f"{count} logged predictions")


def test_every_served_prediction_is_logged_under_its_id(bootstrap, make_topic, tmp_path):
    topic = make_topic(partitions=2)
    snapshots = tmp_path / "snapshots"
    write_trained_model(snapshots)
    flags = ("--bootstrap-servers", bootstrap, "--prediction-log-topic", topic)
    with live_server(snapshots, tmp_path / "server.log", *flags) as base, httpx.Client(base_url=base) as http:
        by_header = http.post(
            "/v1/models/default:predict", json={"instances": [[1, 2, 3]]}, headers={"x-request-id": "req-1"}
        ).json()
        by_body = http.post(
            "/v1/models/default:predict", json={"id": "batch-7", "instances": [[4, 5, 6]] * 3}
        )
        generated = http.post("/v1/models/default:predict", json={"instances": [[7, 8, 9]]}).json()
        assert by_header["prediction_ids"] == ["req-1"]
        assert by_body.json()["prediction_ids"] == ["batch-7:0", "batch-7:1", "batch-7:2"]
        (uuid,) = generated["prediction_ids"]
        tensor = {"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [2, 4, 6]}
        v2 = http.post("/v2/models/default/infer", json={"id": "v2-req", "inputs": [tensor]}).json()
        assert v2["parameters"]["prediction_ids"] == ["v2-req"]
        entries = _entries(bootstrap, topic, 6)
        wait_for(lambda: _counter(base, "sent") == 6, what="6 deliveries counted")
    assert set(entries) == {"req-1", "batch-7:0", "batch-7:1", "batch-7:2", uuid, "v2-req"}
    assert entries["v2-req"]["features"] == [2.0, 4.0, 6.0]
    assert entries["v2-req"]["prediction"] == v2["outputs"][0]["data"][0]
    first = entries["req-1"]
    assert first["model"] == "default" and first["version"] == by_header["model_version"] == 1
    assert first["features"] == [1.0, 2.0, 3.0] and first["id"] == "req-1" and first["ts"] > 0
    assert first["prediction"] == by_header["predictions"][0]
    assert first["probabilities"] == pytest.approx(by_header["probabilities"][0])
    assert entries[uuid]["features"] == [7.0, 8.0, 9.0]


def test_sampling_keeps_the_ids_whose_hash_falls_below_the_rate(bootstrap, make_topic, tmp_path):
    topic = make_topic()
    snapshots = tmp_path / "snapshots"
    write_trained_model(snapshots)
    flags = (
        "--bootstrap-servers",
        bootstrap,
        "--prediction-log-topic",
        topic,
        "--prediction-log-sample",
        "0.3",
    )
    ids = [f"evt-{i}" for i in range(200)]
    expected = {i for i in ids if sampled(i, 0.3)}
    assert 30 < len(expected) < 90  # the hash spreads them
    with live_server(snapshots, tmp_path / "server.log", *flags) as base, httpx.Client(base_url=base) as http:
        for prediction_id in ids:
            answer = http.post(
                "/v1/models/default:predict", json={"id": prediction_id, "instances": [[1, 2, 3]]}
            )
            assert answer.status_code == 200
        logged = _entries(bootstrap, topic, len(expected))
        wait_for(lambda: _counter(base, "sent") == len(expected), what="the deliveries counted")
    assert set(logged) == expected


def test_with_kafka_away_no_request_fails_and_every_dropped_entry_is_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMLEARN_KAFKA_MESSAGE_TIMEOUT_MS", "1000")  # librdkafka gives up after 1 s
    snapshots = tmp_path / "snapshots"
    write_trained_model(snapshots)
    dead = f"127.0.0.1:{free_port()}"
    flags = ("--bootstrap-servers", dead, "--prediction-log-topic", "predictions")
    with live_server(snapshots, tmp_path / "server.log", *flags) as base, httpx.Client(base_url=base) as http:
        for i in range(50):
            answer = http.post("/v1/models/default:predict", json={"instances": [[i, 2, 3]] * 2})
            assert answer.status_code == 200 and len(answer.json()["prediction_ids"]) == 2
        wait_for(lambda: _counter(base, "dropped") == 100, what="100 dropped entries counted")
        assert _counter(base, "sent") == 0
