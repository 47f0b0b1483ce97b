"""Which LoRA version serves each view, with hot-swap and drain.

Each published view version gets a fresh `lora_int_id` (vLLM caches adapters by id, so an id is
never reused for other weights) and the name `view@hash[:12]`. A request takes a *lease* on the
view's current version and keeps it until it finishes, so a swap never changes the weights under a
running request. A replaced version is removed from the engine when its last lease ends.

Whether two versions hold the same weights is decided on the full content hash, never on the
12-digit prefix in the name: a prefix match is not proof of equal content.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field

from vllm.lora.request import LoRARequest

from ..core.views import ComposedView, ORIGINAL_VIEW
from .vllm_engine import VllmEngine

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ViewVersion:
    """One loaded version of a view. `lora` is None for the original (base) model.
    `version` is the short hash for labels; `content_hash` the full one (None for the original)."""

    view: str
    version: str
    lora: LoRARequest | None
    content_hash: str | None = None
    active: int = 0
    retired: bool = False

    @property
    def label(self) -> str:
        return f"{self.view}@{self.version}"


@dataclass(eq=False)
class Lease:
    """Held by one request for its whole life; `release` is idempotent."""

    version: ViewVersion
    _manager: "AdapterManager" = field(repr=False)
    _released: bool = False

    @property
    def lora(self) -> LoRARequest | None:
        return self.version.lora

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._manager._release(self.version)


class UnknownView(KeyError):
    pass


class AdapterManager:
    """Maps view name → current ViewVersion; publishes, swaps and drains LoRAs in the engine."""

    def __init__(self, engine: VllmEngine):
        self.engine = engine
        self._ids = itertools.count(1)
        self._current: dict[str, ViewVersion] = {ORIGINAL_VIEW: ViewVersion(ORIGINAL_VIEW, "base", None)}
        self._retired: set[ViewVersion] = set()
        self._lock = asyncio.Lock()
        self._drops: set[asyncio.Task] = set()

    def current(self, view: str) -> ViewVersion | None:
        return self._current.get(view)

    def loaded(self) -> dict[str, ViewVersion]:
        return dict(self._current)

    @property
    def draining(self) -> int:
        return len(self._retired)

    def served_hashes(self) -> set[str]:
        """Content hashes of every version loaded in the engine, current or draining: their
        composed folders must stay (the engine may read an adapter again from disk)."""
        return {v.content_hash for v in [*self._current.values(), *self._retired] if v.content_hash is not None}

    async def publish(self, composed: ComposedView) -> ViewVersion:
        """Make `composed` the version new requests of its view get. Loads it into the engine first."""
        async with self._lock:
            old = self._current.get(composed.name)
            if old is not None and old.content_hash == composed.content_hash:
                return old
            new = self._revive(composed)
            if new is None:
                self._check_name_free(composed)
                # vLLM caches adapters by int id and matches them by name: one name, one id, ever loaded once.
                lora = LoRARequest(composed.lora_name, next(self._ids), str(composed.path))
                await self.engine.add_lora(lora)
                new = ViewVersion(composed.name, composed.version, lora, composed.content_hash)
            self._current[composed.name] = new
            if old is not None:
                self._retire(old)
            log.info("published %s (lora id %d)", new.label, new.lora.lora_int_id)
            return new

    def _revive(self, composed: ComposedView) -> ViewVersion | None:
        """A still-draining version of this view with this exact content (a swap back before it drained)."""
        for version in self._retired:
            if version.view == composed.name and version.content_hash == composed.content_hash:
                self._retired.discard(version)
                version.retired = False
                return version
        return None

    def _check_name_free(self, composed: ComposedView) -> None:
        """vLLM tells LoRAs apart by name (LoRARequest equality), so a live version of other content
        under the same `view@prefix` name must not coexist with this one (a 48-bit prefix collision)."""
        for version in [*self._current.values(), *self._retired]:
            if version.lora is not None and version.lora.lora_name == composed.lora_name:
                raise ValueError(f"LoRA name {composed.lora_name} is already loaded for other content "
                                 f"({version.content_hash} vs {composed.content_hash}); the short hashes "
                                 "collide, so this version cannot be published until that one drains")

    async def unpublish(self, view: str) -> None:
        async with self._lock:
            old = self._current.pop(view, None)
            if old is not None and old.lora is not None:
                self._retire(old)

    def acquire(self, view: str) -> Lease:
        version = self._current.get(view)
        if version is None:
            raise UnknownView(view)
        version.active += 1
        return Lease(version, self)

    # ---- draining ---------------------------------------------------------------------------
    def _retire(self, version: ViewVersion) -> None:
        version.retired = True
        self._retired.add(version)
        if version.active == 0:
            self._schedule_drop(version)

    def _release(self, version: ViewVersion) -> None:
        version.active -= 1
        if version.retired and version.active == 0:
            self._schedule_drop(version)

    def _schedule_drop(self, version: ViewVersion) -> None:
        task = asyncio.get_running_loop().create_task(self._drop(version))
        self._drops.add(task)
        task.add_done_callback(self._drops.discard)

    async def _drop(self, version: ViewVersion) -> None:
        if not version.retired:  # revived by a swap back before this ran
            return
        self._retired.discard(version)
        if version.lora is not None:
            try:
                await self.engine.remove_lora(version.lora.lora_int_id)
            except Exception:  # engine restarting: it forgets the id anyway
                log.warning("could not remove %s from the engine", version.label, exc_info=True)
        log.info("dropped drained version %s", version.label)
