"""The FastAPI application: routes, error handlers, authentication gate, body-size limit, health,
readiness, metrics.

The HTTP server comes up at once; the engine starts in the background. Until it is ready,
`/ready` answers 503 and model requests get 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .. import metrics
from ..registry import Principal
from ..serving.errors import ServingError
from ..serving.service import AlterService
from . import admin_routes, dashboard, openai_routes
from .auth import PRINCIPAL_STATE, bearer_key, check_admin, check_any_key
from .dependencies import ServiceDep
from .errors import BodyTooLarge, install_error_handlers, openai_error, too_large

log = logging.getLogger(__name__)


class BodyLimit:
    """ASGI middleware: refuse bodies over their path's limit with 413, by the declared length or
    while the body streams in (chunked uploads declare none). `limits` maps path prefixes to byte
    limits (the first match wins); other paths get `default`."""

    def __init__(self, app, default: int, limits: tuple[tuple[str, int], ...] = ()):
        self.app, self.default, self.limits = app, default, limits

    def limit_for(self, path: str) -> int:
        return next((limit for prefix, limit in self.limits if path.startswith(prefix)), self.default)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await too_large(limit).response()(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLarge as exc:  # raised outside a route (a route's own handler answers 413 itself)
            await too_large(exc.limit).response()(scope, receive, send)


class AuthGate:
    """ASGI middleware: authenticate from the Authorization header before anything reads a body.

    FastAPI parses (and spools uploads of) a body before it runs a route's dependencies, so without
    this gate a caller with no key could make the server read and JSON-parse a body of up to
    `max_body_bytes` (an upload: `max_upload_bytes`) before being refused.
    - `/admin/...`, `/metrics` (whose labels name every tenant, view and arm) and, unless
      `openapi_docs` publishes it, `/openapi.json` (it lists the admin API) need an admin key;
    - `/v1/...` needs any valid key (tenant or admin).
    The principal is left in the request state (`auth.PRINCIPAL_STATE`), so a route does not
    authenticate a second time; the model routes still read the key again with their model name
    (`Router.authorize`: one registry read that also resolves the view)."""

    def __init__(self, app, service: AlterService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        check = self._check_for(scope["path"]) if scope["type"] == "http" else None
        if check is not None:
            try:
                principal = await check(self.service, bearer_key(Request(scope)))
            except ServingError as refused:
                return await openai_error(refused).response()(scope, receive, send)
            scope.setdefault("state", {})[PRINCIPAL_STATE] = principal
        await self.app(scope, receive, send)

    def _check_for(self, path: str) -> Callable[[AlterService, str | None], Awaitable[Principal]] | None:
        """Who may call `path`: the check to run before its body is read (None: anyone)."""
        if path in ("/admin", "/metrics") or path.startswith("/admin/"):
            return check_admin
        if path == "/openapi.json" and not self.service.config.openapi_docs:
            return check_admin
        if path.startswith("/v1/"):
            return check_any_key
        return None


def create_app(service: AlterService, *, start_engine: bool = True) -> FastAPI:
    """The app for `service`. `start_engine=False` never starts the engine (admin API and dashboard
    only, e.g. in tests without vLLM): model requests then answer 503 like an engine still starting;
    views are still published to the (stopped) engine's adapter table, and synced from the registry."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        starting = None
        if start_engine:
            starting = asyncio.create_task(service.start(), name="engine-start")
            starting.add_done_callback(_log_start_failure)
        else:
            service.start_registry_sync()  # views other replicas change still reach this one's adapters
        app.state.starting = starting
        exporter = metrics.serve(service.config.metrics_host, service.config.metrics_port)
        try:
            yield
        finally:
            if exporter is not None:
                exporter.shutdown()
            if starting is not None:
                starting.cancel()
            await service.stop()

    # The schema lists the admin API. Unless `openapi_docs` publishes it, /openapi.json is for admins
    # (AuthGate) and the browser pages, which cannot send a bearer key, are off.
    docs = service.config.openapi_docs
    app = FastAPI(title="alter-serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible serving of ALTER forgetting views on vLLM.",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    app.state.service = service  # what routes get as `dependencies.ServiceDep`
    install_error_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(dashboard.router)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(svc: ServiceDep):
        body = {"ready": svc.ready, "engine": svc.engine.state, "restarts": svc.engine.restarts,
                "views_loaded": len(svc.adapters.loaded())}
        return JSONResponse(body, status_code=200 if svc.ready else 503,
                            headers={} if svc.ready else {"Retry-After": "5"})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        """For admins (AuthGate); Prometheus scrapes the separate `metrics_port` instead."""
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    # Bundle and head uploads are the only large bodies: a manifest (1 MiB at most) and the weights.
    upload_limit = service.config.max_upload_bytes + (2 << 20)
    # add_middleware wraps: the last added runs first, so the key is checked before any limit.
    app.add_middleware(BodyLimit, default=service.config.max_body_bytes, limits=(("/admin/bundles", upload_limit),))
    app.add_middleware(AuthGate, service=service)
    return app


def _log_start_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("engine start failed", exc_info=task.exception())
