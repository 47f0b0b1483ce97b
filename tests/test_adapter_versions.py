"""AdapterManager bookkeeping: leases pin a version, swaps retire, drained versions leave the engine.

The engine here is a recorder of add/remove calls: these tests are about which LoRA ids are live,
not about inference (the live-server tests cover that against real vLLM).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from alter_serve.core.views import ComposedView
from alter_serve.engine.adapters import AdapterManager


class RecordingEngine:
    def __init__(self):
        self.loaded: dict[int, str] = {}

    async def add_lora(self, lora) -> None:
        self.loaded[lora.lora_int_id] = lora.lora_name

    async def remove_lora(self, lora_int_id: int) -> None:
        self.loaded.pop(lora_int_id)


def composed(view: str, digest: str) -> ComposedView:
    return ComposedView(view, digest * 8, Path("/nonexistent") / digest)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_lease_keeps_old_version_until_drained():
    async def scenario():
        engine = RecordingEngine()
        manager = AdapterManager(engine)
        v1 = await manager.publish(composed("bio", "a"))
        lease = manager.acquire("bio")
        v2 = await manager.publish(composed("bio", "b"))
        await settle()
        assert manager.acquire("bio").version is v2
        assert set(engine.loaded) == {v1.lora.lora_int_id, v2.lora.lora_int_id}  # v1 still in use
        lease.release()
        lease.release()  # idempotent
        await settle()
        assert set(engine.loaded) == {v2.lora.lora_int_id}
        assert manager.draining == 0

    asyncio.run(scenario())


def test_swap_back_while_draining_revives_the_same_lora():
    async def scenario():
        engine = RecordingEngine()
        manager = AdapterManager(engine)
        a1 = await manager.publish(composed("bio", "a"))
        lease = manager.acquire("bio")
        await manager.publish(composed("bio", "b"))
        a2 = await manager.publish(composed("bio", "a"))  # back to a's weights before a drained
        assert a2 is a1 and not a2.retired
        assert sorted(engine.loaded.values()).count(a1.lora.lora_name) == 1
        lease.release()
        await settle()
        assert a1.lora.lora_int_id in engine.loaded  # current again: never removed

    asyncio.run(scenario())


def test_new_content_always_gets_a_new_id():
    async def scenario():
        manager = AdapterManager(RecordingEngine())
        ids = [(await manager.publish(composed("bio", d))).lora.lora_int_id for d in "abcd"]
        assert len(set(ids)) == 4
        assert (await manager.publish(composed("bio", "d"))).lora.lora_int_id == ids[-1]  # same content: no-op

    asyncio.run(scenario())


def test_a_shared_short_hash_is_not_the_same_content():
    """Two contents whose hashes share the 12-digit prefix (the `view@prefix` LoRA name) are
    different versions: a swap between them is not a no-op, and never revives the other's LoRA."""
    first, second = "a" * 64, "a" * 12 + "b" * 52
    assert ComposedView("bio", first, Path("/x")).lora_name == ComposedView("bio", second, Path("/y")).lora_name

    async def scenario():
        engine = RecordingEngine()
        manager = AdapterManager(engine)
        v1 = await manager.publish(ComposedView("bio", first, Path("/x")))
        # Same name in vLLM (LoRARequest equality is by name) but other weights: refused, v1 stays.
        with pytest.raises(ValueError, match="short hashes collide"):
            await manager.publish(ComposedView("bio", second, Path("/y")))
        assert manager.current("bio") is v1 and len(engine.loaded) == 1

        lease = manager.acquire("bio")
        await manager.publish(composed("bio", "c"))  # v1 retired, draining under the lease
        with pytest.raises(ValueError, match="short hashes collide"):
            await manager.publish(ComposedView("bio", second, Path("/y")))  # must not revive v1
        lease.release()
        await settle()
        v3 = await manager.publish(ComposedView("bio", second, Path("/y")))  # v1 drained: a fresh LoRA
        assert v3 is not v1 and v3.content_hash == second and v3.lora.lora_int_id not in (v1.lora.lora_int_id,)
        assert v3.lora.lora_path == "/y"
        again = await manager.publish(ComposedView("bio", second, Path("/y")))
        assert again is v3  # identical full hash: a no-op

    asyncio.run(scenario())
