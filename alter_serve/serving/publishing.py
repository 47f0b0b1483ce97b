"""Publishing: keeping what this server's engine serves in line with the registry.

Admin path:    registry change (in a worker thread) → `publish_changes` publishes every changed
               view's new version to the engine → return. So a request accepted after an admin
               call returns sees the change.
Replicas:      every `registry_poll_s` each replica reads the registry's views revision (one tiny
               query); when another replica changed a view, `sync` publishes the new versions to
               its own engine and unpublishes deleted views. A request for a view that is in the
               registry but not loaded here yet starts its load at once (`load_soon`).
Failed loads:  a view version the engine could not load (after the registry committed it) is marked
               failed (`load_failures`): the admin API and /v1/models show it, its requests answer
               503 instead of "being loaded" forever, and each registry poll retries it; a later
               successful load (a fixed view, a restarted engine) clears the mark.

Every change of what the engine serves (admin publish, registry sync, on-demand load) runs under
one lock, so a sync that read the registry before an admin change cannot publish its older state
after that change was applied.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from .. import metrics
from ..core.views import ADAPTER_WEIGHTS, ORIGINAL_VIEW, ComposedView
from ..engine.adapters import AdapterManager, ViewVersion
from ..registry import NotFound, Registry, ViewChange, ViewInfo
from .errors import ViewLoadFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadFailure:
    """Why the engine could not load a view's version `content_hash`, and when."""

    content_hash: str
    error: str
    at: datetime


@dataclass(frozen=True, slots=True)
class LoadState:
    """A view on this server: whether a version of it is loaded (and which), and the error of its
    registry version's failed load (None: it did not fail)."""

    loaded: bool
    loaded_version: str | None
    load_error: str | None
    load_failed_at: datetime | None


class ViewPublisher:
    """Publishes the registry's views to one engine's adapters (see the module docstring)."""

    def __init__(self, registry: Registry, adapters: AdapterManager):
        self.registry = registry
        self.adapters = adapters
        self.load_failures: dict[str, LoadFailure] = {}  # view name → its failed version
        self._lock = asyncio.Lock()
        self._synced_revision: int | None = None
        self._loading: dict[str, asyncio.Task] = {}

    def failure(self, view: ViewInfo) -> LoadFailure | None:
        """Why the registry's current version of `view` failed to load here (None: it did not)."""
        failure = self.load_failures.get(view.name)
        return failure if failure is not None and failure.content_hash == view.content_hash else None

    def load_state(self, view: ViewInfo) -> LoadState:
        """Whether this engine serves `view`, and why not when its current version failed to load."""
        loaded, failure = self.adapters.current(view.name), self.failure(view)
        return LoadState(loaded is not None, None if loaded is None else loaded.version,
                         None if failure is None else failure.error, None if failure is None else failure.at)

    async def publish_changes(self, changes: Iterable[ViewChange]) -> list[str]:
        """Publish the new version of every changed view (the hot-swap). Returns their labels.
        Every view is tried; when any failed to load, raises ViewLoadFailed naming each (the
        registry keeps the change; the views are marked failed)."""
        labels, failed = [], []
        async with self._lock:
            for change in changes:
                try:
                    version = await self._load(change.view.composed, "swap" if change.previous is not None else "load")
                except Exception:
                    log.exception("could not load %s into the engine", change.view.name)
                    failed.append(change.view.name)
                else:
                    labels.append(version.label)
        if failed:
            raise _view_load_failed({name: self.load_failures[name] for name in failed})
        return labels

    async def unpublish(self, name: str) -> None:
        async with self._lock:
            await self.adapters.unpublish(name)
            self.load_failures.pop(name, None)

    async def sync(self, *, force: bool = False) -> bool:
        """Bring this engine in line with the registry: publish every view's current version,
        unpublish views that are gone. Skipped (one tiny query) while the registry's views revision
        is the one last synced, unless `force`. Returns whether it looked at the views.

        A view that fails to load is logged and retried on the next poll; the others still load."""
        revision = await asyncio.to_thread(self.registry.views_revision)
        if not force and revision == self._synced_revision:
            return False
        complete = True
        async with self._lock:
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

    def load_soon(self, name: str) -> None:
        """Load view `name` from the registry in the background (once at a time per view): a
        request found it in the registry, but this replica does not serve it (yet, or this version)."""
        if name in self._loading:
            return
        task = asyncio.get_running_loop().create_task(self._load_now(name), name=f"load-{name}")
        self._loading[name] = task
        task.add_done_callback(lambda _: self._loading.pop(name, None))

    def cancel_loads(self) -> None:
        """Cancel the on-demand loads in flight (the server is stopping)."""
        for task in self._loading.values():
            task.cancel()

    async def _load_now(self, name: str) -> None:
        try:
            async with self._lock:
                try:
                    view = await asyncio.to_thread(self.registry.get_view, name)
                except NotFound:
                    return
                label = await self._publish(view)
            if label is not None:
                log.info("loaded %s on demand", label)
        except Exception:
            log.exception("could not load view %s on demand", name)

    async def _publish(self, view: ViewInfo) -> str | None:
        """Make the registry's version of `view` the one this engine serves (a no-op when it is
        already). Its composed folder is recomposed here first if this data_dir lacks it.
        Call with the lock held. Returns the new version's label when one was published."""
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


def _view_load_failed(failures: dict[str, LoadFailure]) -> ViewLoadFailed:
    """The admin call's answer when the registry took a change but the engine could not load it."""
    listed = "; ".join(f"{name} ({failure.content_hash[:12]}): {failure.error}" for name, failure in failures.items())
    return ViewLoadFailed(f"The registry has the change, but the engine could not load {listed}. These views are "
                          "marked failed (GET /admin/views shows load_error) and their requests answer 503 until a "
                          "load succeeds: fix and redefine the view, or delete it.")
