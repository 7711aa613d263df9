"""The Open Inference Protocol (KServe V2) routes: health, server and model metadata, infer.

Each hands its work to the data plane; tensors are decoded and encoded in v2_tensors.py. A version
in the path must be the served one (the newest snapshot): any other is a 404. Health answers
are empty 200s, as the protocol asks; every error is JSON {"error": ...}, with 400 for a request
that does not fit the model (errors.V2_STATUS).
"""

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from starlette.routing import Route

from streamlearn import __version__
from streamlearn.errors import ModelNotReady
from streamlearn.serve import v2_tensors
from streamlearn.serve.dataplane import DataPlane
from streamlearn.serve.errors import errors
from streamlearn.serve.registry import ServedModel
from streamlearn.serve.v1 import MODEL_NAME

Parameters = dict[str, str | float | bool]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]  # -1: any length


class ModelMetadata(BaseModel):
    """One model: the served version, its input and its outputs."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


# The request's models document the body only (v2_tensors decodes it): absent, not null, is optional.
class RequestInput(BaseModel):
    name: str = Field(examples=[v2_tensors.INPUT])
    shape: list[int] = Field(description="[instances, numeric features]")
    datatype: str = Field(examples=["FP32"])
    parameters: Parameters = {}  # binary_data_size: the input's bytes after the JSON
    data: list[float] | list[list[float]] = Field([], description="Row-major; absent for binary data.")


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters = {}  # binary_data: true for bytes after the JSON


class InferenceRequest(BaseModel):
    """An infer request: one input, `features`; the outputs are all of them unless named."""

    id: str | None = None
    parameters: Parameters = {}  # binary_data_output: true for every output as bytes
    inputs: list[RequestInput]
    outputs: list[RequestOutput] = []


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters = {}  # binary_data_size: the output's bytes after the JSON
    data: list[float] = []  # row-major, flattened; absent for binary data


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str = Field("", description="The request's id, if it had one.")
    outputs: list[ResponseOutput]
    parameters: Parameters = Field(
        {},
        description="model_age_s: seconds since the answering snapshot was written; prediction_ids: "
        "each instance's id in the prediction log (with --prediction-log-topic).",
    )


def _inlined(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its $defs inlined: a schema in openapi_extra cannot refer to them."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            return inline(defs[ref.rsplit("/", 1)[-1]]) if ref else {k: inline(v) for k, v in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node

    return dict(inline(schema))


NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": f"^{MODEL_NAME}$"},
    "example": "default",
}
VERSION = {
    "name": "version",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
    "description": "The served snapshot version; any other is a 404.",
    "example": "1",
}


def _path(versioned: bool = False, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """The route's documented path parameters, and its request body if any."""
    parameters = [NAME, VERSION] if versioned else [NAME]
    return {"openapi_extra": {"parameters": parameters, **({"requestBody": body} if body else {})}}


def _infer_body(max_instances: int) -> dict[str, Any]:
    # Only the JSON form is a media type here: a binary body is that JSON followed by bytes, and a
    # fuzzer given application/octet-stream would send little else (answered 415 without the header).
    example = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 5.0]}]}
    return {
        "required": True,
        "description": f"One FP32 input, features [instances, numeric features]: 1 to {max_instances} "
        "instances. With the binary tensor data extension, the body is this JSON (the "
        "Inference-Header-Content-Length header gives its length; Content-Type "
        "application/octet-stream) followed by each input's binary_data_size bytes, little-endian.",
        "content": {"application/json": {"schema": _inlined(InferenceRequest), "example": example}},
    }


INFER_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The outputs; with some as binary data, the Inference-Header-Content-Length "
        "header gives the JSON's length and the outputs' bytes follow it.",
        "model": InferenceResponse,  # as application/json
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **errors(
        {
            400: "The body is not an inference request for this model: shape, datatype, data, outputs, "
            "non-finite features, categorical features (V1 only), or too many instances.",
            404: "No model of that name, or not the served version.",
            415: "The body is declared as neither JSON nor binary tensor data, or is compressed.",
            503: "No snapshot loaded yet, or too many connections.",
        }
    ),
}
MODEL_ANSWERS = errors(
    {
        404: "No model of that name, or not the served version.",
        503: "No snapshot loaded yet, or too many connections.",
    }
)
EMPTY_200: dict[int | str, dict[str, Any]] = {200: {"description": "Yes (an empty body).", "content": {}}}


def router(dataplane: DataPlane) -> APIRouter:
    """The /v2 routes over one data plane."""
    models = dataplane.models
    v2 = APIRouter(prefix="/v2", tags=["open-inference-v2"])

    @v2.get("", response_model=ServerMetadata)
    async def server_metadata() -> dict[str, Any]:
        """The server's name, version and protocol extensions."""
        return {"name": "streamlearn", "version": __version__, "extensions": v2_tensors.EXTENSIONS}

    @v2.get("/health/live", response_class=Response, responses=EMPTY_200)
    async def live() -> Response:
        """Liveness: the process answers."""
        return Response()

    not_ready = errors({503: "No snapshot loaded yet, or too many connections."})

    @v2.get("/health/ready", response_class=Response, responses={**EMPTY_200, **not_ready})
    async def ready() -> Response:
        """Readiness: at least one model snapshot is loaded."""
        if not models.ready:
            raise ModelNotReady("no snapshot loaded yet")
        return Response()

    # Path parameters are documented here, not declared: the {name:model} convertor already admits
    # model names only, so FastAPI has nothing to validate (and no 422 to document).
    @v2.get("/models/{name:model}", response_model=ModelMetadata, responses=MODEL_ANSWERS, **_path())
    async def model_metadata(request: Request) -> dict[str, Any]:
        """The served version of a model, its input and its outputs."""
        return v2_tensors.model_metadata(_served(dataplane, request))

    @v2.get(
        "/models/{name:model}/versions/{version}",
        response_model=ModelMetadata,
        responses=MODEL_ANSWERS,
        **_path(versioned=True),
    )
    async def version_metadata(request: Request) -> dict[str, Any]:
        """As the model's metadata, if `version` is the served one."""
        return v2_tensors.model_metadata(_served(dataplane, request))

    ready_answers = {**EMPTY_200, **MODEL_ANSWERS}

    @v2.get("/models/{name:model}/ready", response_class=Response, responses=ready_answers, **_path())
    async def model_ready(request: Request) -> Response:
        """Readiness of one model."""
        _served(dataplane, request)
        return Response()

    @v2.get(
        "/models/{name:model}/versions/{version}/ready",
        response_class=Response,
        responses=ready_answers,
        **_path(versioned=True),
    )
    async def version_ready(request: Request) -> Response:
        """Readiness of one model, if `version` is the served one."""
        _served(dataplane, request)
        return Response()

    body = _infer_body(dataplane.max_instances)

    @v2.post(
        "/models/{name:model}/infer", response_class=Response, responses=INFER_ANSWERS, **_path(body=body)
    )
    async def infer(request: Request) -> Response:
        """Predict with the served snapshot: JSON tensors or binary tensor data."""
        return await _infer(dataplane, request)

    @v2.post(
        "/models/{name:model}/versions/{version}/infer",
        response_class=Response,
        responses=INFER_ANSWERS,
        **_path(versioned=True, body=body),
    )
    async def version_infer(request: Request) -> Response:
        """As infer, if `version` is the served one."""
        return await _infer(dataplane, request)

    return v2


def fast_routes(dataplane: DataPlane) -> list[Route]:
    """The infer routes without FastAPI's per-request dependency solving, as v1.fast_routes."""

    async def infer(request: Request) -> Response:
        return await _infer(dataplane, request)

    paths = ("/v2/models/{name:model}/infer", "/v2/models/{name:model}/versions/{version}/infer")
    return [Route(path, infer, methods=["POST"], include_in_schema=False) for path in paths]


def _served(dataplane: DataPlane, request: Request) -> ServedModel:
    return dataplane.served(request.path_params["name"], request.path_params.get("version"))


async def _infer(dataplane: DataPlane, request: Request) -> Response:
    name, version = request.path_params["name"], request.path_params.get("version")
    body, header_length = await dataplane.run(
        dataplane.infer_v2, name, version, request.headers, await request.body()
    )
    if header_length is None:
        return Response(body, media_type="application/json")
    headers = {"Inference-Header-Content-Length": str(header_length)}
    return Response(body, media_type="application/octet-stream", headers=headers)
