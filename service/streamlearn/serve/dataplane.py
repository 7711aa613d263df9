"""The data plane: a predict request's body is decoded, predicted by the served model, and encoded.

Routers (v1.py) stay a few lines: they hand the body here and return what comes back. Every
prediction is finite or refused with the instance that caused it.
"""

from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationError

from streamlearn.errors import BadRequest, InvalidRecord, MalformedBody, UnsupportedMediaType
from streamlearn.metrics import ServerMetrics
from streamlearn.models import Prediction
from streamlearn.serve.registry import ModelRegistry, ServedModel

FLOAT32_MAX = float(np.finfo(np.float32).max)
# Ints and floats, never strings or booleans; beyond float32's range is a 422 naming the instance.
Number = Annotated[
    float, Field(strict=True, json_schema_extra={"minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX})
]


# A named feature's value: a number, one category (a string), a list of categories, or null (no
# category); which one each feature takes is the model's feature spec, checked per instance.
Value = (
    Number | Annotated[str, Field(max_length=10_000)] | Annotated[list[str], Field(max_length=1024)] | None
)


class PredictRequest(BaseModel):
    """KServe V1 request: each instance is a feature list or a {name: value} object."""

    instances: list[list[Number] | dict[str, Value]] = Field(min_length=1)


class DataPlane:
    """Decode -> predict -> encode, for any protocol's router."""

    def __init__(self, models: ModelRegistry, metrics: ServerMetrics, max_instances: int) -> None:
        self.models = models
        self.metrics = metrics
        self.max_instances = max_instances

    def predict_v1(self, name: str, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """A KServe V1 predict: the request's body in, the response's body out."""
        require_json(headers)
        request = parse_predict_request(body)
        if len(request.instances) > self.max_instances:
            raise BadRequest(f"too many instances: {len(request.instances)} > {self.max_instances}")
        served = self.models.get(name)  # one model for the whole request, whatever reloads meanwhile
        prediction = predict_finite(served, *features(served, request.instances))
        self.metrics.predict_instances.labels(name).inc(len(request.instances))
        return encode_v1(served, prediction)


def require_json(headers: Mapping[str, str]) -> None:
    """Refuse a body declared as anything but uncompressed JSON; no Content-Type at all is JSON."""
    media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    is_json = media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )
    if media_type and not is_json:
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {media_type[:60]!r}")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:60]!r} is not supported: send plain JSON")


def parse_predict_request(body: bytes) -> PredictRequest:
    """The body as a PredictRequest: 400 if it is not JSON, 422 if it is not a request."""
    try:
        return PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
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
    _refuse_non_finite(x, "a feature does not fit float32 (|x| > 3.4e38)")
    if not spec.category_features:
        return x, None
    return x, torch.tensor(categories, dtype=torch.int64).reshape(len(rows), spec.slots)


def predict_finite(served: ServedModel, x: torch.Tensor, ids: torch.Tensor | None = None) -> Prediction:
    """The model's prediction, refusing an instance wherever a stage overflows float32."""
    model = served.model
    with torch.inference_mode():
        standardized = model.normalizer(x)
        _refuse_non_finite(
            standardized, "a standardized feature overflows float32: far beyond the data learned"
        )
        prediction = model.head.predict(model.scores(standardized, model.embed(ids)))
    # Finite scores give finite probabilities that sum to 1 (sigmoid, or softmax less its max).
    _refuse_non_finite(prediction.scores, "the model's output is not finite for these features")
    return prediction


def encode_v1(served: ServedModel, prediction: Prediction) -> dict[str, Any]:
    """KServe V1's answer: predictions (class names when the model has them), probabilities."""
    response: dict[str, Any] = {"model_name": served.name, "model_version": served.version}
    labels = served.model.spec.labels
    if prediction.probabilities is None:
        response["predictions"] = prediction.values.tolist()
    else:
        indices = prediction.values.tolist()
        response["predictions"] = [labels.classes[i] for i in indices] if labels.classes else indices
        response["probabilities"] = prediction.probabilities.tolist()
    return response


def _refuse_non_finite(values: torch.Tensor, reason: str) -> None:
    """BadRequest naming the first instance (row) with a NaN or an infinity, if any."""
    finite = torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
    if not finite.all():
        index = int((~finite).nonzero()[0])
        raise BadRequest(f"instance {index}: {reason}")
