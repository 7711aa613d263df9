"""The admin API: pin a model's version, unpin it, roll back to the previous one.

It exists only when a token is set (--admin-token, STREAMLEARN_ADMIN_TOKEN or --admin-token-file);
without one its routes are not there at all (404). Each call needs `Authorization: Bearer <token>`,
compared in constant time; the token is never logged. A change is kept in the store's
serving.json before it is answered, so every replica and every restart serves the same version.
"""

import asyncio
import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from streamlearn.serve.errors import errors
from streamlearn.serve.registry import ModelRegistry
from streamlearn.serve.v1 import ModelName, ModelVersions

ADMIN_ERRORS = {
    401: "No bearer token.",
    403: "The token is wrong.",
    404: "No model of that name, or no such version in the store.",
    422: "The name or the body is not valid.",
    503: "No snapshot loaded yet, or the snapshot store cannot keep the change.",
}


class PinRequest(BaseModel):
    """The version to serve, and keep serving, until unpinned."""

    # Strict: a JSON integer, and nothing else; true or "1" would pin version 1, a typo'd field be ignored.
    model_config = ConfigDict(extra="forbid", strict=True)

    version: int = Field(ge=1, examples=[12])


def router(models: ModelRegistry, token: str, announce: Any = None) -> APIRouter:
    """The /admin routes, guarded by `token`; `announce(name)` tells the other replicas, if given."""
    expected = token.encode()

    async def authorized(authorization: Annotated[str | None, Header()] = None) -> None:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPException(
                401, "the admin API needs Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(403, "wrong admin token")

    admin = APIRouter(prefix="/admin/models", tags=["admin"], dependencies=[Depends(authorized)])

    async def changed(name: str, result: dict[str, Any]) -> dict[str, Any]:
        if announce is not None:  # waits for Kafka's acknowledgement: off the event loop
            await asyncio.to_thread(announce, name)
        return result

    @admin.post(
        "/{name:model}/pin",
        response_model=ModelVersions,
        responses=errors({**ADMIN_ERRORS, 409: "That version does not load."}),
    )
    async def pin(name: ModelName, request: PinRequest) -> dict[str, Any]:
        """Serve this version of the model, and no other, until unpinned (every replica, restarts too)."""
        return await changed(name, await asyncio.to_thread(models.pin, name, request.version))

    @admin.post("/{name:model}/unpin", response_model=ModelVersions, responses=errors(ADMIN_ERRORS))
    async def unpin(name: ModelName) -> dict[str, Any]:
        """Follow the newest snapshot again (through the promotion gate, when it is on)."""
        return await changed(name, await asyncio.to_thread(models.unpin, name))

    @admin.post(
        "/{name:model}/rollback",
        response_model=ModelVersions,
        responses=errors({**ADMIN_ERRORS, 409: "No earlier version is in the store, or it does not load."}),
    )
    async def rollback(name: ModelName) -> dict[str, Any]:
        """Pin the version served before the current one (or the newest older one in the store)."""
        return await changed(name, await asyncio.to_thread(models.rollback, name))

    return admin
