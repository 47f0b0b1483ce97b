"""Request routing: the one place where a request's model name becomes a lease on a vLLM LoRARequest.

    API key → Principal → model name → (experiment arm) → view → lease on its current version
                                                                  → the version's LoRARequest

`Router.authorize` reads the key and resolves the model name in ONE registry read (one worker-thread
hop, one transaction; nothing is cached, so a revoked key, a changed grant or limit applies to the
next request) and answers `Routed`: the view, and the experiment arm that chose it. `Router.lease`
then takes a lease on that view's current version (`Target`), which the request holds until it
ends: a hot-swap never changes the weights under a running request. The model name is, in order:
an experiment alias, a granted view, or `default` for the tenant's default view; whichever it is,
only a view granted to the tenant is served, and any other name is the same `ModelNotFound`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from .. import metrics
from ..engine.adapters import AdapterManager, Lease, UnknownView
from ..engine.vllm_engine import VllmEngine
from ..registry import Principal, Registry, RequestContext
from ..registry.experiments import RUNNING
from .errors import ModelNotFound, Unauthenticated, Unavailable
from .publishing import ViewPublisher
from .schemas import DEFAULT_MODEL

# Called with (the experiment's sticky kind, the request's API key id); returns the value the arm
# is hashed from (`registry.experiments.sticky_value`).
StickyLookup = Callable[[str, int], str | None]


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


@dataclass
class Target:
    """Where a request goes: the model name asked for, the view version, the A/B arm (the control
    arm while the experiment is `paused`), and whose prefix cache it may use."""

    model: str
    lease: Lease
    experiment: str | None = None
    arm: str | None = None
    paused: bool = False
    # The tenant's prefix-cache partition: tenants that share a view never share cached KV blocks,
    # so one cannot time another's prompts (a cache hit answers faster).
    cache_salt: str | None = None

    @property
    def view_label(self) -> str:
        return self.lease.version.label

    @property
    def fingerprint(self) -> str:
        arm = f";exp={self.experiment};arm={self.arm}{';paused' if self.paused else ''}" if self.experiment else ""
        return f"alter:{self.view_label}{arm}"

    def headers(self) -> dict[str, str]:
        headers = {"x-alter-view": self.view_label}
        if self.experiment:
            headers.update({"x-alter-experiment": self.experiment, "x-alter-arm": self.arm or "",
                            "x-alter-experiment-status": "paused" if self.paused else "running"})
        return headers


class Router:
    """Authenticates requests, resolves their model names and leases view versions, for one engine."""

    def __init__(self, registry: Registry, engine: VllmEngine, adapters: AdapterManager, publisher: ViewPublisher):
        self.registry, self.engine, self.adapters, self.publisher = registry, engine, adapters, publisher

    async def authenticate(self, secret: str | None) -> Principal:
        """The principal `secret` belongs to, tenant or admin: Unauthenticated for no valid key."""
        principal = await asyncio.to_thread(self.registry.authenticate, secret) if secret else None
        if principal is None:
            raise unauthenticated()
        return principal

    async def authorize(self, secret: str | None, model: str, sticky: StickyLookup) -> tuple[Principal, Routed]:
        """Authenticate a model request's key and resolve its model name, in one registry read:
        Unauthenticated for a bad key, ModelNotFound for a model it may not use."""
        context = await asyncio.to_thread(self.registry.request_context, secret, model) if secret else None
        if context is None:
            raise unauthenticated()
        return context.principal, self.route(context, sticky)

    def route(self, context: RequestContext, sticky: StickyLookup) -> Routed:
        """The tenant's model name: an experiment alias first, then a granted view, then `default`
        for the tenant's default view. Either way only a view granted to the tenant is served: the
        registry refuses experiments whose arms are not granted, and this checks again against the
        grants read with the request."""
        experiment, principal = context.experiment, context.principal
        if experiment is not None:
            arm = experiment.choose_arm(sticky(experiment.sticky, principal.key_id))
            if arm.view not in principal.views:
                raise _model_not_found(context.model)
            # Paused: the control arm's view, but outside the arm samples (not randomized).
            return Routed(arm.view, experiment.name, arm.name, paused=experiment.status != RUNNING)
        if context.view is None:
            if context.model == DEFAULT_MODEL and principal.default_view is not None:
                # No view or alias has that name: the tenant's default view (its adapter is reloaded
                # by the registry poll, not here: this read did not compose it).
                return Routed(principal.default_view)
            raise _model_not_found(context.model)
        composed = context.composed
        if composed is not None:
            loaded = self.adapters.current(context.view)
            failed = self.publisher.load_failures.get(context.view)
            if (loaded is None or loaded.content_hash != composed.content_hash) and (
                    failed is None or failed.content_hash != composed.content_hash):
                self.publisher.load_soon(context.view)  # another replica changed it since our last poll
        return Routed(context.view)

    def lease(self, model: str, routed: Routed, principal: Principal) -> Target:
        """Where `principal`'s request for `model` goes: a lease on the routed view's current version,
        in the tenant's own prefix-cache partition (`cache_salt`). Unavailable (503) while the
        engine is not ready, and for a view this server has not loaded (yet, or that failed to)."""
        if not self.engine.ready:
            metrics.REJECTED.labels("engine_not_ready").inc()
            raise Unavailable(f"The model engine is {self.engine.state}; retry shortly.", retry_after_s=5)
        try:
            lease = self.adapters.acquire(routed.view)
        except UnknownView:
            if routed.view in self.publisher.load_failures:  # retried by each registry poll, not by each request
                metrics.REJECTED.labels("view_load_failed").inc()
                raise Unavailable(f"The view for model '{model}' failed to load on this server; an administrator "
                                  "has to fix it. Retry later.", retry_after_s=30) from None
            self.publisher.load_soon(routed.view)  # in the registry (route found it) but not on this replica yet
            raise Unavailable(f"The view for model '{model}' is being loaded; retry shortly.",
                              retry_after_s=2) from None
        return Target(model, lease, routed.experiment, routed.arm, routed.paused, cache_salt(principal))


def cache_salt(principal: Principal) -> str | None:
    """vLLM's cache salt for a tenant's requests: prefix-cache blocks are shared within a tenant,
    never across tenants, even on a shared view (a cache hit answers faster: a timing channel).
    The salt is not secret; what matters is that a tenant cannot choose it."""
    return None if principal.tenant_id is None else f"tenant-{principal.tenant_id}-{principal.tenant_name}"


def unauthenticated() -> Unauthenticated:
    """The refusal of a request without a valid key (counted as rejected by auth)."""
    metrics.REJECTED.labels("auth").inc()
    return Unauthenticated()


def _model_not_found(model: str | None) -> ModelNotFound:
    metrics.REJECTED.labels("model_not_found").inc()
    return ModelNotFound(model)
