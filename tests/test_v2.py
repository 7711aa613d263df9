"""The Open Inference Protocol (KServe V2) routes, spoken to by the official client, tritonclient."""

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from streamlearn.config import ServeSettings
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import FeatureSpec, LabelSpec
from streamlearn.serve.app import create_app
from streamlearn.snapshots import LocalSnapshotStore
from streamlearn.train.optim import OptimizerSettings, make_optimizer
from streamlearn.train.trainer import Trainer, pick_device

from .conftest import concept_batch, write_snapshot
from .live_server import live_server

MAX_INSTANCES = 8
MODELS = {
    "default": ModelSpec(LabelSpec.create("binary", ("no", "yes")), FeatureSpec(3), "linear"),
    "mae": ModelSpec(LabelSpec.create("regression"), FeatureSpec(3), "mlp", {"hidden": [8]}),
    "colors": ModelSpec(LabelSpec.create("multiclass", num_classes=3), FeatureSpec(3), "linear"),
}
CATEGORICAL = ModelSpec(LabelSpec.create("binary"), FeatureSpec(3, categorical=("city",)), "linear")
ROWS = np.array([[90, 100, 110], [1, 2, 3], [100.5, 99.25, 101], [-4, 0, 7e3]], dtype=np.float32)


def trainer_for(spec: ModelSpec, steps: int = 3) -> Trainer:
    model = build_model(spec)
    trainer = Trainer(model, make_optimizer(model, OptimizerSettings("adam", 0.05)), pick_device("cpu"))
    for seed in range(steps):
        trainer.step(concept_batch(64, spec.labels.task, spec.features.n_features, seed=seed))
    return trainer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One live server for the module: a binary, a regression and a multiclass model, and one
    with a categorical feature."""
    root = tmp_path_factory.mktemp("v2")
    store = LocalSnapshotStore(root / "snapshots")
    for name, spec in MODELS.items():
        write_snapshot(store, name, trainer_for(spec), records=192)
    write_snapshot(store, "cities", trainer_for(CATEGORICAL, steps=0))
    flags = ("--max-instances", str(MAX_INSTANCES))
    with live_server(root / "snapshots", root / "server.log", *flags) as base:
        yield base


@pytest.fixture
def client(server):
    with triton.InferenceServerClient(server.removeprefix("http://")) as client:
        yield client


def infer(client, x, model="default", binary_in=True, binary_out=True, outputs=None, **kw):
    tensor = triton.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary_in)
    asked = [triton.InferRequestedOutput(name, binary_data=binary_out) for name in outputs or ()]
    return client.infer(model, [tensor], outputs=asked or None, **kw)


def refusal(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_server_metadata_lists_the_binary_tensor_data_extension(client):
    metadata = client.get_server_metadata()
    assert metadata["name"] == "streamlearn" and metadata["version"]
    assert "binary_tensor_data" in metadata["extensions"]


def test_liveness_and_readiness_of_the_server_and_each_model(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("default") and client.is_model_ready("default", "1")
    assert not client.is_model_ready("default", "2") and not client.is_model_ready("nope")
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/mae/ready"):
        response = httpx.get(server + path)
        assert response.status_code == 200 and response.content == b""  # as the protocol asks
    missing = httpx.get(server + "/v2/models/mae/versions/7/ready")
    assert missing.status_code == 404 and "served version is 1" in missing.json()["error"]


def test_readiness_waits_for_a_snapshot(tmp_path):
    with TestClient(create_app(ServeSettings(snapshot_dir=tmp_path))) as http:
        assert http.get("/v2/health/live").status_code == 200
        for path in ("/v2/health/ready", "/v2/models/default/ready", "/v2/models/default"):
            response = http.get(path)
            assert response.status_code == 503 and "no snapshot" in response.json()["error"]


@pytest.mark.parametrize(
    ("name", "outputs"),
    [
        ("default", {"predictions": ("INT64", [-1]), "probabilities": ("FP32", [-1, 2])}),
        ("mae", {"predictions": ("FP32", [-1])}),
        ("colors", {"predictions": ("INT64", [-1]), "probabilities": ("FP32", [-1, 3])}),
    ],
)
def test_model_metadata_describes_the_input_and_outputs(client, name, outputs):
    for metadata in (client.get_model_metadata(name), client.get_model_metadata(name, "1")):
        assert metadata["name"] == name and metadata["versions"] == ["1"]
        assert metadata["platform"] == "pytorch"
        assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 3]}]
        assert {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]} == outputs


@pytest.mark.parametrize("name", list(MODELS))
def test_binary_and_json_tensors_give_v1s_answers(client, server, name):
    binary = infer(client, ROWS, name)  # tritonclient's default: binary inputs and outputs
    assert binary.get_response()["model_version"] == "1"
    assert all("binary_data_size" in out["parameters"] for out in binary.get_response()["outputs"])
    names = [out["name"] for out in binary.get_response()["outputs"]]
    as_json = infer(client, ROWS, name, binary_in=False, binary_out=False, outputs=names)
    assert all("data" in out for out in as_json.get_response()["outputs"])
    v1 = httpx.post(f"{server}/v1/models/{name}:predict", json={"instances": ROWS.tolist()}).json()
    mixed = infer(client, ROWS, name, binary_in=True, binary_out=False, outputs=names[::-1])
    assert [out["name"] for out in mixed.get_response()["outputs"]] == names[::-1]  # as asked
    predictions = binary.as_numpy("predictions")
    np.testing.assert_array_equal(predictions, as_json.as_numpy("predictions"))
    np.testing.assert_array_equal(predictions, mixed.as_numpy("predictions"))
    if name == "mae":
        assert predictions.dtype == np.float32 and predictions.shape == (len(ROWS),)
        np.testing.assert_array_equal(predictions, np.float32(v1["predictions"]))
        return
    classes = httpx.get(f"{server}/v1/models/{name}").json()["classes"]
    named = [classes[i] for i in predictions] if MODELS[name].labels.classes else predictions.tolist()
    assert predictions.dtype == np.int64 and named == v1["predictions"]  # V1 names classes it has names for
    probabilities = binary.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(ROWS), len(classes))
    np.testing.assert_array_equal(probabilities, as_json.as_numpy("probabilities"))
    np.testing.assert_array_equal(probabilities, np.float32(v1["probabilities"]))


def test_a_plain_json_request_gets_a_plain_json_answer(server):
    body = {
        "id": "42",
        "inputs": [{"name": "features", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6]]}],
        "outputs": [{"name": "probabilities"}],
    }
    response = httpx.post(f"{server}/v2/models/default/versions/1/infer", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in response.headers
    answer = response.json()
    assert answer["id"] == "42" and answer["model_name"] == "default" and answer["model_version"] == "1"
    assert 0 <= answer["parameters"]["model_age_s"] < 600  # the snapshot was written by this module
    assert "prediction_ids" not in answer["parameters"]  # no prediction log here
    [output] = answer["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32" and output["shape"] == [2, 2]
    assert len(output["data"]) == 4


def test_binary_outputs_follow_the_json_header(client, server):
    result = infer(client, ROWS[:2], outputs=["predictions", "probabilities"], request_id="7")
    response = result.get_response()
    assert response["id"] == "7" and [out["name"] for out in response["outputs"]] == [
        "predictions",
        "probabilities",
    ]
    assert [out["parameters"]["binary_data_size"] for out in response["outputs"]] == [2 * 8, 2 * 2 * 4]
    tensor = triton.InferInput("features", [2, 3], "FP32")
    tensor.set_data_from_numpy(ROWS[:2])
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor])
    raw = httpx.post(
        f"{server}/v2/models/default/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(header_length)},
    )
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/octet-stream"
    assert int(raw.headers["inference-header-content-length"]) == len(raw.content) - (16 + 16)


@pytest.mark.parametrize(
    ("x", "datatype", "message"),
    [
        (ROWS[:, :2], "FP32", "has shape [4, 2]: this model takes [-1, 3]"),
        (ROWS.reshape(-1), "FP32", "has shape [12]"),
        (ROWS.astype(np.int32), "INT32", "must be FP32, not 'INT32'"),
        (ROWS.astype(np.float64), "FP64", "must be FP32, not 'FP64'"),
        (np.ones((MAX_INSTANCES + 1, 3), np.float32), "FP32", f"1 to {MAX_INSTANCES} are taken"),
        (np.array([[1, 2, 3], [1, np.nan, 3]], np.float32), "FP32", "instance 1: a feature is NaN"),
        (np.array([[1, 2, 3], [np.inf, 2, 3]], np.float32), "FP32", "instance 1: a feature is NaN"),
    ],
)
@pytest.mark.parametrize("binary", [True, False])
def test_bad_tensors_are_a_400_with_a_json_error(client, x, datatype, message, binary):
    if not binary and not np.isfinite(x).all():
        return  # JSON has no NaN or infinity: the client cannot send them as JSON
    tensor = triton.InferInput("features", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    error = refusal(lambda: client.infer("default", [tensor]))
    assert error.status() == "400" and message in error.message()


def v2_body(data: str = "[1, 2, 3]", shape: str = "[1, 3]", name: str = "features", rest: str = "") -> bytes:
    """An infer request's JSON, written out: its parts may be anything."""
    tensor = f'{{"name": "{name}", "shape": {shape}, "datatype": "FP32", "data": {data}}}'
    return f'{{"inputs": [{tensor}]{rest}}}'.encode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"inputs": [', "not valid JSON"),
        (b'{"inputs": []}', "expected one input named 'features', got []"),
        (v2_body(name="x"), "got ['x']"),
        (b'{"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32"}]}', "neither data nor"),
        (v2_body("[1, 2]"), "does not fill its shape [1, 3]"),
        (v2_body("[[1, 2, 3], [1]]", "[2, 3]"), "does not fill its shape [2, 3]"),
        (v2_body("[[1, 2, 3, 4]]", "[1, 3]"), "does not fill its shape [1, 3]"),
        (v2_body("[1, true, 3]"), "Expected `float`, got `bool`"),
        (v2_body('[1, "2", 3]'), "Expected `float`, got `str`"),
        (v2_body("[1, 2, 1e39]"), "instance 0: a feature is NaN, infinite or beyond float32"),
        (v2_body(shape='"1x3"'), "Expected `array`, got `str`"),
        (v2_body(shape="[0, 3]"), "holds 0 instances"),
        (v2_body(rest=', "outputs": [{"name": "scores"}]'), "not one of this model's"),
        (v2_body(rest=', "parameters": {"binary_data_output": "yes"}'), "must be true or false"),
    ],
)
def test_bad_json_requests_are_a_400_with_a_json_error(server, body, message):
    response = httpx.post(f"{server}/v2/models/default/infer", content=body)
    assert response.status_code == 400 and message in response.json()["error"], response.text


BINARY_INPUT = (
    '{"name": "features", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}'
)
JSON_INPUT = '{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}'
TWELVE_BYTES = np.float32([1, 2, 3]).tobytes()


@pytest.mark.parametrize(
    ("header", "tensor", "tail", "message"),
    [
        ("x", BINARY_INPUT, TWELVE_BYTES, "Inference-Header-Content-Length 'x' is not a length"),
        ("100000", BINARY_INPUT, TWELVE_BYTES, "is not a length within the body's"),
        (None, BINARY_INPUT, TWELVE_BYTES[:8], "8 bytes follow the JSON header; binary_data_size says 12"),
        (None, BINARY_INPUT.replace("12", "8"), TWELVE_BYTES[:8], "FP32 [1, 3] takes 12 bytes"),
        (None, BINARY_INPUT.replace("12", '"12"'), TWELVE_BYTES, "binary_data_size is '12'"),
        (None, BINARY_INPUT.replace("}}", '}, "data": [1, 2, 3]}'), TWELVE_BYTES, "both data and binary"),
        (None, JSON_INPUT, TWELVE_BYTES, "no input has binary_data_size"),
    ],
)
def test_bad_binary_requests_are_a_400_with_a_json_error(server, header, tensor, tail, message):
    request = f'{{"inputs": [{tensor}]}}'.encode()
    headers = {"content-type": "application/octet-stream"}
    headers["Inference-Header-Content-Length"] = header or str(len(request))
    response = httpx.post(f"{server}/v2/models/default/infer", content=request + tail, headers=headers)
    assert response.status_code == 400 and message in response.json()["error"], response.text


def test_a_model_with_categorical_features_is_for_v1_only(client):
    error = refusal(lambda: infer(client, ROWS, "cities"))
    assert error.status() == "400" and "V2 takes numeric features only" in error.message()


def test_an_unknown_model_or_version_is_a_404(client, server):
    error = refusal(lambda: infer(client, ROWS, "nope"))
    assert error.status() == "404" and "not found" in error.message()
    error = refusal(lambda: infer(client, ROWS, model_version="2"))
    assert error.status() == "404" and "version '2' is not served" in error.message()
    assert infer(client, ROWS, model_version="1").get_response()["model_version"] == "1"
    error = refusal(lambda: client.get_model_metadata("default", "0"))
    assert error.status() == "404"
    assert httpx.get(f"{server}/v2/models/a:b").status_code == 404  # no model name at all


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_body_declared_as_something_else_is_a_415(server, content_type):
    body = b'{"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}'
    response = httpx.post(
        f"{server}/v2/models/default/infer", content=body, headers={"content-type": content_type}
    )
    assert response.status_code == 415 and "application/json" in response.json()["error"]


def test_infer_requests_are_measured_like_predicts(client, server):
    def count(model: str, code: str) -> float:
        families = text_string_to_metric_families(httpx.get(f"{server}/metrics").text)
        requests = next(family for family in families if family.name == "streamlearn_predict_requests")
        labels = {"model": model, "code": code}
        return sum(sample.value for sample in requests.samples if sample.labels == labels)

    before = (count("mae", "200"), count("mae", "400"), count("_unknown", "404"))
    infer(client, ROWS, "mae")
    infer(client, ROWS, "mae", model_version="1")
    refusal(lambda: infer(client, ROWS[:, :2], "mae"))
    refusal(lambda: infer(client, ROWS, "nope"))
    after = (count("mae", "200"), count("mae", "400"), count("_unknown", "404"))
    assert np.subtract(after, before).tolist() == [2, 1, 1]
