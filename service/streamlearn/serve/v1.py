"""The KServe V1 routes: list models, describe one, predict. Each hands its work to the data plane."""

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.routing import Route

from streamlearn.config import MODEL_NAME
from streamlearn.serve.dataplane import DataPlane, PredictRequest
from streamlearn.serve.errors import errors


class _ModelNameConvertor(StringConvertor):
    """{name:model} in a route: a model name, so ':' never falls into it (GET .../x:predict is a 405)."""

    regex = MODEL_NAME


register_url_convertor("model", _ModelNameConvertor())
ModelName = Annotated[str, Path(pattern=f"^{MODEL_NAME}$", examples=["default"])]


class PredictResponse(BaseModel):
    """KServe V1 answer: one prediction per instance (a class name or index, or a value)."""

    predictions: list[str | int | float]
    probabilities: list[list[float]] | None = None
    model_name: str
    model_version: int
    model_age_s: float  # seconds since the snapshot that answered was written
    prediction_ids: list[str] | None = None  # with --prediction-log-topic: each instance's id in the log


class HeldSnapshot(BaseModel):
    """A newer snapshot the promotion gate does not serve, and why."""

    version: int
    reason: str
    candidate_loss: float | None
    served_loss: float | None
    held_for_s: float


class ModelStatus(BaseModel):
    """What GET /v1/models/{name} tells about the served snapshot."""

    name: str
    ready: bool
    version: int
    records_trained: int
    created_at: str
    task: str
    classes: list[str]
    n_features: int  # the numeric ones
    feature_names: list[str]
    categorical_features: list[str] = []  # one string each
    multi_categorical_features: list[str] = []  # a list of strings each
    arch: str
    drift: dict[str, Any] | None
    quantized: str = "none"  # int8: served with --quantize int8
    pinned: int | None = None  # the version an operator pinned, if any
    held: HeldSnapshot | None = None  # a newer snapshot the promotion gate holds back, if any


class ModelVersions(BaseModel):
    """What GET /v1/models/{name}/versions lists."""

    name: str
    served: int  # the version predictions come from
    pinned: int | None = None  # the version an operator pinned, if any
    versions: list[int]  # in the store, oldest first


def _predict_body(max_instances: int) -> dict[str, Any]:
    schema = PredictRequest.model_json_schema()
    schema["properties"]["instances"]["maxItems"] = max_instances
    content = {"schema": schema, "example": {"instances": [[1.0, 2.0, 5.0]]}}
    return {"requestBody": {"required": True, "content": {"application/json": content}}}


def router(dataplane: DataPlane) -> APIRouter:
    """The /v1 routes over one data plane."""
    models = dataplane.models
    v1 = APIRouter(prefix="/v1", tags=["kserve-v1"])

    @v1.get("/models")
    async def list_models() -> dict[str, list[str]]:
        """Names of the models being served."""
        return {"models": models.names}

    @v1.get(
        "/models/{name:model}",
        response_model=ModelStatus,
        responses=errors(
            {
                404: "No model of that name.",
                422: "The name does not match the model name pattern.",
                503: "No snapshot loaded yet, or too many connections.",
            }
        ),
    )
    async def model_status(name: ModelName) -> dict[str, Any]:
        """Readiness, version and provenance of one model."""
        return models.describe(name)

    @v1.get(
        "/models/{name:model}/versions",
        response_model=ModelVersions,
        responses=errors(
            {
                404: "No model of that name.",
                422: "The name does not match the model name pattern.",
                503: "No snapshot loaded yet, the snapshot store is unreachable, or too many connections.",
            }
        ),
    )
    async def model_versions(name: ModelName) -> dict[str, Any]:
        """The versions of one model in the store (the newest --keep-snapshots), and the served one."""
        return await asyncio.to_thread(models.versions, name)

    @v1.post(
        "/models/{name:model}:predict",
        response_model=PredictResponse,
        response_model_exclude_none=True,
        openapi_extra=_predict_body(dataplane.max_instances),
        responses=errors(
            {
                400: "The body is not JSON.",
                404: "No model of that name.",
                415: "The body is declared as something other than JSON, or is compressed.",
                422: "The body is not a request for this model: each error names the instance.",
                503: "No snapshot loaded yet, or too many connections.",
            }
        ),
    )
    async def predict(name: ModelName, request: Request) -> Response:
        """Predict with the newest snapshot; classification also returns class probabilities."""
        return await _predict(dataplane, name, request)

    return v1


def fast_routes(dataplane: DataPlane) -> list[Route]:
    """The predict route without FastAPI's per-request dependency solving (a third of a small
    predict's time): the app puts it before the documented route above, which then only
    describes it. The path's convertor already admits model names only."""

    async def predict(request: Request) -> Response:
        return await _predict(dataplane, request.path_params["name"], request)

    return [Route("/v1/models/{name:model}:predict", predict, methods=["POST"], include_in_schema=False)]


async def _predict(dataplane: DataPlane, name: str, request: Request) -> Response:
    body = await dataplane.run(dataplane.predict_v1, name, request.headers, await request.body())
    return Response(body, media_type="application/json")
