"""Authentication dependencies: a bearer API key → the caller's Principal."""

from __future__ import annotations

from fastapi import Request

from ..registry import Principal
from ..registry.keys import looks_like_secret
from ..serving.errors import Forbidden
from ..serving.routing import unauthenticated
from ..serving.service import AlterService
from .dependencies import ServiceDep


def bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def model_request_key(request: Request) -> str:
    """The bearer key of a model request (completions, chat). `app.AuthGate` authenticated it before
    the body was read; the route reads it again together with resolving the model
    (`Router.authorize`, one registry read), so a key revoked in between is still refused."""
    secret = bearer_key(request)
    if secret is None or not looks_like_secret(secret):
        raise unauthenticated()
    return secret


PRINCIPAL_STATE = "principal"  # where `app.AuthGate` leaves the principal it authenticated


async def check_any_key(service: AlterService, secret: str | None) -> Principal:
    """The principal `secret` belongs to, tenant or admin: 401 for no valid key."""
    return await service.router.authenticate(secret)


async def check_admin(service: AlterService, secret: str | None) -> Principal:
    """The admin `secret` belongs to: 401 for no valid key, 403 for a tenant key."""
    principal = await service.router.authenticate(secret)
    if not principal.is_admin:
        raise Forbidden("This endpoint needs an admin key; tenant keys are refused.")
    return principal


async def tenant_principal(request: Request, service: ServiceDep) -> Principal:
    """Any valid key (tenant or admin; admins simply have no views granted): the principal
    `app.AuthGate` authenticated, or authenticated here when the router runs without the gate."""
    principal = getattr(request.state, PRINCIPAL_STATE, None)
    return principal if principal is not None else await check_any_key(service, bearer_key(request))


async def admin_principal(request: Request, service: ServiceDep) -> Principal:
    """The admin behind an /admin request: authenticated by `app.AuthGate` before the body was
    read (taken from the request state), or here when the router runs without that middleware."""
    principal = getattr(request.state, PRINCIPAL_STATE, None)
    if principal is not None and principal.is_admin:
        return principal
    return await check_admin(service, bearer_key(request))
