"""The prediction server: create_app() builds a FastAPI app speaking the KServe V1 data plane.

Snapshots are loaded in the lifespan and then polled for every `reload_interval_s`; liveness
always answers, readiness waits for a first snapshot. Errors become JSON {"error": ...} with a
4xx status, mapped in one place below.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamlearn import __version__
from streamlearn.config import ServeSettings
from streamlearn.errors import (
    BadRequest,
    MalformedBody,
    ModelNotFound,
    ModelNotReady,
    SnapshotStoreUnavailable,
    StreamlearnError,
)
from streamlearn.metrics import ServerMetrics
from streamlearn.registry import ModelRegistry
from streamlearn.snapshots import open_store

log = logging.getLogger(__name__)

Number = Annotated[float, Field(strict=True)]  # ints and floats; never strings or booleans
# The most specific class first: the first match gives the status.
STATUS: dict[type[StreamlearnError], int] = {
    MalformedBody: 400,
    BadRequest: 422,
    ModelNotFound: 404,
    ModelNotReady: 503,
}


class PredictRequest(BaseModel):
    """KServe V1 request: each instance is a feature list or a {name: value} object."""

    instances: list[list[Number] | dict[str, Number]] = Field(min_length=1)


def parse_predict_request(body: bytes) -> PredictRequest:
    """The body as a PredictRequest, whatever its content-type (curl -d sends a form type)."""
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


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
    }
}


class PredictResponse(BaseModel):
    predictions: list[Any]
    probabilities: list[list[float]] | None = None
    model_name: str
    model_version: int


class BodySizeLimit:
    """Answers 413 to a request body over `max_bytes`, declared or streamed, before it is parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"error": f"request body is larger than {self.max_bytes} bytes"}, status_code=413
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


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
    )
    app.state.models = models
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    _register_error_handlers(app)

    @app.middleware("http")
    async def predict_metrics(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if not request.url.path.endswith(":predict"):
            return await call_next(request)
        started = time.perf_counter()
        response = await call_next(request)
        name = request.path_params.get("name") or request.url.path.rsplit("/", 1)[-1].removesuffix(":predict")
        label = name if name in models.names else "_unknown"  # bounded: only served names
        metrics.predict_latency.labels(label).observe(time.perf_counter() - started)
        metrics.predict_requests.labels(label, str(response.status_code)).inc()
        return response

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "No snapshot loaded yet"}})
    async def readyz() -> Response:
        """Readiness: at least one model snapshot is loaded."""
        if not models.ready:
            return JSONResponse({"error": "no snapshot loaded yet", "ready": False}, status_code=503)
        return JSONResponse({"ready": True, "models": models.names})

    @app.get("/metrics", tags=["health"])
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["kserve-v1"])
    async def list_models() -> dict[str, list[str]]:
        """Names of the models being served."""
        return {"models": models.names}

    @app.get("/v1/models/{name}", tags=["kserve-v1"])
    async def model_status(name: str) -> dict[str, Any]:
        """Readiness, version and provenance of one model."""
        return models.get(name).describe()

    @app.post(
        "/v1/models/{name}:predict",
        tags=["kserve-v1"],
        response_model_exclude_none=True,
        openapi_extra=PREDICT_BODY,
    )
    async def predict(name: str, request: Request) -> PredictResponse:
        """Predict with the newest snapshot; classification also returns class probabilities."""
        body = parse_predict_request(await request.body())
        if len(body.instances) > settings.max_instances:
            raise BadRequest(f"too many instances: {len(body.instances)} > {settings.max_instances}")
        served = models.get(name)
        result = served.predict(body.instances)
        metrics.predict_instances.labels(name).inc(len(body.instances))
        return PredictResponse(**result)

    return app


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
        status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 400)
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse({"error": _first_error(exc.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
