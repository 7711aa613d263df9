"""Open Inference Protocol (KServe V2) tensors both ways: an infer body becomes one float32 batch
and the outputs asked for; a prediction becomes the response's body.

A model takes one input, `features`: FP32, shape [instances, numeric features]. Its data comes as
a JSON array (flat or nested, row-major) or, with the binary tensor data extension, as raw
little-endian bytes after the JSON header, whose length the Inference-Header-Content-Length
header gives. Only FP32 is taken: a client sending FP64 or INT32 is told so rather than converted
behind its back. The outputs are `predictions` (FP32 values for regression, INT64 class indices
for classification: the indices of the `probabilities` columns and of the classes GET
/v1/models/{name} lists) and, for classification, `probabilities` (FP32 [instances, classes]).
An output is JSON unless its `binary_data` parameter, or the request's `binary_data_output`,
asks for bytes.
"""

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import orjson

from streamlearn.errors import BadRequest, MalformedBody
from streamlearn.models import Prediction
from streamlearn.records import LabelSpec
from streamlearn.serve.registry import ServedModel

INPUT = "features"
HEADER_LENGTH = "inference-header-content-length"  # as Starlette's headers spell it
EXTENSIONS = ["binary_tensor_data"]


class _Input(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    data: msgspec.Raw = msgspec.Raw()  # decoded once the shape is known to be right
    parameters: dict[str, Any] = {}


class _Output(msgspec.Struct):
    name: str
    parameters: dict[str, Any] = {}


class _Request(msgspec.Struct):
    inputs: list[_Input]
    outputs: list[_Output] = []
    parameters: dict[str, Any] = {}
    id: str | None = None


_REQUEST = msgspec.json.Decoder(_Request)
_FLAT = msgspec.json.Decoder(list[float])  # bools and strings are refused, ints taken
_NESTED = msgspec.json.Decoder(list[list[float]])


@dataclass(frozen=True)
class InferRequest:
    """What an infer request asks: its features as one batch, and which outputs, how."""

    features: np.ndarray  # float32 [instances, n_features]
    outputs: list[tuple[str, bool]]  # (name, as binary data), in the order asked
    id: str | None


def output_tensors(labels: LabelSpec) -> dict[str, tuple[str, list[int]]]:
    """The model's outputs: name -> (datatype, shape), -1 for the instances."""
    if labels.task == "regression":
        return {"predictions": ("FP32", [-1])}
    return {"predictions": ("INT64", [-1]), "probabilities": ("FP32", [-1, len(labels.class_names)])}


def model_metadata(served: ServedModel) -> dict[str, Any]:
    """The V2 model metadata: the served version, the one input and the outputs."""
    spec = served.model.spec
    outputs = output_tensors(spec.labels).items()
    return {
        "name": served.name,
        "versions": [str(served.version)],
        "platform": "pytorch",
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, spec.features.n_features]}],
        "outputs": [{"name": name, "datatype": kind, "shape": shape} for name, (kind, shape) in outputs],
    }


def decode_infer(
    served: ServedModel, headers: Mapping[str, str], body: bytes, max_instances: int
) -> InferRequest:
    """The request in `body` for this model, or BadRequest (MalformedBody if it is not JSON)."""
    features = served.model.spec.features
    if features.category_features:
        raise BadRequest(
            f"model {served.name!r} has categorical features {list(features.category_features)[:4]}: "
            f"V2 takes numeric features only; use POST /v1/models/{served.name}:predict"
        )
    header, binary = _split(headers, body)
    try:
        request = _REQUEST.decode(header)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"not an inference request: {exc}") from None
    except (msgspec.DecodeError, RecursionError):
        raise MalformedBody("request body is not valid JSON") from None
    return InferRequest(
        _features(request.inputs, binary, features.n_features, max_instances),
        _outputs(request, list(output_tensors(served.model.spec.labels))),
        request.id,
    )


def encode_infer(
    served: ServedModel, prediction: Prediction, request: InferRequest, ids: list[str] | None = None
) -> tuple[bytes, int | None]:
    """The response's body, and the length of its JSON header when some outputs follow it as bytes."""
    arrays = {"predictions": prediction.values.contiguous().numpy()}
    if prediction.probabilities is not None:
        arrays["probabilities"] = prediction.probabilities.contiguous().numpy()
    datatypes = output_tensors(served.model.spec.labels)
    outputs, blobs = [], []
    for name, binary in request.outputs:
        datatype = datatypes[name][0]
        array = arrays[name].astype("<f4" if datatype == "FP32" else "<i8", copy=False)
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blobs.append(array.tobytes())
            output["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            output["data"] = array.reshape(-1)  # row-major, flattened
        outputs.append(output)
    response: dict[str, Any] = {
        "model_name": served.name,
        "model_version": str(served.version),
        "outputs": outputs,
    }
    if request.id is not None:
        response["id"] = request.id
    # Seconds since the answering snapshot was written, as V1's model_age_s; and with the
    # prediction log, each instance's id in it, for the client's labels.
    parameters: dict[str, Any] = {
        "model_age_s": round(max(time.time() - served.meta.created_at_ms / 1000, 0.0), 3)
    }
    if ids is not None:
        parameters["prediction_ids"] = ids
    response["parameters"] = parameters
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    return (header + b"".join(blobs), len(header)) if blobs else (header, None)


def _split(headers: Mapping[str, str], body: bytes) -> tuple[bytes, bytes]:
    """The JSON header, and the binary tensor data after it (empty without the extension)."""
    declared = headers.get(HEADER_LENGTH)
    if declared is None:
        return body, b""
    declared = declared.strip()
    if not (declared.isascii() and declared.isdigit()) or int(declared) > len(body):
        raise BadRequest(
            f"Inference-Header-Content-Length {declared[:20]!r} is not a length within the "
            f"body's {len(body)} bytes"
        )
    return body[: int(declared)], body[int(declared) :]


def _features(inputs: list[_Input], binary: bytes, n_features: int, max_instances: int) -> np.ndarray:
    if len(inputs) != 1 or inputs[0].name != INPUT:
        names = [tensor.name[:40] for tensor in inputs[:4]]
        raise BadRequest(f"expected one input named {INPUT!r}, got {names}")
    tensor = inputs[0]
    if tensor.datatype != "FP32":
        raise BadRequest(f"input {INPUT!r} must be FP32, not {tensor.datatype[:20]!r}")
    shape = tensor.shape
    if len(shape) != 2 or shape[1] != n_features:
        raise BadRequest(
            f"input {INPUT!r} has shape {shape[:4]}: this model takes [-1, {n_features}] "
            f"(instances, numeric features)"
        )
    if not 1 <= shape[0] <= max_instances:
        raise BadRequest(f"input {INPUT!r} holds {shape[0]} instances: 1 to {max_instances} are taken")
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if len(tensor.data):
            raise BadRequest(f"input {INPUT!r} has both data and binary_data_size")
        return _from_bytes(size, binary, shape[0], n_features)
    if binary:
        raise BadRequest("binary data follows the JSON header, but no input has binary_data_size")
    return _from_json(tensor.data, shape[0], n_features)


def _from_bytes(size: Any, binary: bytes, n: int, n_features: int) -> np.ndarray:
    expected = n * n_features * 4
    if type(size) is not int or size != expected:
        raise BadRequest(f"binary_data_size is {size!r}: FP32 [{n}, {n_features}] takes {expected} bytes")
    if len(binary) != size:
        raise BadRequest(f"{len(binary)} bytes follow the JSON header; binary_data_size says {size}")
    return np.frombuffer(binary, dtype="<f4").astype(np.float32).reshape(n, n_features)  # a writable copy


def _from_json(data: msgspec.Raw, n: int, n_features: int) -> np.ndarray:
    if not len(data):
        raise BadRequest(f"input {INPUT!r} has neither data nor binary_data_size")
    raw = bytes(data)
    nested = raw.lstrip()[1:].lstrip()[:1] == b"["  # [[...], ...] rather than [...]
    try:
        values = (_NESTED if nested else _FLAT).decode(raw)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"input {INPUT!r} data: {exc}") from None
    try:
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused with the instance
            array = np.asarray(values, dtype=np.float32)
    except ValueError:  # rows of different lengths
        array = np.empty(0, dtype=np.float32)
    if array.size != n * n_features or (nested and array.shape != (n, n_features)):
        raise BadRequest(f"input {INPUT!r} data does not fill its shape [{n}, {n_features}]")
    return array.reshape(n, n_features)


def _outputs(request: _Request, names: list[str]) -> list[tuple[str, bool]]:
    """The outputs asked for (all when none is named), each with whether it goes as binary data."""
    default = _flag(request.parameters, "binary_data_output", False)
    if not request.outputs:
        return [(name, default) for name in names]
    chosen: dict[str, bool] = {}
    for output in request.outputs:
        if output.name not in names or output.name in chosen:
            problem = "asked twice" if output.name in chosen else f"not one of this model's {names}"
            raise BadRequest(f"output {output.name[:40]!r}: {problem}")
        chosen[output.name] = _flag(output.parameters, "binary_data", default)
    return list(chosen.items())


def _flag(parameters: dict[str, Any], name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if type(value) is not bool:
        raise BadRequest(f"parameter {name} must be true or false, not {str(value)[:20]!r}")
    return value
