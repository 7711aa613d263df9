"""Errors as HTTP answers, in one place: which status each of our errors gets, and the JSON body.

Every answer that is not a success is {"error": "..."}; an error with no status here is a 500.
"""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from streamlearn.errors import (
    BadRequest,
    MalformedBody,
    ModelNotFound,
    ModelNotReady,
    SnapshotStoreUnavailable,
    StreamlearnError,
    UnsupportedMediaType,
    VersionConflict,
)
from streamlearn.serve.dataplane import first_error

log = logging.getLogger("streamlearn.serve")

# The most specific class first: the first match gives the status; any other error is a 500.
STATUS: dict[type[StreamlearnError], int] = {
    UnsupportedMediaType: 415,
    MalformedBody: 400,
    BadRequest: 422,
    ModelNotFound: 404,
    ModelNotReady: 503,
    VersionConflict: 409,  # an admin call that cannot be done as asked
    SnapshotStoreUnavailable: 503,  # listing versions while the store is out
}
# The Open Inference Protocol (V2) answers 400 to a request that does not fit the model; V1 keeps 422.
V2_STATUS = {**STATUS, BadRequest: 400}  # same order: the more specific 415 and 400 still come first


class ErrorBody(BaseModel):
    """Every error answer: what went wrong, written for the client."""

    error: str


def errors(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses with the JSON error body, each with what it means."""
    return {code: {"model": ErrorBody, "description": text} for code, text in described.items()}


ANY_ROUTE = errors(
    {
        408: "The request's headers or body did not arrive in time (--header-timeout-s, --body-timeout-s).",
        413: "The declared or sent body is larger than --max-body-bytes.",
        500: "An unexpected error (logged).",
        503: "Too many open connections (--max-connections); retry shortly.",
    }
)


def register_error_handlers(app: FastAPI) -> None:
    """Every error a JSON {"error": ...}: ours by the table above, validation 422, routing by status."""

    @app.exception_handler(StreamlearnError)
    async def streamlearn_error(request: Request, exc: StreamlearnError) -> Response:
        table = V2_STATUS if request.scope["path"].startswith("/v2/") else STATUS
        status = next((code for kind, code in table.items() if isinstance(exc, kind)), 500)
        if status == 500:
            log.error("unmapped %s answered 500: %s", type(exc).__name__, exc)
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        status = 400 if request.scope["path"].startswith("/v2/") else 422
        return JSONResponse({"error": first_error(exc.errors())}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
