"""The running server: registry + engine + adapter versions, wired together, and its lifecycle.

`AlterService` is what the web layer holds. Its parts, one concern each:

    router      the request path: API key → model name → view → lease (`routing`)
    limiter     admission: per-tenant limits and the server-wide cap (`limits`)
    generator   plans a request and runs it on the engine (`generation`)
    catalog     the model cards a caller may see (`catalog`)
    publisher   keeps the engine's views in line with the registry (`publishing`)
    request_log the request log, written in batches (`request_log`)
    admin       the admin operations: change the registry, then publish to the engine (`admin`)

Background tasks, started with the engine: the registry poll (every `registry_poll_s`; replicas
pick up each other's view changes), the request-log flush (every `request_log_flush_s`) and the
gauges.

A model request goes through `begin` (authorize, admit, plan, lease: `runs`); a rating through
`record_feedback`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from .. import metrics
from ..config import ServeConfig
from ..core.fingerprint import fingerprint, module_shapes
from ..engine.adapters import AdapterManager
from ..engine.vllm_engine import VllmEngine
from ..registry import Conflict, FeedbackInfo, KeyInfo, Principal, Registry
from .admin import Administration
from .catalog import ModelCatalog
from .errors import ResourceNotFound, registry_call
from .generation import Generator
from .limits import FeedbackLimiter, TenantLimiter
from .publishing import ViewPublisher
from .request_log import RequestLog
from .routing import Router, StickyLookup
from .runs import Endpoint, RequestRun
from .schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)


class AlterService:
    def __init__(self, config: ServeConfig, model_dir: str | Path):
        self.config = config
        self.model_dir = Path(model_dir).resolve()
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.registry = Registry(config.registry_url, config.data_dir,
                                 base_fingerprint=fingerprint(self.model_dir),
                                 base_shapes=module_shapes(self.model_dir),
                                 max_rank=config.engine.max_lora_rank)
        self.engine = VllmEngine(config.engine, self.model_dir)
        self.adapters = AdapterManager(self.engine)
        self.publisher = ViewPublisher(self.registry, self.adapters)
        self.router = Router(self.registry, self.engine, self.adapters, self.publisher)
        self.generator = Generator(self.engine)
        self.catalog = ModelCatalog(self.registry, self.engine, self.adapters, self.publisher, self.model_dir.name)
        # Per-tenant concurrency / tokens-per-minute / max_tokens limits, and the server's sequence cap.
        self.limiter = TenantLimiter(max_queued_sequences=config.max_queued_sequences)
        self.feedback_limiter = FeedbackLimiter(config.feedback_per_minute)
        self.request_log = RequestLog(self.registry)
        self.admin = Administration(config, self.registry, self.adapters, self.publisher)
        self._background: list[asyncio.Task] = []
        self.engine.on_restart(metrics.ENGINE_RESTARTS.inc)

    # ---- lifecycle --------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create tables and folders (sync; before the event loop serves requests)."""
        self.registry.create_all()

    async def start(self) -> None:
        """Publish every view, then start the engine (which loads them). Runs in the background."""
        await self.publisher.sync(force=True)
        await self.engine.start()
        # Batched off the request path: one executemany per interval, not one write per request.
        self._background.append(asyncio.create_task(
            _every(self.config.request_log_flush_s, self.request_log.flush, "could not write the request log batch"),
            name="request-log"))
        self._background.append(asyncio.create_task(self._gauges(), name="gauges"))
        self.start_registry_sync()

    def start_registry_sync(self) -> None:
        """Poll the registry for views other replicas changed (every `registry_poll_s`; 0 = never)."""
        if self.config.registry_poll_s > 0 and not any(t.get_name() == "registry-sync" for t in self._background):
            self._background.append(asyncio.create_task(
                _every(self.config.registry_poll_s, self.publisher.sync,
                       "could not poll the registry for view changes; retrying"), name="registry-sync"))

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        self.publisher.cancel_loads()
        await self.request_log.flush()
        await self.engine.stop()
        self.registry.close()

    @property
    def ready(self) -> bool:
        return self.engine.ready

    async def _gauges(self) -> None:
        while True:
            metrics.ENGINE_READY.set(1 if self.ready else 0)
            metrics.LOADED_VIEWS.labels("current").set(len(self.adapters.loaded()) - 1)
            metrics.LOADED_VIEWS.labels("draining").set(self.adapters.draining)
            await asyncio.sleep(1.0)

    # ---- requests -----------------------------------------------------------------------------
    async def begin(self, secret: str, body: CompletionRequest | ChatCompletionRequest, endpoint: Endpoint,
                    sticky: StickyLookup) -> RequestRun:
        """Authorize, admit, plan and lease one model request (`runs`). Raises the service's errors:
        Unauthenticated, ModelNotFound; InvalidRequest for what could never run; RateLimited over a
        tenant limit; Unavailable over the server's sequence cap or while the view is not served."""
        principal, routed = await self.router.authorize(secret, body.model, sticky)
        permit = self.limiter.admit(principal, body)
        generator = self.generator
        try:
            plan_fn = generator.plan_completion if endpoint == "completions" else generator.plan_chat
            plan = await plan_fn(body, permit.max_tokens, permit.budget)  # tokenised in a worker thread
            permit.reserve(plan.prompt_tokens, plan.max_tokens)  # the exact worst case, prompt included
            target = self.router.lease(body.model, routed, principal)
        except BaseException:
            permit.release(0)
            raise
        return RequestRun(generator, self.request_log, endpoint, body, principal, routed, permit, plan, target)

    async def record_feedback(self, principal: Principal, response_id: str, rating: float,
                              comment: str | None = None) -> FeedbackInfo:
        """Store `principal`'s tenant's rating of a response it was served (rating it again replaces
        the rating). ResourceNotFound for admin keys and for responses not its tenant's (one answer
        for "never served" and "not yours": it reveals nothing); RateLimited over the feedback rate."""
        if principal.tenant_name is None:
            raise ResourceNotFound("Feedback is recorded for tenant responses; admin keys have none.",
                                   param="response_id")
        self.feedback_limiter.take(principal)
        # The statistics attribute a rating through the request log whenever it is written; flushing
        # ours first only lets this reply (and the metric) name the arm of a response this replica
        # just served. So a failed flush does not fail the rating (the periodic flush retries it).
        with contextlib.suppress(Exception):
            await self.request_log.flush()
        try:
            info = await registry_call(self.registry.record_feedback, principal.tenant_name, response_id, rating,
                                       comment=comment, require_logged=True)
        except ResourceNotFound:
            raise ResourceNotFound(f"No response '{response_id}' was served to this API key's tenant (a response "
                                   "another replica served in the last second may not be logged yet: retry then).",
                                   param="response_id") from None
        metrics.FEEDBACK.labels(principal.tenant_name, info.experiment or "", info.arm or "").observe(rating)
        return info

    # ---- bootstrap ----------------------------------------------------------------------------
    def ensure_admin_key(self) -> str | None:
        """Make sure an admin can log in. A configured key (ALTER_SERVE_ADMIN_KEY) is imported once;
        otherwise, when no admin key is active, one is created. Returns a secret to show, or None.
        Raises ValueError saying what to do when the configured key exists but cannot be an admin key."""
        configured = self.config.admin_key.get_secret_value() if self.config.admin_key else None
        if configured is not None:
            known = self.registry.find_key(configured)
            if known is None:
                try:
                    self.registry.create_key(None, "admin", secret=configured)
                    return None
                except Conflict:  # another replica imported it at the same moment: check what it stored
                    known = self.registry.find_key(configured)
                    if known is None:
                        raise
            _check_configured_admin_key(known)
            return None
        if any(k.role == "admin" and k.active for k in self.registry.list_keys()):
            return None
        _, secret = self.registry.create_key(None, "admin")
        return secret


def _check_configured_admin_key(key: KeyInfo) -> None:
    """The configured admin key is stored already: fine if it is an active admin key."""
    where = f"the configured admin key (ALTER_SERVE_ADMIN_KEY, key id {key.id}, prefix {key.prefix})"
    if key.role != "admin":
        raise ValueError(f"{where} is an API key of tenant {key.tenant!r}, not an admin key; set "
                         "ALTER_SERVE_ADMIN_KEY to another secret (or unset it to have one created)")
    if key.revoked_at is not None:
        raise ValueError(f"{where} was revoked at {key.revoked_at.isoformat()}, and a revoked key stays revoked; set "
                         "ALTER_SERVE_ADMIN_KEY to a new secret (or unset it to have one created)")
    if key.expired:
        raise ValueError(f"{where} expired at {key.expires_at.isoformat()}; set ALTER_SERVE_ADMIN_KEY to a new secret "
                         "(or unset it to have one created)")


async def _every(interval_s: float, action: Callable[[], Awaitable[object]], failure: str) -> None:
    """Run `action` every `interval_s` seconds until cancelled; a failure is logged, and retried next time."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await action()
        except Exception:
            log.exception(failure)
