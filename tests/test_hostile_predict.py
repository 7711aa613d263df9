"""Hostile predict bodies: counted before they are validated, a few errors each, off the event loop."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from streamlearn.config import ServeSettings
from streamlearn.errors import BadRequest, MalformedBody
from streamlearn.serve import dataplane
from streamlearn.serve.app import create_app
from streamlearn.serve.dataplane import OFF_LOOP_BYTES, PredictRequest, parse_instances
from streamlearn.snapshots import LocalSnapshotStore

from .conftest import wait_for, write_snapshot
from .test_server import BINARY, trained

WIDE = b"{" + b",".join(b'"k%d":[1]' % i for i in range(300_000)) + b"}"  # 4 MiB: one object


@pytest.mark.parametrize(
    ("body", "refusal", "message"),
    [
        # The body: 419,000 instances msgspec refuses ({"a": [1]}: numbers, not strings).
        (
            b'{"instances":[' + b",".join([b'{"a":[1]}'] * 419_000) + b"]}",
            BadRequest,
            "too many instances: 419000",
        ),
        (
            b'{"instances":[[' + b",".join([b"true"] * 800_000) + b"]]}",
            BadRequest,
            r"got `bool` - at `\$.instances\[0\]",
        ),
        (b'{"instances":[' + WIDE + b"]}", BadRequest, r"got `int` - at `\$.instances\[0\]"),
        (b'{"instances":' + WIDE + b"}", BadRequest, r"got `object` - at `\$.instances`"),
        (b'{"instances":[[1,2,3]],"id":' + WIDE + b"}", BadRequest, r"got `object` - at `\$.id`"),
        (b'{"instances":[' + b",".join([b"[NaN]"] * 600_000) + b"]}", MalformedBody, "not valid JSON"),
    ],
    ids=["many", "long-list", "wide-object", "instances-object", "id-object", "nan"],
)
def test_a_large_refused_body_is_never_validated_by_pydantic(monkeypatch, body, refusal, message):
    """pydantic turns a large refused value into Python objects (seconds, gigabytes): msgspec's
    first error answers a large body instead, and too many instances are counted before it."""

    def validated(body):
        raise AssertionError("pydantic validated a large body")

    monkeypatch.setattr(dataplane, "parse_predict_request", validated)
    assert len(body) > OFF_LOOP_BYTES
    with pytest.raises(refusal, match=message):
        parse_instances(body, 1024)


def test_a_small_refused_body_gets_pydantic_words_counted_first(monkeypatch):
    refused = b'{"instances":[' + b",".join([b'{"a":[1]}'] * 2000) + b"]}"
    assert len(refused) < OFF_LOOP_BYTES
    with pytest.raises(BadRequest, match="too many instances: 2000 > 1024"):
        parse_instances(refused, 1024)
    with pytest.raises(BadRequest, match=r"^instances\.0\.1: Input should be a valid number"):
        parse_instances(b'{"instances":[[1,"2",3]]}', 1024)


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
def test_pydantic_stops_at_the_first_error_of_each_list_and_object(body):
    with pytest.raises(ValidationError) as refused:
        PredictRequest.model_validate_json(body)
    assert refused.value.error_count() <= 8


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
