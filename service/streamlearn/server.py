"""The prediction server: create_app() builds a FastAPI app speaking the KServe V1 data plane.

Snapshots are loaded in the lifespan and then polled for every `reload_interval_s`; liveness
always answers, readiness waits for a first snapshot. Every error is JSON {"error": ...}: the
request-level ones are mapped to a status in one place below, anything unforeseen is a 500,
and the OpenAPI document lists every status each route can answer.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field, ValidationError
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamlearn import __version__
from streamlearn.config import ServeSettings
from streamlearn.connections import BodyLimits
from streamlearn.errors import (
    BadRequest,
    MalformedBody,
    ModelNotFound,
    ModelNotReady,
    SnapshotStoreUnavailable,
    StreamlearnError,
    UnsupportedMediaType,
)
from streamlearn.metrics import ServerMetrics
from streamlearn.registry import ModelRegistry
from streamlearn.snapshots import open_store

log = logging.getLogger(__name__)

# The most specific class first: the first match gives the status; any other error is a 500.
STATUS: dict[type[StreamlearnError], int] = {
    UnsupportedMediaType: 415,
    MalformedBody: 400,
    BadRequest: 422,
    ModelNotFound: 404,
    ModelNotReady: 503,
}
MODEL_NAME = "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"  # as TrainSettings.model_name


class _ModelNameConvertor(StringConvertor):
    """{name:model} in a route: a model name, so ':' never falls into it (GET .../x:predict is a 405)."""

    regex = MODEL_NAME


register_url_convertor("model", _ModelNameConvertor())

FLOAT32_MAX = float(np.finfo(np.float32).max)
# Ints and floats, never strings or booleans; beyond float32's range is a 422 naming the instance.
Number = Annotated[
    float, Field(strict=True, json_schema_extra={"minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX})
]
ModelName = Annotated[str, Path(pattern=f"^{MODEL_NAME}$", examples=["default"])]


class PredictRequest(BaseModel):
    """KServe V1 request: each instance is a feature list or a {name: value} object."""

    instances: list[list[Number] | dict[str, Number]] = Field(min_length=1)


class PredictResponse(BaseModel):
    """KServe V1 answer: one prediction per instance (a class name or index, or a value)."""

    predictions: list[str | int | float]
    probabilities: list[list[float]] | None = None
    model_name: str
    model_version: int


class ModelStatus(BaseModel):
    """What GET /v1/models/{name} tells about the served snapshot."""

    name: str
    ready: bool
    version: int
    records_trained: int
    created_at: str
    task: str
    classes: list[str]
    n_features: int
    feature_names: list[str]
    arch: str
    drift: dict[str, Any] | None


class Readiness(BaseModel):
    ready: bool
    models: list[str]


class ErrorBody(BaseModel):
    """Every error answer: what went wrong, written for the client."""

    error: str


def _errors(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses with the JSON error body, each with what it means."""
    return {code: {"model": ErrorBody, "description": text} for code, text in described.items()}


ANY_ROUTE = _errors(
    {
        408: "The request's headers or body did not arrive in time (--header-timeout-s, --body-timeout-s).",
        413: "The declared or sent body is larger than --max-body-bytes.",
        500: "An unexpected error (logged).",
        503: "Too many open connections (--max-connections); retry shortly.",
    }
)
PROMETHEUS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


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
        raise BadRequest(_first_error(errors)) from None


def _first_error(errors: Any) -> str:
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body" and "[" not in str(part))
    return f"{where or 'body'}: {first['msg']}"


def _predict_body(max_instances: int) -> dict[str, Any]:
    schema = PredictRequest.model_json_schema()
    schema["properties"]["instances"]["maxItems"] = max_instances
    content = {"schema": schema, "example": {"instances": [[1.0, 2.0, 5.0]]}}
    return {"requestBody": {"required": True, "content": {"application/json": content}}}


def create_app(settings: ServeSettings | None = None, registry: CollectorRegistry | None = None) -> FastAPI:
    """Build the server: one app serves every model found in the snapshot directory."""
    settings = settings or ServeSettings()
    metrics = ServerMetrics(registry or CollectorRegistry())
    models = ModelRegistry(open_store(settings.snapshot_dir), metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _refresh(models)
        reloader = asyncio.create_task(_reload_forever(models, settings.reload_interval_s))
        yield
        reloader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reloader

    app = FastAPI(
        title="Streamlearn",
        version=__version__,
        summary="Predictions from the newest snapshot of models learning from Kafka streams (KServe V1).",
        lifespan=lifespan,
        responses=ANY_ROUTE,
    )
    app.state.models = models
    app.state.metrics = metrics
    # Outermost last: measure predicts, turn any exception into a 500, then bound the body.
    app.add_middleware(
        BodyLimits,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        timeouts=metrics.request_timeouts,
    )
    app.add_middleware(LastResort, metrics=metrics)
    app.add_middleware(PredictMetrics, metrics=metrics, models=models)
    _register_error_handlers(app)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "alive"}

    @app.get(
        "/readyz",
        tags=["health"],
        responses={
            200: {"model": Readiness},
            **_errors({503: "No snapshot loaded yet, or too many connections."}),
        },
    )
    async def readyz() -> Response:
        """Readiness: at least one model snapshot is loaded."""
        if not models.ready:
            return JSONResponse({"error": "no snapshot loaded yet", "ready": False}, status_code=503)
        return JSONResponse({"ready": True, "models": models.names})

    @app.get("/metrics", tags=["health"], response_class=Response, responses=PROMETHEUS_TEXT)
    async def prometheus_metrics() -> Response:
        """Prometheus metrics, in its text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["kserve-v1"])
    async def list_models() -> dict[str, list[str]]:
        """Names of the models being served."""
        return {"models": models.names}

    @app.get(
        "/v1/models/{name:model}",
        tags=["kserve-v1"],
        response_model=ModelStatus,
        responses=_errors(
            {
                404: "No model of that name.",
                422: "The name does not match the model name pattern.",
                503: "No snapshot loaded yet, or too many connections.",
            }
        ),
    )
    async def model_status(name: ModelName) -> dict[str, Any]:
        """Readiness, version and provenance of one model."""
        return models.get(name).describe()

    @app.post(
        "/v1/models/{name:model}:predict",
        tags=["kserve-v1"],
        response_model=PredictResponse,
        response_model_exclude_none=True,
        openapi_extra=_predict_body(settings.max_instances),
        responses=_errors(
            {
                400: "The body is not JSON.",
                404: "No model of that name.",
                415: "The body is declared as something other than JSON, or is compressed.",
                422: "The body is not a request for this model: each error names the instance.",
                503: "No snapshot loaded yet, or too many connections.",
            }
        ),
    )
    async def predict(name: ModelName, request: Request) -> dict[str, Any]:
        """Predict with the newest snapshot; classification also returns class probabilities."""
        require_json(request.headers)
        body = parse_predict_request(await request.body())
        if len(body.instances) > settings.max_instances:
            raise BadRequest(f"too many instances: {len(body.instances)} > {settings.max_instances}")
        result = models.get(name).predict(body.instances)
        metrics.predict_instances.labels(name).inc(len(body.instances))
        return result

    return app


class PredictMetrics:
    """Counts and times predict requests by model and status code (none for a client that left)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, models: ModelRegistry) -> None:
        self.app = app
        self.metrics = metrics
        self.models = models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(":predict"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_noting_status)
        if status is None:
            return
        name = scope["path"].rsplit("/", 1)[-1].removesuffix(":predict")
        label = name if name in self.models.names else "_unknown"  # bounded: only served names
        self.metrics.predict_latency.labels(label).observe(time.perf_counter() - started)
        self.metrics.predict_requests.labels(label, str(status)).inc()


class LastResort:
    """Whatever escapes the handlers: a client that left is counted, anything else is a JSON 500.

    Both are logged without flooding: the server's loggers are rate-limited (connections.py).
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except ClientDisconnect:
            self.metrics.client_disconnects.inc()
            log.info("a client disconnected before sending its whole request")
        except Exception:
            log.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            if not started:
                response = JSONResponse({"error": "internal server error"}, status_code=500)
                await response(scope, receive, send)


async def _reload_forever(models: ModelRegistry, interval_s: float) -> None:
    healthy = True
    while True:
        await asyncio.sleep(interval_s)
        healthy = await _refresh(models, quiet=not healthy)


async def _refresh(models: ModelRegistry, quiet: bool = False) -> bool:
    """Look for new snapshots; an outage is logged once, when it starts, and again when it ends."""
    try:
        await asyncio.to_thread(models.refresh)
    except SnapshotStoreUnavailable as exc:  # keep serving the models we have, keep trying
        if not quiet:
            log.warning("%s; serving the loaded models until it is back", exc)
        return False
    except Exception:  # a bad directory state must never stop reloading
        log.exception("snapshot reload failed")
        return True
    if quiet:
        log.info("the snapshot store is reachable again")
    return True


def _register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StreamlearnError)
    async def streamlearn_error(request: Request, exc: StreamlearnError) -> Response:
        status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
        if status == 500:
            log.error("unmapped %s answered 500: %s", type(exc).__name__, exc)
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse({"error": _first_error(exc.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
