"""The KServe V1 server: predictions, errors as JSON 4xx, readiness and hot reload."""

import asyncio
import gzip
import json
import math
import time
from datetime import datetime

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from streamlearn.config import ServeSettings
from streamlearn.dev.broker import free_port
from streamlearn.errors import ConfigError
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import FeatureSpec, LabelSpec
from streamlearn.snapshots import LocalSnapshotStore, open_store
from streamlearn.train.optim import OptimizerSettings, make_optimizer
from streamlearn.train.trainer import Trainer, pick_device

from .conftest import concept_batch, new_bucket, start_s3_server, wait_for, write_snapshot


def trained(spec: ModelSpec, steps: int = 5) -> Trainer:
    model = build_model(spec)
    trainer = Trainer(model, make_optimizer(model, OptimizerSettings("adam", 0.05)), pick_device("cpu"))
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
    from streamlearn.serve.app import create_app

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
    status = client.get("/v1/models/fraud").json()
    written = datetime.fromisoformat(status["created_at"]).timestamp()
    assert 0 <= body["model_age_s"] <= time.time() - written + 0.01  # the answering snapshot's age
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


def test_the_versions_of_a_model_are_listed_with_the_served_one(client, store):
    trainer = trained(REGRESSION)
    for _ in range(3):
        write_snapshot(store, "default", trainer)
    wait_for(lambda: client.get("/v1/models/default").json().get("version") == 3)
    answer = client.get("/v1/models/default/versions")
    assert answer.status_code == 200
    assert answer.json() == {"name": "default", "served": 3, "pinned": None, "versions": [1, 2, 3]}
    missing = client.get("/v1/models/other/versions")
    assert missing.status_code == 404 and "not found" in missing.json()["error"]


def test_a_corrupt_newest_snapshot_is_not_served(client, store, tmp_path_factory):
    write_snapshot(store, "default", trained(REGRESSION), records=1)
    wait_for(lambda: client.get("/readyz").status_code == 200)
    # Version 2 is corrupted before it appears: written to a store beside, then renamed into place.
    beside = LocalSnapshotStore(tmp_path_factory.mktemp("beside"))
    write_snapshot(beside, "default", trained(REGRESSION), records=1)
    bad = write_snapshot(beside, "default", trained(REGRESSION), records=2)
    version = f"{bad.version:012d}"
    (beside.root / "default" / version / "weights.safetensors").write_bytes(b"\x00" * 16)
    (beside.root / "default" / version).rename(store.root / "default" / version)
    write_snapshot(store, "other", trained(REGRESSION))  # a later change the server must notice
    wait_for(lambda: "other" in client.get("/v1/models").json()["models"])
    assert client.get("/v1/models/default").json()["version"] == 1
    metrics = client.get("/metrics").text
    assert 'streamlearn_model_reload_failures_total{model="default"} 1.0' in metrics


def test_a_meta_json_declaring_another_model_size_is_refused_before_the_model_is_built(
    client, store, tmp_path_factory, monkeypatch
):
    from streamlearn.serve import registry

    write_snapshot(store, "default", trained(REGRESSION), records=1)
    wait_for(lambda: client.get("/readyz").status_code == 200)
    built = []
    monkeypatch.setattr(registry, "build_model", lambda spec: built.append(spec) or build_model(spec))
    # Version 2's meta.json is edited to declare a wider model than its weights hold (its
    # checksum covers the weights only), then the version is renamed into place.
    beside = LocalSnapshotStore(tmp_path_factory.mktemp("beside"))
    write_snapshot(beside, "default", trained(REGRESSION), records=1)
    edited = write_snapshot(beside, "default", trained(REGRESSION), records=2)
    version = beside.root / "default" / f"{edited.version:012d}"
    meta = json.loads((version / "meta.json").read_text())
    meta["model"]["args"]["hidden"] = meta["model"]["hidden"] = [4096, 4096]
    (version / "meta.json").write_text(json.dumps(meta))
    version.rename(store.root / "default" / version.name)
    write_snapshot(store, "other", trained(REGRESSION))  # a later change the server must notice
    wait_for(lambda: "other" in client.get("/v1/models").json()["models"])
    assert client.get("/v1/models/default").json()["version"] == 1
    metrics = client.get("/metrics").text
    assert 'streamlearn_model_reload_failures_total{model="default"} 1.0' in metrics
    assert [spec.args["hidden"] for spec in built] == [[8]]  # "other" only: version 2 never built


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


@pytest.fixture
def serving(client, store):
    """The client, once a regression model named default is served."""
    write_snapshot(store, "default", trained(REGRESSION))
    wait_for(lambda: client.get("/readyz").status_code == 200)
    return client


def predict(client, instances):
    return client.post("/v1/models/default:predict", json={"instances": instances})


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencoded",  # what curl -d sends
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=x",
    ],
)
def test_a_body_not_declared_as_json_is_a_415(serving, content_type):
    response = serving.post(
        "/v1/models/default:predict",
        content=b'{"instances": [[1, 2, 3]]}',
        headers={"content-type": content_type},
    )
    assert response.status_code == 415
    assert "must be application/json" in response.json()["error"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "gzip, identity"])
def test_a_compressed_body_is_a_415(serving, encoding):
    body = gzip.compress(b'{"instances": [[1, 2, 3]]}')
    headers = {"content-type": "application/json", "content-encoding": encoding}
    response = serving.post("/v1/models/default:predict", content=body, headers=headers)
    assert response.status_code == 415
    assert "Content-Encoding" in response.json()["error"]


@pytest.mark.parametrize(
    "headers",
    [
        {},  # no Content-Type: taken as JSON
        {"content-type": "application/json; charset=utf-8"},
        {"content-type": "Application/JSON"},
        {"content-type": "application/vnd.kserve+json"},
        {"content-type": "application/json", "content-encoding": "identity"},
    ],
)
def test_json_content_types_are_accepted(serving, headers):
    response = serving.post(
        "/v1/models/default:predict", content=b'{"instances": [[1, 2, 3]]}', headers=headers
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 1


@pytest.mark.parametrize("huge", [1e308, 3.5e38, -1e39, 10**400])
def test_a_feature_beyond_float32_is_a_422_naming_the_instance(serving, huge):
    response = predict(serving, [[1, 2, 3], [1, huge, 3]])
    assert response.status_code == 422
    assert response.json()["error"].startswith("instance 1: ")


def test_a_standardized_overflow_is_a_422_naming_the_instance(client, store):
    trainer = trained(REGRESSION)
    trainer.model.normalizer.m2[0] = 0.0  # a feature that never varied: its std is sqrt(eps) = 1e-4
    write_snapshot(store, "default", trainer)
    wait_for(lambda: client.get("/readyz").status_code == 200)
    assert predict(client, [[1e30, 2, 3]]).status_code == 200
    response = predict(client, [[1, 2, 3], [2, 2, 3], [1e35, 2, 3]])  # 1e35 / 1e-4 overflows float32
    assert response.status_code == 422
    assert response.json()["error"].startswith("instance 2: a standardized feature overflows float32")


@pytest.mark.parametrize("task", ["regression", "binary"])
def test_a_non_finite_output_is_a_422_never_a_null(client, store, task):
    model = build_model(ModelSpec(LabelSpec.create(task), FeatureSpec(3), "linear"))
    with torch.no_grad():
        model.linear.weight.fill_(1e30)  # finite weights, an output beyond float32 for large features
    write_snapshot(
        store,
        "default",
        Trainer(model, make_optimizer(model, OptimizerSettings("sgd", 0.1)), pick_device("cpu")),
    )
    wait_for(lambda: client.get("/readyz").status_code == 200)
    response = predict(client, [[1e-30, 0, 0], [1e10, 1e10, 1e10]])
    assert response.status_code == 422
    assert response.json()["error"] == "instance 1: the model's output is not finite for these features"
    body = predict(client, [[1e-30, 0, 0], [-1e-30, 0, 0]]).json()
    assert all(math.isfinite(value) for value in body["predictions"] if isinstance(value, float))
    for probabilities in body.get("probabilities", []):
        assert sum(probabilities) == pytest.approx(1.0) and all(0 <= p <= 1 for p in probabilities)


@pytest.mark.parametrize("method", ["GET", "OPTIONS", "PUT", "DELETE"])
def test_other_methods_on_predict_are_a_405_allowing_post(serving, method):
    response = serving.request(method, "/v1/models/default:predict")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json() == {"error": "Method Not Allowed"}


@pytest.mark.parametrize("path", ["/v1/models/_x", "/v1/models/" + "a" * 65, "/v1/models/a:b"])
def test_a_name_that_is_no_model_name_is_a_404(serving, path):
    response = serving.get(path)
    assert response.status_code == 404 and "error" in response.json()


def test_an_unmapped_error_is_a_500_and_so_is_any_exception(store, caplog):
    app = create_app_for(ServeSettings(snapshot_dir=store.root))

    @app.get("/unmapped")
    async def unmapped():
        raise ConfigError("a setting nobody mapped to a status")

    @app.get("/broken")
    async def broken():
        raise RuntimeError("a bug")

    with TestClient(app) as client:
        response = client.get("/unmapped")
        assert response.status_code == 500
        assert response.json() == {"error": "a setting nobody mapped to a status"}
        response = client.get("/broken")
        assert response.status_code == 500
        assert response.json() == {"error": "internal server error"}
        assert response.headers["content-type"] == "application/json"
    assert "unexpected error answering GET /broken" in caplog.text


def test_a_body_that_does_not_arrive_in_time_is_a_408(store):
    settings = ServeSettings(snapshot_dir=store.root, body_timeout_s=0.2)
    app = create_app_for(settings)

    async def one_byte_then_nothing():
        yield b"{"
        await asyncio.sleep(30)  # the stalled client: the server must not wait for it

    async def send_slowly():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post(
                "/v1/models/default:predict",
                content=one_byte_then_nothing(),
                headers={"content-type": "application/json"},
            )

    started = time.monotonic()
    response = asyncio.run(asyncio.wait_for(send_slowly(), 10))
    assert response.status_code == 408 and "within 0.2s" in response.json()["error"]
    assert response.headers["connection"] == "close"
    assert time.monotonic() - started < 5
    timeouts = app.state.metrics.registry.get_sample_value
    assert timeouts("streamlearn_request_timeouts_total", {"phase": "body"}) == 1


def test_the_openapi_document_describes_every_answer(client):
    spec = client.get("/openapi.json").json()
    assert client.get("/docs").status_code == 200
    predict_op = spec["paths"]["/v1/models/{name}:predict"]["post"]
    assert set(predict_op["responses"]) == {"200", "400", "404", "408", "413", "415", "422", "500", "503"}
    error = {"$ref": "#/components/schemas/ErrorBody"}
    assert all(
        answer["content"]["application/json"]["schema"] == error
        for code, answer in predict_op["responses"].items()
        if code != "200"
    )
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    name = next(p for p in predict_op["parameters"] if p["name"] == "name")
    assert name["schema"]["pattern"] == "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
    instances = predict_op["requestBody"]["content"]["application/json"]["schema"]["properties"]["instances"]
    assert instances["minItems"] == 1 and instances["maxItems"] == 10
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            assert {"408", "413", "500", "503"} <= set(operation["responses"]), path


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
