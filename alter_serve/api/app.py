"""The FastAPI application: routes, error handlers, body-size limit, health, readiness, metrics.

The HTTP server comes up at once; the engine starts in the background. Until it is ready,
`/ready` answers 503 and model requests get 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .. import metrics
from ..service import AlterService
from . import admin_routes, dashboard, openai_routes
from .errors import install_error_handlers, too_large

log = logging.getLogger(__name__)


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes with 413, by header or while streaming in."""

    def __init__(self, app, limit: int, exempt_prefixes: tuple[str, ...] = ()):
        self.app, self.limit, self.exempt = app, limit, exempt_prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith(self.exempt):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large(self.limit).response()(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await too_large(self.limit).response()(scope, receive, send)


class _TooLarge(Exception):
    pass


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
        try:
            yield
        finally:
            if starting is not None:
                starting.cancel()
            await service.stop()

    app = FastAPI(title="alter-serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible serving of ALTER forgetting views on vLLM.")
    app.state.service = service
    install_error_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(dashboard.router)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request):
        svc = request.app.state.service
        body = {"ready": svc.ready, "engine": svc.engine.state, "restarts": svc.engine.restarts,
                "views_loaded": len(svc.adapters.loaded())}
        return JSONResponse(body, status_code=200 if svc.ready else 503,
                            headers={} if svc.ready else {"Retry-After": "5"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    app.add_middleware(BodyLimit, limit=service.config.max_body_bytes, exempt_prefixes=("/admin/bundles",))
    return app


def _log_start_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("engine start failed", exc_info=task.exception())
