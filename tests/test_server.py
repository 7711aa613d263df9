"""The KServe V1 server: predictions, errors as JSON 4xx, readiness and hot reload."""

import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from streamlearn.broker import free_port
from streamlearn.config import ServeSettings
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import FeatureSpec, LabelSpec
from streamlearn.snapshots import LocalSnapshotStore, open_store
from streamlearn.train.trainer import Trainer, make_optimizer, pick_device

from .conftest import concept_batch, new_bucket, start_s3_server, wait_for, write_snapshot


def trained(spec: ModelSpec, steps: int = 5) -> Trainer:
    model = build_model(spec)
    trainer = Trainer(model, make_optimizer("adam", model, 0.05), pick_device("cpu"))
    task = spec.labels.task
    for seed in range(steps):
        trainer.step(concept_batch(64, task, spec.features.n_features, seed=seed))
    return trainer


BINARY = ModelSpec(LabelSpec.create("binary", ("no", "yes")), FeatureSpec(3, ("a", "b", "c")), "linear")
REGRESSION = ModelSpec(LabelSpec.create("regression"), FeatureSpec(3), "mlp", {"hidden": [8]})


@pytest.fixture
def store(tmp_path):
    return LocalSnapshotStore(tmp_path)


@pytest.fixture
def client(store):
    settings = ServeSettings(
        snapshot_dir=store.root, reload_interval_s=0.05, max_instances=10, max_body_bytes=2048
    )
    with TestClient(create_app_for(settings)) as test_client:
        yield test_client


def create_app_for(settings):
    from streamlearn.server import create_app

    return create_app(settings)


def test_liveness_answers_and_readiness_waits_for_a_snapshot(client, store):
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503 and "error" in response.json()
    response = client.post("/v1/models/default:predict", json={"instances": [[1, 2, 3]]})
    assert response.status_code == 503 and "no snapshot" in response.json()["error"]
    write_snapshot(store, "default", trained(REGRESSION), records=320)
    wait_for(lambda: client.get("/readyz").status_code == 200)
    assert client.get("/v1/models").json() == {"models": ["default"]}


def test_classification_returns_class_names_and_probabilities(client, store):
    trainer = trained(BINARY)
    write_snapshot(store, "fraud", trainer, records=320)
    wait_for(lambda: client.get("/readyz").status_code == 200)
    response = client.post(
        "/v1/models/fraud:predict", json={"instances": [[90, 100, 110], {"a": 1, "b": 2, "c": 3}]}
    )
    body = response.json()
    assert response.status_code == 200, body
    assert body["model_name"] == "fraud" and body["model_version"] == 1
    expected = trainer.model.cpu().predict_batch(torch.tensor([[90.0, 100, 110], [1, 2, 3]]))
    assert body["predictions"] == [["no", "yes"][i] for i in expected.values.tolist()]
    np.testing.assert_allclose(body["probabilities"], expected.probabilities.numpy(), atol=1e-6)


def test_model_status_describes_the_served_snapshot(client, store):
    write_snapshot(store, "default", trained(REGRESSION), records=320)
    status = wait_for(
        lambda: client.get("/v1/models/default").json() if client.get("/readyz").status_code == 200 else None
    )
    assert status["name"] == "default" and status["ready"] is True
    assert status["version"] == 1 and status["records_trained"] == 320
    assert status["created_at"].startswith("20")


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"instances": [[1, 2]]}, 422, "expected 3 features, got 2"),
        ({"instances": [[1, "2", 3]]}, 422, "valid number"),
        ({"instances": [[1, True, 3]]}, 422, "valid number"),
        ({"instances": []}, 422, "at least 1"),
        ({"instances": [[1, 2, 3]] * 11}, 422, "too many instances"),
        ({"instances": [{"a": 1}]}, 422, "feature names"),
        ({"rows": [[1, 2, 3]]}, 422, "instances"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_json_error(client, store, body, status, message):
    write_snapshot(store, "default", trained(REGRESSION))
    wait_for(lambda: client.get("/readyz").status_code == 200)
    response = client.post("/v1/models/default:predict", json=body)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_malformed_json_is_a_400(client, store):
    write_snapshot(store, "default", trained(REGRESSION))
    wait_for(lambda: client.get("/readyz").status_code == 200)
    response = client.post(
        "/v1/models/default:predict",
        content=b'{"instances": [[1, 2',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]


def test_a_body_over_the_limit_is_a_413(client, store):
    write_snapshot(store, "default", trained(REGRESSION))
    wait_for(lambda: client.get("/readyz").status_code == 200)
    response = client.post("/v1/models/default:predict", json={"instances": [[1.123456789, 2, 3]] * 200})
    assert response.status_code == 413 and "larger than 2048 bytes" in response.json()["error"]


def test_an_unknown_model_is_a_404(client, store):
    write_snapshot(store, "default", trained(REGRESSION))
    wait_for(lambda: client.get("/readyz").status_code == 200)
    assert client.post("/v1/models/nope:predict", json={"instances": [[1, 2, 3]]}).status_code == 404
    assert client.get("/v1/models/nope").status_code == 404
    assert client.get("/no/such/route").json() == {"error": "Not Found"}


def test_a_new_snapshot_is_served_after_a_reload(client, store):
    trainer = trained(REGRESSION)
    write_snapshot(store, "default", trainer, records=1)
    wait_for(lambda: client.get("/readyz").status_code == 200)
    trainer.step(concept_batch(64, "regression", seed=99))
    write_snapshot(store, "default", trainer, records=2)
    status = wait_for(lambda: (s := client.get("/v1/models/default").json())["version"] == 2 and s)
    assert status["records_trained"] == 2
    prediction = client.post("/v1/models/default:predict", json={"instances": [[1, 2, 3]]}).json()
    assert prediction["model_version"] == 2
    assert prediction["predictions"][0] == pytest.approx(
        trainer.model.predict_batch(torch.tensor([[1.0, 2, 3]])).values.item(), rel=1e-5
    )


def test_a_corrupt_newest_snapshot_is_not_served(client, store):
    write_snapshot(store, "default", trained(REGRESSION), records=1)
    wait_for(lambda: client.get("/readyz").status_code == 200)
    bad = write_snapshot(store, "default", trained(REGRESSION), records=2)
    path = store.root / "default" / f"{bad.version:012d}" / "weights.safetensors"
    path.write_bytes(b"\x00" * 16)
    write_snapshot(store, "other", trained(REGRESSION))  # a later change the server must notice
    wait_for(lambda: "other" in client.get("/v1/models").json()["models"])
    assert client.get("/v1/models/default").json()["version"] == 1
    metrics = client.get("/metrics").text
    assert 'streamlearn_model_reload_failures_total{model="default"} 1.0' in metrics


def test_predict_requests_are_measured(client, store):
    write_snapshot(store, "default", trained(REGRESSION))
    wait_for(lambda: client.get("/readyz").status_code == 200)
    client.post("/v1/models/default:predict", json={"instances": [[1, 2, 3], [4, 5, 6]]})
    client.post("/v1/models/default:predict", json={"instances": [[1, 2]]})
    client.post("/v1/models/whatever:predict", json={"instances": [[1, 2, 3]]})
    registry = client.app.state.metrics.registry
    assert (
        registry.get_sample_value("streamlearn_predict_requests_total", {"model": "default", "code": "200"})
        == 1
    )
    assert (
        registry.get_sample_value("streamlearn_predict_requests_total", {"model": "default", "code": "422"})
        == 1
    )
    assert (
        registry.get_sample_value("streamlearn_predict_requests_total", {"model": "_unknown", "code": "404"})
        == 1
    )
    assert registry.get_sample_value("streamlearn_predict_instances_total", {"model": "default"}) == 2
    assert registry.get_sample_value("streamlearn_predict_latency_seconds_count", {"model": "default"}) == 2
    assert registry.get_sample_value("streamlearn_served_model_version", {"model": "default"}) == 1


def test_openapi_documents_the_predict_route(client):
    spec = client.get("/openapi.json").json()
    assert "/v1/models/{name}:predict" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_a_json_body_is_read_whatever_its_content_type(client, store):
    write_snapshot(store, "default", trained(REGRESSION))
    wait_for(lambda: client.get("/readyz").status_code == 200)
    form_typed = {"content-type": "application/x-www-form-urlencoded"}  # what curl -d sends
    response = client.post(
        "/v1/models/default:predict", content=b'{"instances": [[1, 2, 3]]}', headers=form_typed
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 1


def test_a_store_outage_keeps_the_served_model_and_is_logged_once(s3_endpoint, monkeypatch, caplog):
    server, url = start_s3_server()  # this test's own S3, to take away mid-test
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # fail fast once it is gone
        location = f"s3://{new_bucket()}/snapshots"
        write_snapshot(open_store(location), "default", trained(REGRESSION), records=320)
        settings = ServeSettings(snapshot_dir=location, reload_interval_s=0.05)
        with TestClient(create_app_for(settings)) as client:
            wait_for(lambda: client.get("/readyz").status_code == 200, what="ready")
            server.terminate()
            server.wait(10)
            wait_for(lambda: "serving the loaded models" in caplog.text, what="the outage noticed")
            until = time.monotonic() + 1.0  # some 20 failing polls of the reload loop
            while time.monotonic() < until:  # requests keep being answered throughout
                response = client.post("/v1/models/default:predict", json={"instances": [[1, 2, 3]]})
                assert response.status_code == 200 and response.json()["model_version"] == 1
            assert client.get("/readyz").status_code == 200
        assert caplog.text.count("serving the loaded models") == 1
    finally:
        server.kill()
        server.wait(10)


def test_an_unreachable_snapshot_store_at_start_is_live_but_not_ready(s3_url, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with TestClient(create_app_for(ServeSettings(snapshot_dir=s3_url, reload_interval_s=0.05))) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
