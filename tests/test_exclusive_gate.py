"""ExclusiveGate: a scoring call (exclusive) never overlaps generation (shared), and is not starved."""

from __future__ import annotations

import asyncio

from alter_serve.engine.vllm_engine import ExclusiveGate


def test_exclusive_waits_for_shared_and_blocks_new_shared():
    async def scenario():
        gate, log, active = ExclusiveGate(), [], {"shared": 0, "exclusive": 0}

        async def shared(name: str, hold: float):
            async with gate.shared():
                active["shared"] += 1
                assert active["exclusive"] == 0
                log.append(f"+{name}")
                await asyncio.sleep(hold)
                active["shared"] -= 1

        async def exclusive():
            async with gate.exclusive():
                active["exclusive"] += 1
                assert active["shared"] == 0
                log.append("+X")
                await asyncio.sleep(0.02)
                active["exclusive"] -= 1

        first = [asyncio.create_task(shared(f"a{i}", 0.05)) for i in range(3)]
        await asyncio.sleep(0.01)
        scoring = asyncio.create_task(exclusive())
        await asyncio.sleep(0.01)
        late = asyncio.create_task(shared("late", 0.0))
        await asyncio.gather(*first, scoring, late)
        assert log.index("+X") == 3 and log[-1] == "+late"  # after the first three, before the late one

    asyncio.run(scenario())
