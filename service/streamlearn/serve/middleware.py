"""The server's ASGI middleware: body limits, predict metrics, a JSON 500 of last resort, quiet logs."""

import asyncio
import logging
import time

from prometheus_client import Counter
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamlearn.logfilter import RateLimitFilter
from streamlearn.metrics import ServerMetrics
from streamlearn.serve.registry import ModelRegistry

log = logging.getLogger("streamlearn.serve")

# The loggers that may speak once per request or connection: each message at most once per interval.
NOISY_LOGGERS = (
    "uvicorn.error",
    "asyncio",
    "streamlearn.serve",
    "streamlearn.predictionlog",
)  # and librdkafka's lines, which kafka.py limits in every process


def rate_limit_logs(interval_s: float = 5.0) -> RateLimitFilter:
    """Install one RateLimitFilter on the loggers that speak once per request or connection."""
    limiter = RateLimitFilter(interval_s)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).addFilter(limiter)
    return limiter


class BodyLimits:
    """Answers 413 to a body over `max_bytes` and 408 to one incomplete `timeout_s` after its headers."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, timeouts: Counter) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.timeouts = timeouts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._answer(
                scope, receive, send, 413, f"request body is larger than {self.max_bytes} bytes"
            )
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        seen, complete = 0, False

        async def limited_receive() -> Message:
            nonlocal seen, complete
            if complete:  # later calls wait for a disconnect: no deadline then
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _TooSlow from None
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._answer(
                scope, receive, send, 413, f"request body is larger than {self.max_bytes} bytes"
            )
        except _TooSlow:
            self.timeouts.labels("body").inc()
            log.warning("answered 408: a request body took over %gs", self.timeout_s)
            await self._answer(
                scope, receive, send, 408, f"request body not received within {self.timeout_s:g}s"
            )

    @staticmethod
    async def _answer(scope: Scope, receive: Receive, send: Send, status: int, error: str) -> None:
        # The rest of the body is never read, so the connection cannot carry another request.
        response = JSONResponse({"error": error}, status_code=status, headers={"connection": "close"})
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


class PredictMetrics:
    """Counts and times predict requests (V1 :predict, V2 /infer) by model and status code (none for a
    client that left)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, models: ModelRegistry) -> None:
        self.app = app
        self.metrics = metrics
        self.models = models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = _predicted_model(scope["path"]) if scope["type"] == "http" else None
        if name is None:
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
        label = name if name in self.models.names else "_unknown"  # bounded: only served names
        self.metrics.predict_latency.labels(label).observe(time.perf_counter() - started)
        self.metrics.predict_requests.labels(label, str(status)).inc()


def _predicted_model(path: str) -> str | None:
    """The model a predict path names (/v1/models/{name}:predict, /v2/models/{name}[/versions/{v}]/infer)."""
    if path.endswith(":predict"):
        return path.rsplit("/", 1)[-1].removesuffix(":predict")
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return path.removeprefix("/v2/models/").split("/", 1)[0]
    return None


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
