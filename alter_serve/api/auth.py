"""Authentication dependencies: a bearer API key → the caller's Principal."""

from __future__ import annotations

from fastapi import Request

from ..registry import Principal
from .errors import forbidden


def bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def tenant_principal(request: Request) -> Principal:
    """Any valid key (tenant or admin); admins simply have no views granted."""
    return await request.app.state.service.authenticate(bearer_key(request))


async def admin_principal(request: Request) -> Principal:
    principal = await request.app.state.service.authenticate(bearer_key(request))
    if not principal.is_admin:
        raise forbidden("This endpoint needs an admin key; tenant keys are refused.")
    return principal
