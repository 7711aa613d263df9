"""Hostile predict bodies: counted before they are validated, a few errors each, off the event loop."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from streamlearn.config import ServeSettings
from streamlearn.errors import BadRequest
from streamlearn.serve import dataplane
from streamlearn.serve.app import create_app
from streamlearn.serve.dataplane import OFF_LOOP_BYTES, PredictRequest, parse_instances
from streamlearn.snapshots import LocalSnapshotStore

from .conftest import wait_for, write_snapshot
from .test_server import BINARY, trained

# The body: 419,000 instances msgspec refuses ({"a": [1]}: a list of numbers, not strings).
REFUSED_MANY = b'{"instances":[' + b",".join([b'{"a":[1]}'] * 419_000) + b"]}"


def test_a_refused_body_is_counted_before_pydantic_validates_it(monkeypatch):
    def validated(body):
        raise AssertionError("pydantic validated a body with too many instances")

    monkeypatch.setattr(dataplane, "parse_predict_request", validated)
    with pytest.raises(BadRequest, match="too many instances: 419000 > 1024"):
        parse_instances(REFUSED_MANY, 1024)


@pytest.mark.parametrize(
    "body",
    [
        b'{"instances":[' + b",".join([b'{"a":[1]}'] * 1000) + b"]}",  # many refused instances
        b'{"instances":[[' + b",".join([b"true"] * 100_000) + b"]]}",  # one long list of non-numbers
        b'{"instances":[{' + b",".join(b'"k%d":[1]' % i for i in range(100_000)) + b"}]}",  # a wide object
        b'{"instances":[{"a":[' + b",".join([b"1"] * 1000) + b"]}]}",  # a category list of numbers
    ],
    ids=["instances", "list", "object", "categories"],
)
def test_a_refused_body_gets_a_few_errors_not_one_per_item(body):
    with pytest.raises(ValidationError) as refused:
        PredictRequest.model_validate_json(body)
    assert refused.value.error_count() <= 8
    with pytest.raises(BadRequest, match=r"^instances\.0"):  # the first, as before
        parse_instances(body, 1024)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/models/default:predict", {"instances": [[1, 2, 3]]}),
        (
            "/v2/models/default/infer",
            {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
        ),
    ],
    ids=["v1", "v2"],
)
def test_a_large_predict_leaves_the_event_loop_answering(tmp_path, monkeypatch, path, body):
    """While a large body's prediction is held, health checks still answer (they waited for it)."""
    store = LocalSnapshotStore(tmp_path)
    write_snapshot(store, "default", trained(BINARY))
    entered, release = threading.Event(), threading.Event()
    predict_finite = dataplane.predict_finite

    def held(*args):
        entered.set()
        release.wait(30)  # a bound for a broken test, not a synchronisation
        return predict_finite(*args)

    monkeypatch.setattr(dataplane, "predict_finite", held)
    large = {**body, "padding": " " * OFF_LOOP_BYTES}  # an ignored field: a body over the bound
    settings = ServeSettings(snapshot_dir=store.root, reload_interval_s=0.05)
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(2) as pool:
        wait_for(lambda: client.get("/readyz").status_code == 200)
        predicted = pool.submit(client.post, path, json=large)
        assert entered.wait(30)
        health = pool.submit(client.get, "/healthz")
        try:
            assert health.result(timeout=10).status_code == 200  # the held predict blocks nothing
            assert not predicted.done()
        finally:
            release.set()
        assert predicted.result(timeout=30).status_code == 200
