"""The running server's state and operations: registry + engine + adapter versions, wired together.

Request path:  API key → Principal → model name → (experiment arm) → view → lease on its version.
Admin path:    registry change (in a worker thread) → publish every changed view's new version to
               the engine → return. So a request accepted after an admin call returns sees the change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .api.errors import model_not_found, unauthorized, unavailable
from .api.generation import Generator, Target
from .config import ServeConfig
from .core.fingerprint import fingerprint, module_shapes
from .engine.adapters import AdapterManager, UnknownView
from .engine.vllm_engine import VllmEngine
from .limits import TenantLimiter
from . import metrics
from .registry import Principal, Registry, RequestLogEntry, ViewChange, ViewInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Routed:
    view: str
    experiment: str | None = None
    arm: str | None = None


class AlterService:
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
        self.limiter = TenantLimiter()  # per-tenant concurrency / tokens-per-minute / max_tokens limits
        self._log_rows: list[RequestLogEntry] = []
        self._background: list[asyncio.Task] = []
        self.engine.on_restart(metrics.ENGINE_RESTARTS.inc)

    # ---- lifecycle --------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create tables and folders (sync; before the event loop serves requests)."""
        self.registry.create_all()

    async def start(self) -> None:
        """Publish every view, then start the engine (which loads them). Runs in the background."""
        for view in await asyncio.to_thread(self.registry.list_views):
            await self._publish(view)
        await self.engine.start()
        self._background.append(asyncio.create_task(self._flush_request_log(), name="request-log"))
        self._background.append(asyncio.create_task(self._gauges(), name="gauges"))

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        await self._write_log_rows()
        await self.engine.stop()
        self.registry.close()

    @property
    def ready(self) -> bool:
        return self.engine.ready

    # ---- views ------------------------------------------------------------------------------
    async def _publish(self, view: ViewInfo) -> None:
        composed = view.composed
        if composed is None:
            return
        with metrics.adapter_op("load"):
            await self.adapters.publish(composed)

    async def apply(self, changes: Iterable[ViewChange]) -> list[str]:
        """Publish the new version of every changed view (the hot-swap). Returns their labels."""
        labels = []
        for change in changes:
            with metrics.adapter_op("swap" if change.previous is not None else "load"):
                version = await self.adapters.publish(change.view.composed)
            labels.append(version.label)
        return labels

    async def forget_view(self, name: str) -> None:
        await self.adapters.unpublish(name)

    # ---- request path -----------------------------------------------------------------------
    async def authenticate(self, secret: str | None) -> Principal:
        principal = await asyncio.to_thread(self.registry.authenticate, secret) if secret else None
        if principal is None:
            metrics.REJECTED.labels("auth").inc()
            raise unauthorized()
        return principal

    async def route(self, principal: Principal, model: str, sticky: Callable[[str], str | None]) -> Routed:
        """Resolve a model name for this tenant: an experiment alias first, then a granted view."""
        if principal.tenant_name is not None:
            experiment = await asyncio.to_thread(self.registry.experiment_for, principal.tenant_name, model)
            if experiment is not None and experiment.alias == model:
                arm = experiment.choose_arm(sticky(experiment.sticky))
                return Routed(arm.view, experiment.name, arm.name)
        view = await asyncio.to_thread(self.registry.resolve_model, principal, model)
        if view is None:
            metrics.REJECTED.labels("model_not_found").inc()
            raise model_not_found(model)
        return Routed(view.name)

    def target(self, model: str, routed: Routed) -> Target:
        if not self.ready:
            metrics.REJECTED.labels("engine_not_ready").inc()
            raise unavailable(f"The model engine is {self.engine.state}; retry shortly.", 5)
        try:
            lease = self.adapters.acquire(routed.view)
        except UnknownView:
            raise unavailable(f"The view for model '{model}' is being loaded; retry shortly.", 2) from None
        return Target(model, lease, routed.experiment, routed.arm)

    def log_request(self, row: RequestLogEntry) -> None:
        self._log_rows.append(row)

    async def flush_request_log(self) -> None:
        await self._write_log_rows()

    async def _write_log_rows(self) -> None:
        rows, self._log_rows = self._log_rows, []
        if rows:
            await asyncio.to_thread(self.registry.log_requests, rows)

    async def _flush_request_log(self) -> None:
        # Batched off the request path: one executemany per interval, not one write per request.
        while True:
            await asyncio.sleep(self.config.request_log_flush_s)
            try:
                await self._write_log_rows()
            except Exception:
                log.exception("could not write the request log batch")

    async def _gauges(self) -> None:
        while True:
            metrics.ENGINE_READY.set(1 if self.ready else 0)
            metrics.LOADED_VIEWS.labels("current").set(len(self.adapters.loaded()) - 1)
            metrics.LOADED_VIEWS.labels("draining").set(self.adapters.draining)
            await asyncio.sleep(1.0)

    # ---- bootstrap ----------------------------------------------------------------------------
    def ensure_admin_key(self) -> str | None:
        """Make sure an admin can log in. A configured key (ALTER_SERVE_ADMIN_KEY) is imported once;
        otherwise, when no admin key is active, one is created. Returns a secret to show, or None."""
        configured = self.config.admin_key.get_secret_value() if self.config.admin_key else None
        if configured is not None:
            known = self.registry.authenticate(configured)
            if known is None:
                self.registry.create_key(None, "admin", secret=configured)
            elif not known.is_admin:
                raise ValueError("the configured admin key belongs to a tenant; choose another secret")
            return None
        if any(k.role == "admin" and k.active for k in self.registry.list_keys()):
            return None
        _, secret = self.registry.create_key(None, "admin")
        return secret

