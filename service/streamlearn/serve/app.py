"""create_app() builds the prediction server: health routes, the KServe V1 and V2 routers, the
admin API (only with a token), and what keeps the models fresh (freshness.py).

Snapshots are loaded in the lifespan, then followed through announcements or polls; liveness
always answers, readiness waits for a first snapshot. Every error is JSON {"error": ...}
(errors.py), and the OpenAPI document lists every status each route can answer.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel

from streamlearn import __version__
from streamlearn.config import ServeSettings
from streamlearn.metrics import ServerMetrics
from streamlearn.predictionlog import PredictionLog
from streamlearn.serve import admin, v1, v2
from streamlearn.serve.dataplane import DataPlane
from streamlearn.serve.errors import ANY_ROUTE, errors, register_error_handlers
from streamlearn.serve.freshness import Freshness
from streamlearn.serve.gate import PromotionGate
from streamlearn.serve.middleware import BodyLimits, LastResort, PredictMetrics
from streamlearn.serve.registry import ModelRegistry
from streamlearn.snapshots import open_store

log = logging.getLogger("streamlearn.serve")

PROMETHEUS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


class Readiness(BaseModel):
    ready: bool
    models: list[str]


def create_app(settings: ServeSettings | None = None, registry: CollectorRegistry | None = None) -> FastAPI:
    """Build the server: one app serves every model found in the snapshot store."""
    settings = settings or ServeSettings()
    metrics = ServerMetrics(registry or CollectorRegistry())
    gate = None if settings.promotion_tolerance is None else PromotionGate(settings.promotion_tolerance)
    models = ModelRegistry(open_store(settings.snapshot_dir), metrics, gate, quantize=settings.quantize)
    freshness = Freshness(settings, models, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await freshness.start()
        yield
        await freshness.stop()
        dataplane.close()
        if prediction_log is not None:
            await asyncio.to_thread(prediction_log.close)

    app = FastAPI(
        title="Streamlearn",
        version=__version__,
        summary="Predictions from the newest snapshot of models learning from Kafka streams (KServe V1).",
        lifespan=lifespan,
        responses=ANY_ROUTE,
    )
    app.state.models = models
    app.state.metrics = metrics
    app.state.freshness = freshness
    # Outermost last: measure predicts, turn any exception into a 500, then bound the body.
    app.add_middleware(
        BodyLimits,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        timeouts=metrics.request_timeouts,
    )
    app.add_middleware(LastResort, metrics=metrics)
    app.add_middleware(PredictMetrics, metrics=metrics, models=models)
    register_error_handlers(app)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "alive"}

    @app.get(
        "/readyz",
        tags=["health"],
        responses={
            200: {"model": Readiness},
            **errors({503: "No snapshot loaded yet, or too many connections."}),
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

    prediction_log = None
    if settings.prediction_log_topic and settings.bootstrap_servers:
        prediction_log = PredictionLog(
            settings.bootstrap_servers,
            settings.kafka,
            settings.prediction_log_topic,
            settings.prediction_log_queue,
            lambda outcome, n: metrics.predictions_logged.labels(outcome).inc(n),
        )
    dataplane = DataPlane(
        models, metrics, settings.max_instances, prediction_log, settings.prediction_log_sample
    )
    app.include_router(v1.router(dataplane))
    app.include_router(v2.router(dataplane))
    # Matched first; the documented routes describe them.
    app.router.routes[:0] = [*v1.fast_routes(dataplane), *v2.fast_routes(dataplane)]
    token = settings.admin_secret
    if token:
        app.include_router(admin.router(models, token, freshness.announce_serving))
    return app
