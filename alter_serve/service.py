"""The running server's state and operations: registry + engine + adapter versions, wired together.

Request path:  API key → Principal → model name → (experiment arm) → view → lease on its version.
Admin path:    registry change (in a worker thread) → publish every changed view's new version to
               the engine → return. So a request accepted after an admin call returns sees the change.
Replicas:      every `registry_poll_s` each replica reads the registry's views revision (one tiny
               query); when another replica changed a view, it publishes the new versions to its own
               engine and unpublishes deleted views (`sync_views`). A request for a view that is in
               the registry but not loaded here yet starts its load at once and gets 503 + Retry-After.
Failed loads:  a view version the engine could not load (after the registry committed it) is marked
               failed (`load_failures`): the admin API and /v1/models show it, its requests answer
               503 instead of "being loaded" forever, and each registry poll retries it; a later
               successful load (a fixed view, a restarted engine) clears the mark.
Request log:   buffered in memory and written in batches (`request_log_flush_s`); a batch the
               registry refuses is kept for the next flush (up to `MAX_PENDING_LOG_ROWS` rows).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from .api.errors import OpenAIError, model_not_found, unauthorized, unavailable
from .serving.generation import Generator
from .serving.routing import Target
from .serving.schemas import DEFAULT_MODEL
from .config import ServeConfig
from .core.fingerprint import fingerprint, module_shapes
from .core.views import ADAPTER_WEIGHTS, ORIGINAL_VIEW, ComposedView
from .engine.adapters import AdapterManager, UnknownView, ViewVersion
from .engine.vllm_engine import VllmEngine
from .serving.limits import FeedbackLimiter, TenantLimiter
from . import metrics
from .registry import (
    Conflict,
    KeyInfo,
    NotFound,
    Principal,
    Registry,
    RequestContext,
    RequestLogEntry,
    ViewChange,
    ViewInfo,
)
from .registry.experiments import RUNNING
from .registry.garbage import GarbageReport

# Called with (the experiment's sticky kind, the request's API key id); returns the value the arm
# is hashed from (`registry.experiments.sticky_value`).
StickyLookup = Callable[[str, int], str | None]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadFailure:
    """Why the engine could not load a view's version `content_hash`, and when."""

    content_hash: str
    error: str
    at: datetime


@dataclass(frozen=True)
class Routed:
    """Where a request goes. `arm` is the experiment arm that serves it; `paused` when the
    experiment is paused: then the arm is the control arm, and the request is not an arm sample."""

    view: str
    experiment: str | None = None
    arm: str | None = None
    paused: bool = False

    @property
    def sample_arm(self) -> str | None:
        """The arm this request counts for in the experiment's statistics (the request log and the
        per-arm metrics): None for paused traffic, which was not randomized."""
        return None if self.paused else self.arm


class AlterService:
    MAX_PENDING_LOG_ROWS = 100_000  # request-log rows kept in memory while the registry cannot be written

    def __init__(self, config: ServeConfig, model_dir: str | Path):
        self.config = config
        self.model_dir = Path(model_dir).resolve()
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.registry = Registry(config.registry_url, config.data_dir,
                                 base_fingerprint=fingerprint(self.model_dir), base_shapes=module_shapes(self.model_dir),
                                 max_rank=config.engine.max_lora_rank)
        self.engine = VllmEngine(config.engine, self.model_dir)
        self.adapters = AdapterManager(self.engine)
        self.generator = Generator(self.engine)
        # Per-tenant concurrency / tokens-per-minute / max_tokens limits, and the server's sequence cap.
        self.limiter = TenantLimiter(max_queued_sequences=config.max_queued_sequences)
        self.feedback_limiter = FeedbackLimiter(config.feedback_per_minute)
        self._log_rows: list[RequestLogEntry] = []
        self.dropped_log_rows = 0  # rows given up on while the registry could not be written
        self._background: list[asyncio.Task] = []
        # Serializes every change of what this engine serves (admin apply, registry sync, on-demand
        # loads), so a sync that read the registry before an admin change cannot publish its older
        # state after that change was applied.
        self._views_lock = asyncio.Lock()
        self._synced_revision: int | None = None
        self._loading: dict[str, asyncio.Task] = {}
        self.load_failures: dict[str, LoadFailure] = {}  # view name → its failed version (module docstring)
        self.engine.on_restart(metrics.ENGINE_RESTARTS.inc)

    # ---- lifecycle --------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create tables and folders (sync; before the event loop serves requests)."""
        self.registry.create_all()

    async def start(self) -> None:
        """Publish every view, then start the engine (which loads them). Runs in the background."""
        await self.sync_views(force=True)
        await self.engine.start()
        self._background.append(asyncio.create_task(self._flush_request_log(), name="request-log"))
        self._background.append(asyncio.create_task(self._gauges(), name="gauges"))
        self.start_registry_sync()

    def start_registry_sync(self) -> None:
        """Poll the registry for views other replicas changed (every `registry_poll_s`; 0 = never)."""
        if self.config.registry_poll_s > 0 and not any(t.get_name() == "registry-sync" for t in self._background):
            self._background.append(asyncio.create_task(self._poll_registry(), name="registry-sync"))

    async def stop(self) -> None:
        for task in [*self._background, *self._loading.values()]:
            task.cancel()
        await self._write_log_rows()
        await self.engine.stop()
        self.registry.close()

    @property
    def ready(self) -> bool:
        return self.engine.ready

    # ---- views ------------------------------------------------------------------------------
    async def _publish(self, view: ViewInfo) -> str | None:
        """Make the registry's version of `view` the one this engine serves (a no-op when it is
        already). Its composed folder is recomposed here first if this data_dir lacks it.
        Call with `_views_lock` held. Returns the new version's label when one was published."""
        composed = view.composed
        if composed is None:  # "original": the base model, always served
            return None
        current = self.adapters.current(view.name)
        if current is not None and current.content_hash == composed.content_hash:
            return None
        if not (composed.path / ADAPTER_WEIGHTS).is_file():
            composed = await asyncio.to_thread(self.registry.ensure_composed, view.name)
            if composed is None or composed.content_hash != view.content_hash:
                return None  # changed meanwhile; the next sync publishes what it is now
        version = await self._load(composed, "swap" if current is not None else "load")
        return version.label

    async def _load(self, composed: ComposedView, op: str) -> ViewVersion:
        """Publish `composed` to the engine; a failure is recorded in `load_failures` and re-raised."""
        try:
            with metrics.adapter_op(op):
                version = await self.adapters.publish(composed)
        except Exception as exc:
            self.load_failures[composed.name] = LoadFailure(composed.content_hash, f"{type(exc).__name__}: {exc}",
                                                            datetime.now(timezone.utc))
            raise
        self.load_failures.pop(composed.name, None)
        return version

    async def apply(self, changes: Iterable[ViewChange]) -> list[str]:
        """Publish the new version of every changed view (the hot-swap). Returns their labels.
        Every view is tried; when any failed to load, raises a 500 `view_load_failed` naming each
        (the registry keeps the change; the views are marked failed)."""
        labels, failed = [], []
        async with self._views_lock:
            for change in changes:
                try:
                    version = await self._load(change.view.composed, "swap" if change.previous is not None else "load")
                except Exception:
                    log.exception("could not load %s into the engine", change.view.name)
                    failed.append(change.view.name)
                else:
                    labels.append(version.label)
        if failed:
            raise view_load_failed({name: self.load_failures[name] for name in failed})
        return labels

    async def forget_view(self, name: str) -> None:
        async with self._views_lock:
            await self.adapters.unpublish(name)
            self.load_failures.pop(name, None)

    async def sync_views(self, *, force: bool = False) -> bool:
        """Bring this engine in line with the registry: publish every view's current version,
        unpublish views that are gone. Skipped (one tiny query) while the registry's views revision
        is the one last synced, unless `force`. Returns whether it looked at the views.

        A view that fails to load is logged and retried on the next poll; the others still load."""
        revision = await asyncio.to_thread(self.registry.views_revision)
        if not force and revision == self._synced_revision:
            return False
        complete = True
        async with self._views_lock:
            # Read under the lock, after the revision: what is published is at least as new as it.
            views = await asyncio.to_thread(self.registry.list_views)
            for view in views:
                try:
                    label = await self._publish(view)
                except Exception:
                    complete = False
                    log.exception("could not load view %s from the registry; retrying at the next poll", view.name)
                else:
                    if label is not None:
                        log.info("registry sync: now serving %s", label)
            names = {v.name for v in views}
            for gone in sorted(set(self.adapters.loaded()) - names - {ORIGINAL_VIEW}):
                await self.adapters.unpublish(gone)
                self.load_failures.pop(gone, None)
                log.info("registry sync: view %s was removed; unpublished", gone)
        if complete:
            self._synced_revision = revision
        return True

    async def _poll_registry(self) -> None:
        await _every(self.config.registry_poll_s, self.sync_views,
                     "could not poll the registry for view changes; retrying")

    def _load_soon(self, name: str) -> None:
        """Load view `name` from the registry in the background (once at a time per view): a
        request found it in the registry, but this replica does not serve it (yet, or this version)."""
        if name in self._loading:
            return
        task = asyncio.get_running_loop().create_task(self._load_now(name), name=f"load-{name}")
        self._loading[name] = task
        task.add_done_callback(lambda _: self._loading.pop(name, None))

    async def _load_now(self, name: str) -> None:
        try:
            async with self._views_lock:
                try:
                    view = await asyncio.to_thread(self.registry.get_view, name)
                except NotFound:
                    return
                label = await self._publish(view)
            if label is not None:
                log.info("loaded %s on demand", label)
        except Exception:
            log.exception("could not load view %s on demand", name)

    # ---- operations ---------------------------------------------------------------------------
    async def collect_garbage(self, *, dry_run: bool = False) -> GarbageReport:
        """`Registry.collect_garbage` with this server's settings, sparing the view versions its
        engine still serves (current and draining)."""
        config = self.config
        return await asyncio.to_thread(
            self.registry.collect_garbage, keep_views=self.adapters.served_hashes(), grace_s=config.gc_grace_s,
            retention_days=config.request_log_retention_days, retention_rows=config.request_log_retention_rows,
            dry_run=dry_run)

    # ---- request path -----------------------------------------------------------------------
    async def authenticate(self, secret: str | None) -> Principal:
        principal = await asyncio.to_thread(self.registry.authenticate, secret) if secret else None
        if principal is None:
            raise self.unauthenticated()
        return principal

    @staticmethod
    def unauthenticated() -> OpenAIError:
        metrics.REJECTED.labels("auth").inc()
        return unauthorized()

    async def authorize(self, secret: str | None, model: str, sticky: StickyLookup) -> tuple[Principal, Routed]:
        """Authenticate a model request's key and resolve its model name, in ONE registry read (one
        worker-thread hop, one transaction): 401 for a bad key, 404 for a model it may not use.
        Nothing is cached, so a revoked key, a changed grant or limit applies to the next request."""
        context = await asyncio.to_thread(self.registry.request_context, secret, model) if secret else None
        if context is None:
            raise self.unauthenticated()
        return context.principal, self._route(context, sticky)

    def _route(self, context: RequestContext, sticky: StickyLookup) -> Routed:
        """The tenant's model name: an experiment alias first, then a granted view, then `default`
        for the tenant's default view (serving.schemas.DEFAULT_MODEL). Either way only
        a view granted to the tenant is served: the registry refuses experiments whose arms are not
        granted, and this checks again against the grants read with the request."""
        experiment, principal = context.experiment, context.principal
        if experiment is not None:
            arm = experiment.choose_arm(sticky(experiment.sticky, principal.key_id))
            if arm.view not in principal.views:
                raise self._model_not_found(context.model)
            # Paused: the control arm's view, but outside the arm samples (not randomized).
            return Routed(arm.view, experiment.name, arm.name, paused=experiment.status != RUNNING)
        if context.view is None:
            if context.model == DEFAULT_MODEL and principal.default_view is not None:
                # No view or alias has that name: the tenant's default view (its adapter is reloaded
                # by the registry poll, not here: this read did not compose it).
                return Routed(principal.default_view)
            raise self._model_not_found(context.model)
        composed = context.composed
        if composed is not None:
            loaded = self.adapters.current(context.view)
            failed = self.load_failures.get(context.view)
            if (loaded is None or loaded.content_hash != composed.content_hash) and (
                    failed is None or failed.content_hash != composed.content_hash):
                self._load_soon(context.view)  # another replica changed it since our last poll
        return Routed(context.view)

    @staticmethod
    def _model_not_found(model: str | None) -> OpenAIError:
        metrics.REJECTED.labels("model_not_found").inc()
        return model_not_found(model)

    def target(self, model: str, routed: Routed, principal: Principal) -> Target:
        """Where `principal`'s request for `model` goes: a lease on the routed view's current version,
        in the tenant's own prefix-cache partition (`cache_salt`)."""
        if not self.ready:
            metrics.REJECTED.labels("engine_not_ready").inc()
            raise unavailable(f"The model engine is {self.engine.state}; retry shortly.", 5)
        try:
            lease = self.adapters.acquire(routed.view)
        except UnknownView:
            if routed.view in self.load_failures:  # retried by each registry poll, not by each request
                metrics.REJECTED.labels("view_load_failed").inc()
                raise unavailable(f"The view for model '{model}' failed to load on this server; an administrator "
                                  "has to fix it. Retry later.", 30) from None
            self._load_soon(routed.view)  # in the registry (route found it) but not on this replica yet
            raise unavailable(f"The view for model '{model}' is being loaded; retry shortly.", 2) from None
        return Target(model, lease, routed.experiment, routed.arm, routed.paused, cache_salt(principal))

    def log_request(self, row: RequestLogEntry) -> None:
        # Stamped now, not when its batch is written (maybe much later, after a failed write): the
        # statistics count an experiment's rows from its creation time (`Registry._samples_of`).
        self._log_rows.append(row if row.created_at is not None else replace(row, created_at=datetime.now(timezone.utc)))

    async def flush_request_log(self) -> None:
        await self._write_log_rows()

    async def _write_log_rows(self) -> None:
        rows, self._log_rows = self._log_rows, []
        if not rows:
            return
        try:
            await asyncio.to_thread(self.registry.log_requests, rows)
        except Exception:
            self._keep_for_retry(rows)
            raise

    def _keep_for_retry(self, rows: list[RequestLogEntry]) -> None:
        """Put a batch the registry refused back before the rows logged since, for the next flush.
        Bounded: beyond `MAX_PENDING_LOG_ROWS` the oldest rows are dropped, counted and logged, so an
        unreachable registry costs request history, never the server's memory."""
        pending = rows + self._log_rows
        overflow = len(pending) - self.MAX_PENDING_LOG_ROWS
        if overflow > 0:
            self.dropped_log_rows += overflow
            metrics.REQUEST_LOG_DROPPED.inc(overflow)
            log.error("request log: %d rows are waiting for the registry, more than the %d kept; dropped the "
                      "%d oldest (%d since start)", len(pending), self.MAX_PENDING_LOG_ROWS, overflow,
                      self.dropped_log_rows)
            pending = pending[overflow:]
        self._log_rows = pending

    async def _flush_request_log(self) -> None:
        # Batched off the request path: one executemany per interval, not one write per request.
        await _every(self.config.request_log_flush_s, self._write_log_rows, "could not write the request log batch")

    async def _gauges(self) -> None:
        while True:
            metrics.ENGINE_READY.set(1 if self.ready else 0)
            metrics.LOADED_VIEWS.labels("current").set(len(self.adapters.loaded()) - 1)
            metrics.LOADED_VIEWS.labels("draining").set(self.adapters.draining)
            await asyncio.sleep(1.0)

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


def cache_salt(principal: Principal) -> str | None:
    """vLLM's cache salt for a tenant's requests: prefix-cache blocks are shared within a tenant,
    never across tenants, even on a shared view (a cache hit answers faster: a timing channel).
    The salt is not secret; what matters is that a tenant cannot choose it."""
    return None if principal.tenant_id is None else f"tenant-{principal.tenant_id}-{principal.tenant_name}"


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


def view_load_failed(failures: dict[str, LoadFailure]) -> OpenAIError:
    """The admin API's answer when the registry took a change but the engine could not load it."""
    listed = "; ".join(f"{name} ({failure.content_hash[:12]}): {failure.error}" for name, failure in failures.items())
    return OpenAIError(500, f"The registry has the change, but the engine could not load {listed}. These views are "
                       "marked failed (GET /admin/views shows load_error) and their requests answer 503 until a load "
                       "succeeds: fix and redefine the view, or delete it.", "server_error", None, "view_load_failed")
