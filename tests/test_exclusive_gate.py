"""ExclusiveGate: a scoring call (exclusive) never overlaps generation (shared), is not starved, and
neither waits unboundedly nor leaves the queue behind it blocked; the engine holds the shared side
while a request is in the engine, not while its reader is slow."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from vllm import SamplingParams

from alter_serve.api.errors import as_openai_error
from alter_serve.serving.schemas import MAX_LOGPROBS, MAX_TOP_LOGPROBS
from alter_serve.engine import vllm_engine
from alter_serve.engine.config import EngineConfig
from alter_serve.engine.vllm_engine import EngineUnavailable, ExclusiveGate, VllmEngine

from .tiny_model import build_tokenizer


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


def test_a_cancelled_scoring_waiter_lets_the_requests_queued_behind_it_in():
    async def scenario():
        gate, release = ExclusiveGate(), asyncio.Event()
        admitted = asyncio.Event()

        async def long_stream():
            async with gate.shared():
                await release.wait()

        async def scoring():
            async with gate.exclusive():
                pass

        async def newcomer():
            async with gate.shared():
                admitted.set()

        holder = asyncio.create_task(long_stream())
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(scoring())
        await asyncio.sleep(0.01)
        queued = asyncio.create_task(newcomer())
        await asyncio.sleep(0.01)
        assert not admitted.is_set()  # behind the waiting scoring call
        waiter.cancel()
        await asyncio.wait_for(admitted.wait(), 1)  # woken by the cancelled waiter, not by the stream's end
        release.set()
        await asyncio.gather(holder, queued, return_exceptions=True)

    asyncio.run(scenario())


def test_a_scoring_call_that_cannot_get_the_engine_in_time_is_a_503_and_unblocks_the_queue():
    async def scenario():
        gate, release = ExclusiveGate(exclusive_wait_s=0.1, retry_after_s=3), asyncio.Event()

        async def long_stream():
            async with gate.shared():
                await release.wait()

        async def newcomer():
            async with gate.shared():
                return "in"

        holder = asyncio.create_task(long_stream())
        await asyncio.sleep(0.01)
        with pytest.raises(EngineUnavailable) as info:
            async with gate.exclusive():
                pass
        assert info.value.retry_after_s == 3 and "echo + logprobs" in str(info.value)
        assert as_openai_error(info.value).status == 503
        assert as_openai_error(info.value).headers == {"Retry-After": "3"}
        assert await asyncio.wait_for(newcomer(), 1) == "in"
        release.set()
        await holder

    asyncio.run(scenario())


# ---- the engine's use of the gate, with a fake vLLM ---------------------------------------------
class FakeLLM:
    """Stands in for AsyncLLM.generate: `n` outputs per request; `hold` pauses generation after the
    first output until it is set."""

    errored = False

    def __init__(self, n: int = 5, hold: asyncio.Event | None = None):
        self.n, self.hold = n, hold
        self.model_config = SimpleNamespace(max_model_len=2048)
        self.in_engine = 0
        self.aborted = 0
        self.beside_scoring: list[int] = []

    async def generate(self, prompt, params, request_id, lora_request=None):
        self.in_engine += 1
        try:
            if params.prompt_logprobs:
                self.beside_scoring.append(self.in_engine - 1)
                yield SimpleNamespace(prompt_logprobs=[None] * len(prompt["prompt_token_ids"]), finished=True)
                return
            for i in range(self.n):
                if self.hold is not None and i > 0:
                    await self.hold.wait()
                await asyncio.sleep(0)
                yield SimpleNamespace(index=i, finished=i == self.n - 1)
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted += 1
            raise
        finally:
            self.in_engine -= 1


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(folder)
    return folder


def fake_engine(tokenizer_dir, llm: FakeLLM, gate: ExclusiveGate | None) -> VllmEngine:
    engine = VllmEngine(EngineConfig(), tokenizer_dir)
    engine._llm, engine.state, engine._gate = llm, "ready", gate
    return engine


def test_a_slow_reader_does_not_hold_the_engine_once_its_request_has_finished(tokenizer_dir):
    async def scenario():
        llm = FakeLLM(n=5)
        engine = fake_engine(tokenizer_dir, llm, ExclusiveGate(exclusive_wait_s=5))
        stream = engine.generate([1, 2, 3], SamplingParams(max_tokens=5), None)
        first = await stream.__anext__()
        # The reader stalls here (a slow client); the engine finishes the request meanwhile, so a
        # scoring call gets the engine at once, and alone.
        await asyncio.wait_for(engine.prompt_logprobs([1, 2, 3], 1, None), 2)
        assert llm.beside_scoring == [0]
        rest = [output.index async for output in stream]
        assert (first.index, rest) == (0, [1, 2, 3, 4])

    asyncio.run(scenario())


def test_scoring_never_shares_the_engine_and_closing_a_stream_aborts_its_request(tokenizer_dir):
    async def scenario():
        hold = asyncio.Event()
        llm = FakeLLM(n=3, hold=hold)
        gate = ExclusiveGate(exclusive_wait_s=5)
        engine = fake_engine(tokenizer_dir, llm, gate)
        streams = [engine.generate([1, 2], SamplingParams(max_tokens=3), None) for _ in range(2)]
        assert [(await s.__anext__()).index for s in streams] == [0, 0]
        scoring = asyncio.create_task(engine.prompt_logprobs([1, 2], 1, None))
        await asyncio.sleep(0.01)
        assert not scoring.done() and llm.in_engine == 2  # waits for the two requests in the engine
        await streams[0].aclose()  # the client left: aborted, and out of the engine when aclose returns
        assert llm.aborted == 1 and llm.in_engine == 1 and not scoring.done()
        hold.set()
        assert [o.index async for o in streams[1]] == [1, 2]
        await asyncio.wait_for(scoring, 2)
        assert llm.beside_scoring == [0] and llm.in_engine == 0 and gate._shared == 0

    asyncio.run(scenario())


def test_without_the_fault_there_is_no_gate(tokenizer_dir, monkeypatch):
    monkeypatch.setattr(vllm_engine, "_prompt_logprobs_must_run_alone", lambda: False)
    assert VllmEngine(EngineConfig(), tokenizer_dir)._gate is None
    monkeypatch.setattr(vllm_engine, "_prompt_logprobs_must_run_alone", lambda: True)
    assert VllmEngine(EngineConfig(), tokenizer_dir)._gate is not None

    async def scenario():
        llm = FakeLLM(n=2, hold=asyncio.Event())
        engine = fake_engine(tokenizer_dir, llm, None)
        stream = engine.generate([1, 2], SamplingParams(max_tokens=2), None)
        assert (await stream.__anext__()).index == 0
        await asyncio.wait_for(engine.prompt_logprobs([1, 2], 1, None), 1)  # beside a running request
        assert llm.beside_scoring == [1]
        await stream.aclose()
        assert llm.in_engine == 0 and llm.aborted == 1

    asyncio.run(scenario())


def test_the_engine_allows_as_many_logprobs_as_the_api(tokenizer_dir, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # engine_args would set it for the process
    args = VllmEngine(EngineConfig(), tokenizer_dir).engine_args()
    assert args.max_logprobs == vllm_engine.MAX_LOGPROBS
    assert MAX_TOP_LOGPROBS <= vllm_engine.MAX_LOGPROBS and MAX_LOGPROBS <= vllm_engine.MAX_LOGPROBS
