"""The data plane: a predict request's body is decoded, predicted by the served model, and encoded.

Routers (v1.py, v2.py) stay a few lines: they hand the body here and return what comes back.
Every prediction is finite or refused with the instance that caused it. V2's tensors are
decoded and encoded in v2_tensors.py.

A body is decoded by msgspec into typed instances in one pass in C, and feature lists go
straight into a float32 array; only a small body msgspec refuses goes through pydantic, whose
error names what is wrong, so both paths accept and refuse the same bodies with the same
messages. The answer is encoded by orjson, arrays and all.

A hostile body costs no more than a valid one of its size. Instances are counted (msgspec,
without decoding them) before a large body, or a refused one, is decoded or validated; pydantic
stops at the first error of each list and object, and never sees a large body, whose refused
values its errors would turn into Python objects (seconds for 4 MiB): msgspec's first error
answers it. A body over OFF_LOOP_BYTES is decoded and predicted in one of OFF_LOOP_WORKERS
threads, so the event loop keeps answering health checks and small predicts meanwhile; a small
one stays on the loop, where a hand-off would cost more than the work.
"""

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

import msgspec
import numpy as np
import orjson
import torch
from pydantic import BaseModel, Field, ValidationError

from streamlearn.errors import BadRequest, InvalidRecord, MalformedBody, ModelNotFound, UnsupportedMediaType
from streamlearn.logentry import MAX_ID_CHARS
from streamlearn.metrics import ServerMetrics
from streamlearn.models import Prediction
from streamlearn.predictionlog import PredictionLog, Served, now_ms, prediction_ids, sampled
from streamlearn.serve import v2_tensors
from streamlearn.serve.registry import ModelRegistry, ServedModel

FLOAT32_MAX = float(np.finfo(np.float32).max)
# Ints and floats, never strings or booleans; beyond float32's range is a 422 naming the instance.
Number = Annotated[
    float, Field(strict=True, json_schema_extra={"minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX})
]


# A named feature's value: a number, one category (a string), a list of categories, or null (no
# category); which one each feature takes is the model's feature spec, checked per instance.
# fail_fast: each list and object stops at its first error, so a refused body's errors are a few,
# not one per item (419,000 of them took 3 GB).
Value = (
    Number
    | Annotated[str, Field(max_length=10_000)]
    | Annotated[list[str], Field(max_length=1024, fail_fast=True)]
    | None
)
Instance = Annotated[list[Number], Field(fail_fast=True)] | Annotated[dict[str, Value], Field(fail_fast=True)]


class PredictRequest(BaseModel):
    """KServe V1 request: each instance is a feature list or a {name: value} object."""

    instances: list[Instance] = Field(min_length=1, fail_fast=True)
    id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_ID_CHARS,
        description="The request's id, which keys its predictions in the prediction log (else the "
        "X-Request-Id header, else new UUIDs); with several instances, instance i is <id>:<i>.",
    )


_Text = Annotated[str, msgspec.Meta(max_length=10_000)]  # the bounds of Value, below
_Texts = Annotated[list[str], msgspec.Meta(max_length=1024)]


class _FastRequest(msgspec.Struct):
    """A V1 request as msgspec reads it; other fields are ignored, as pydantic ignores them."""

    instances: list[list[float] | dict[str, float | _Text | _Texts | None]]
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)] | None = None


class _Counted(msgspec.Struct):
    """A V1 request's instances, each left undecoded: how many there are, cheaply."""

    instances: list[msgspec.Raw]


_FAST_REQUEST = msgspec.json.Decoder(_FastRequest)
_COUNTED = msgspec.json.Decoder(_Counted)
_EMPTY = _FastRequest(instances=[])
OFF_LOOP_BYTES = 64 * 1024  # a larger body is decoded and predicted off the event loop
OFF_LOOP_WORKERS = 2  # threads for them: more would only share the same cores
T = TypeVar("T")


class DataPlane:
    """Decode -> predict -> encode, for any protocol's router."""

    def __init__(
        self,
        models: ModelRegistry,
        metrics: ServerMetrics,
        max_instances: int,
        prediction_log: PredictionLog | None = None,
        log_sample: float = 1.0,
    ) -> None:
        self.models = models
        self.metrics = metrics
        self.max_instances = max_instances
        self.prediction_log = prediction_log
        self.log_sample = log_sample
        self._workers = ThreadPoolExecutor(OFF_LOOP_WORKERS, thread_name_prefix="predict")

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """work(*args), whose last argument is the request's body: on the event loop for a small
        body, in a worker thread for one over OFF_LOOP_BYTES."""
        if len(args[-1]) <= OFF_LOOP_BYTES:
            return work(*args)
        return await asyncio.get_running_loop().run_in_executor(self._workers, work, *args)

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)

    def predict_v1(self, name: str, headers: Mapping[str, str], body: bytes) -> bytes:
        """A KServe V1 predict: the request's body in, the response's JSON body out."""
        received_ms = now_ms()
        require_json(headers)
        instances, request_id = parse_instances(body, self.max_instances)
        served = self.models.get(name)  # one model for the whole request, whatever reloads meanwhile
        x, ids = features(served, instances)
        prediction = predict_finite(served, x, ids)
        self.metrics.predict_instances.labels(name).inc(len(instances))
        response = encode_v1(served, prediction)
        if self.prediction_log is not None:
            request_id = request_id or headers.get("x-request-id") or None
            used = x.numpy() if ids is None else instances  # an object has only the model's features
            response["prediction_ids"] = self._log(served, request_id, received_ms, used, response)
        return orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)

    def _log(
        self, served: ServedModel, request_id: str | None, received_ms: int, used: Any, response: dict
    ) -> list[str]:
        """Hand the predictions to the prediction log; their ids, for the client's labels."""
        assert self.prediction_log is not None
        ids = prediction_ids(request_id[:MAX_ID_CHARS] if request_id else None, len(used))
        self.prediction_log.submit(
            Served(
                ids=ids,
                logged=[sampled(i, self.log_sample) for i in ids],
                received_ms=received_ms,
                model=served.name,
                version=served.version,
                features=used,
                predictions=response["predictions"],
                probabilities=response.get("probabilities"),
            )
        )
        return ids

    def infer_v2(
        self, name: str, version: str | None, headers: Mapping[str, str], body: bytes
    ) -> tuple[bytes, int | None]:
        """An Open Inference Protocol (V2) infer: the request's body in; the response's body out,
        with the length of its JSON header when binary tensor data follows it."""
        received_ms = now_ms()
        binary = v2_tensors.HEADER_LENGTH in headers
        require_json(headers, also=("application/octet-stream",) if binary else ())
        served = self.served(name, version)
        request = v2_tensors.decode_infer(served, headers, body, self.max_instances)
        _refuse_non_finite(request.features, "a feature is NaN, infinite or beyond float32 (|x| > 3.4e38)")
        prediction = predict_finite(served, torch.from_numpy(request.features))
        self.metrics.predict_instances.labels(name).inc(len(request.features))
        ids = None
        if self.prediction_log is not None:
            outputs = {"predictions": prediction.values.numpy()}
            if prediction.probabilities is not None:
                outputs["probabilities"] = prediction.probabilities.numpy()
            request_id = request.id or headers.get("x-request-id") or None
            ids = self._log(served, request_id, received_ms, request.features, outputs)
        return v2_tensors.encode_infer(served, prediction, request, ids)

    def served(self, name: str, version: str | None = None) -> ServedModel:
        """The model answering for `name`; a version named in the path must be the served one."""
        served = self.models.get(name)
        if version is not None and version != str(served.version):
            raise ModelNotFound(
                f"model {name!r} version {version[:20]!r} is not served: the served version is "
                f"{served.version}, the newest"
            )
        return served


def require_json(headers: Mapping[str, str], also: tuple[str, ...] = ()) -> None:
    """Refuse a body declared as anything but uncompressed JSON (or a media type in `also`); no
    Content-Type at all is JSON."""
    media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    is_json = media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )
    if media_type and not is_json and media_type not in also:
        expected = " or ".join(("application/json", *also))
        raise UnsupportedMediaType(f"Content-Type must be {expected}, not {media_type[:60]!r}")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:60]!r} is not supported: send plain JSON")


def parse_instances(body: bytes, max_instances: int) -> tuple[list[Any], str | None]:
    """The body's instances and id: 400 if it is not JSON, 422 if it is not a request or holds
    more than `max_instances` instances."""
    large = len(body) > OFF_LOOP_BYTES
    if large:  # counted before any is decoded: a pass over it costs little beside decoding
        _refuse_too_many(_raw_instances(body), max_instances)
    try:
        request: _FastRequest | PredictRequest = _FAST_REQUEST.decode(body)
    except msgspec.ValidationError as exc:
        if large:  # pydantic would turn a large refused value into Python objects: seconds
            raise BadRequest(f"not a predict request: {exc}") from None
        _refuse_too_many(_raw_instances(body), max_instances)
        request = _EMPTY
    except (msgspec.DecodeError, RecursionError):
        if large:
            raise MalformedBody("request body is not valid JSON") from None
        request = _EMPTY
    # An empty list, like any small body msgspec refuses, gets pydantic's word for what is wrong.
    if not request.instances:
        request = parse_predict_request(body)
    _refuse_too_many(request.instances, max_instances)
    return request.instances, request.id


def _raw_instances(body: bytes) -> list[msgspec.Raw] | None:
    """The body's instances, each left undecoded; None if the body holds no list of them."""
    try:
        return _COUNTED.decode(body).instances
    except (msgspec.MsgspecError, RecursionError):
        return None


def _refuse_too_many(instances: list[Any] | None, max_instances: int) -> None:
    if instances is not None and len(instances) > max_instances:
        raise BadRequest(f"too many instances: {len(instances)} > {max_instances}")


def parse_predict_request(body: bytes) -> PredictRequest:
    """The body as a PredictRequest: 400 if it is not JSON, 422 if it is not a request."""
    try:
        return PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False)  # a refused 4 MiB object would become Python's
        if any(error["type"] == "json_invalid" for error in errors):
            raise MalformedBody("request body is not valid JSON") from None
        raise BadRequest(first_error(errors)) from None


def first_error(errors: Any) -> str:
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body" and "[" not in str(part))
    return f"{where or 'body'}: {first['msg']}"


def features(served: ServedModel, instances: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Instances as a float32 batch in the model's feature order, and their categories' hashed
    rows (None for a model without categorical features); 422 naming a bad instance."""
    spec = served.model.spec.features
    if not spec.category_features and all(type(row) is list for row in instances):
        try:  # feature lists of the right length: one array, no per-instance work
            with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
                array = np.asarray(instances, dtype=np.float32)
        except ValueError:  # ragged
            array = None
        if array is not None and array.shape == (len(instances), spec.n_features):
            _refuse_non_finite(array, "a feature does not fit float32 (|x| > 3.4e38)")
            return torch.from_numpy(array), None
    rows, categories = [], []
    for index, instance in enumerate(instances):
        try:
            row, hashed = spec.row(instance)
        except InvalidRecord as exc:
            raise BadRequest(f"instance {index}: {exc.detail}") from None
        rows.append(row)
        categories.append(hashed)
    with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
        x = torch.from_numpy(np.asarray(rows, dtype=np.float32).reshape(len(rows), spec.n_features))
    _refuse_non_finite(x.numpy(), "a feature does not fit float32 (|x| > 3.4e38)")
    if not spec.category_features:
        return x, None
    return x, torch.tensor(categories, dtype=torch.int64).reshape(len(rows), spec.slots)


def predict_finite(served: ServedModel, x: torch.Tensor, ids: torch.Tensor | None = None) -> Prediction:
    """The model's prediction, refusing an instance wherever a stage overflows float32.

    A small batch of numeric features goes through numpy (numpy_forward.py), the rest through torch."""
    overflow = "a standardized feature overflows float32: far beyond the data learned"
    fast = served.fast
    if fast is not None and ids is None and len(x) <= fast.max_rows:
        standardized_array = fast.standardize(x.numpy())
        _refuse_non_finite(standardized_array, overflow)
        prediction = fast.predict(standardized_array)
    else:
        model = served.model
        with torch.inference_mode():
            standardized = model.normalizer.standardize(x)
            _refuse_non_finite(standardized.numpy(), overflow)
            bounded = model.normalizer.bound(standardized)  # as training clips it
            prediction = model.head.predict(model.scores(bounded, model.embed(ids)))
    # Finite scores give finite probabilities that sum to 1 (sigmoid, or softmax less its max).
    _refuse_non_finite(prediction.scores.numpy(), "the model's output is not finite for these features")
    return prediction


def encode_v1(served: ServedModel, prediction: Prediction) -> dict[str, Any]:
    """KServe V1's answer: predictions (class names when the model has them), probabilities."""
    response: dict[str, Any] = {
        "model_name": served.name,
        "model_version": served.version,
        "model_age_s": round(max(time.time() - served.meta.created_at_ms / 1000, 0.0), 3),
    }
    labels = served.model.spec.labels
    if prediction.probabilities is None:
        response["predictions"] = prediction.values.contiguous().numpy()
    else:
        indices = prediction.values.contiguous().numpy()
        response["predictions"] = [labels.classes[i] for i in indices.tolist()] if labels.classes else indices
        response["probabilities"] = prediction.probabilities.contiguous().numpy()
    return response


def _refuse_non_finite(values: np.ndarray, reason: str) -> None:
    """BadRequest naming the first instance (row) with a NaN or an infinity, if any.

    numpy checks the common case, all finite, in microseconds (a torch op costs 10-20 µs to
    dispatch, and a predict runs three of these checks)."""
    array = values.reshape(len(values), -1)
    if np.isfinite(array).all():
        return
    index = int(np.nonzero(~np.isfinite(array).all(axis=1))[0][0])
    raise BadRequest(f"instance {index}: {reason}")
