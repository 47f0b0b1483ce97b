"""The model catalog: what `/v1/models` lists for a caller, as OpenAI model objects with lineage.

A caller sees exactly the model names it may send, and nothing else: its granted views, the
aliases of its tenant's unstopped experiments (routed before a view of the same name, so the
alias's card wins), and `default` for its tenant's default view (unless a view or alias has that
name). Each view's card has its lineage (base model, bundle, head weights, version) and whether
this server has it loaded; an alias's card names its arms, never the views behind them.
"""

from __future__ import annotations

from ..engine.adapters import AdapterManager
from ..engine.vllm_engine import EngineUnavailable, VllmEngine
from ..registry import ExperimentInfo, Principal, Registry, ViewInfo, experiments
from .errors import registry_call
from .publishing import ViewPublisher
from .schemas import DEFAULT_MODEL


def _catalog(registry: Registry, principal: Principal) -> tuple[list[ViewInfo], list[ExperimentInfo]]:
    """Every view, and the unstopped experiments of the principal's tenant (one worker-thread hop)."""
    exps = registry.list_experiments(tenant=principal.tenant_name) if principal.tenant_name else []
    return registry.list_views(), [e for e in exps if e.status != experiments.STOPPED]


def _max_model_len(engine: VllmEngine) -> int | None:
    """The context length, as vLLM's model cards give it: the running engine's, else the configured
    one (None: the model's own, known once the engine is up)."""
    try:
        return engine.max_model_len
    except EngineUnavailable:
        return engine.config.max_model_len


class ModelCatalog:
    """The model cards of one server: its registry's views and experiments, its engine's state."""

    def __init__(self, registry: Registry, engine: VllmEngine, adapters: AdapterManager, publisher: ViewPublisher,
                 base_model: str):
        self.registry, self.engine, self.adapters, self.publisher = registry, engine, adapters, publisher
        self.base_model = base_model  # the base model's folder name

    async def cards(self, principal: Principal) -> dict[str, dict]:
        """The model names `principal` may send, as OpenAI model objects by id: its granted views, the
        aliases of its tenant's unstopped experiments (routed before a view of the same name, so the
        alias's card wins), and `default` for its tenant's default view (unless a view or alias has
        that name). Each has the context length (`max_model_len`), as in vLLM's model cards."""
        views, running = await registry_call(_catalog, self.registry, principal)
        by_name = {v.name: v for v in views}
        base = self.base_model
        context = _max_model_len(self.engine)
        cards: dict[str, dict] = {}
        for name in principal.views:
            view = by_name.get(name)
            if view is None:
                continue
            loaded = self.adapters.current(name)
            cards[name] = {
                "id": name, "object": "model", "created": int(view.created_at.timestamp()), "owned_by": "alter-serve",
                "root": str(base), "parent": None, "max_model_len": context,
                "lineage": {
                    "base_model": base,
                    "base_fingerprint": self.registry.base_fingerprint,
                    "bundle": view.bundle,
                    "heads": view.spec.spec_dict() if not view.is_original else {},
                    "version": view.version or "base",
                    "loaded": loaded is not None and self.engine.ready,
                    # This version failed to load here (the error itself is for admins: GET /admin/views).
                    "load_failed": self.publisher.failure(view) is not None,
                },
            }
        for exp in running:
            cards[exp.alias] = {
                "id": exp.alias, "object": "model", "created": int(exp.created_at.timestamp()),
                "owned_by": "alter-serve",
                "root": str(base), "parent": None, "max_model_len": context,
                # The arms' names are in every response's headers; the views behind them are not shown.
                "experiment": {"name": exp.name, "status": exp.status, "arms": [arm.name for arm in exp.arms]},
            }
        if principal.default_view in cards and DEFAULT_MODEL not in cards:
            cards[DEFAULT_MODEL] = {**cards[principal.default_view], "id": DEFAULT_MODEL,
                                    "default_view": principal.default_view}
        return cards
