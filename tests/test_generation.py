"""The request planning and shaping of serving.generation, on the tiny byte-level BPE tokenizer and a fake engine:
completion-token limits, prompt checks before decoding (off the event loop), logprobs blocks
(top-k by rank, exact bytes of multi-byte tokens), echo with max_tokens 0, task hygiene and the
SSE wrapper's status."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import pytest
from vllm.exceptions import VLLMValidationError
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput

from alter_serve.api.errors import as_openai_error
from alter_serve.api.streaming import sse_stream
from alter_serve.serving.generation import Generator, Outcome, gather_or_cancel
from alter_serve.serving.routing import Target
from alter_serve.serving.errors import InvalidRequest
from alter_serve.serving.tokens import TokenStrings
from alter_serve.serving.schemas import ChatCompletionRequest, CompletionRequest
from alter_serve.serving.limits import TenantLimiter
from alter_serve.registry import Limits, Principal

from .tiny_model import build_tokenizer

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
MULTIBYTE = "é€😀 hi"


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


class FakeEngine:
    """What Generator uses of VllmEngine. `outputs(ids, params)` makes the CompletionOutputs of a
    request; prompt logprobs rank the prompt token second behind token 5."""

    def __init__(self, tokenizer, max_model_len: int = 2048, outputs=None, fail: Exception | None = None):
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.outputs, self.fail = outputs, fail
        self.generated: list[tuple[list[int], object]] = []
        self.scored: list[list[int]] = []
        self.threads: set[str] = set()

    async def generate(self, ids, params, lora, cache_salt=None):
        self.generated.append((ids, params))
        if self.fail is not None:
            raise self.fail
        outs = self.outputs(ids, params) if self.outputs else [
            CompletionOutput(0, "ok", [40], None, None, finish_reason="length")]
        yield RequestOutput("r", None, ids, None, outs, finished=True)

    async def prompt_logprobs(self, ids, top_k, lora, cache_salt=None):
        self.scored.append(ids)
        return [None] + [{tid: Logprob(-2.0, rank=2), 5: Logprob(-0.1, rank=1), 6: Logprob(-3.0, rank=3)}
                         for tid in ids[1:]]


def lease():
    version = SimpleNamespace(label="original@base", version=None, lora=None)
    return SimpleNamespace(version=version, lora=None, release=lambda: None)


def target() -> Target:
    return Target("original", lease())


def principal(**limits) -> Principal:
    return Principal(1, "tenant", 1, "acme", frozenset({"original"}), "original", Limits(**limits))


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="original", messages=[{"role": "user", "content": "hello"}], **fields)


# ---- completion-token limits ---------------------------------------------------------------------
def test_a_limit_the_client_did_not_send_is_lowered_to_the_room_never_refused(tokenizer):
    """Cap 2048 on a 2048-token model, no max_tokens: runs (it was a 400 'context length')."""
    gen = Generator(FakeEngine(tokenizer, max_model_len=2048))
    body = chat()
    permit = TenantLimiter().admit(principal(max_tokens_cap=2048), body)
    assert body.token_limit is None  # the body is left as sent
    plan = asyncio.run(gen.plan_chat(body, permit.max_tokens))
    assert plan.params.max_tokens == 1024  # the chat default, within the cap and the room

    small = Generator(FakeEngine(tokenizer, max_model_len=64))
    plan = asyncio.run(small.plan_chat(chat(), TenantLimiter().admit(principal(max_tokens_cap=2048), chat()).max_tokens))
    assert plan.params.max_tokens == 64 - len(plan.prompts[0].ids)
    capped = asyncio.run(gen.plan_chat(chat(), TenantLimiter().admit(principal(max_tokens_cap=7), chat()).max_tokens))
    assert capped.params.max_tokens == 7


def test_a_default_limit_is_lowered_to_the_room_the_prompts_leave_in_the_budget(tokenizer):
    """Issue 18 §4: the budget counts prompt tokens too, so a body without max_tokens runs with what
    is left of the budget after its prompts, shared by its sequences (never a 400 for a default)."""
    gen = Generator(FakeEngine(tokenizer, max_model_len=2048))
    body = chat(n=2)
    permit = TenantLimiter().admit(principal(tokens_per_minute=300), body)
    assert (permit.max_tokens, permit.budget) == (150, 300)  # before tokenising: the budget over 2 sequences
    plan = asyncio.run(gen.plan_chat(body, permit.max_tokens, permit.budget))
    prompt = plan.prompt_tokens
    assert plan.max_tokens == (300 - prompt) // 2
    permit.reserve(plan.prompt_tokens, plan.max_tokens)  # fits the whole budget: no refusal
    assert permit.reservation <= 300
    sent = asyncio.run(gen.plan_chat(chat(max_tokens=200), None, 300))
    assert sent.max_tokens == 200  # a limit the client sent is the limiter's to refuse, not lowered
    two = asyncio.run(gen.plan_completion(CompletionRequest(model="m", prompt=[[10] * 40, [11] * 20]), None, 100))
    assert two.prompt_tokens == 60 and two.max_tokens == 16  # (100 - 60) // 2 = 20, above the default 16
    tight = asyncio.run(gen.plan_completion(CompletionRequest(model="m", prompt=[[10] * 40, [11] * 20]), None, 80))
    assert tight.max_tokens == 10


def test_completions_default_to_16_within_the_room_and_a_sent_limit_must_fit(tokenizer):
    gen = Generator(FakeEngine(tokenizer, max_model_len=20))
    ids = list(range(10, 22))  # 12 prompt tokens, 8 left
    plan = asyncio.run(gen.plan_completion(CompletionRequest(model="m", prompt=ids)))
    assert plan.params.max_tokens == 8
    roomy = Generator(FakeEngine(tokenizer))
    assert asyncio.run(roomy.plan_completion(CompletionRequest(model="m", prompt=ids))).params.max_tokens == 16
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(gen.plan_completion(CompletionRequest(model="m", prompt=ids, max_tokens=9)))
    assert (info.value.param, info.value.code) == ("max_tokens", "context_length_exceeded")


# ---- prompts: checked before decoding, tokenised off the event loop ------------------------------
def test_an_oversized_prompt_is_refused_before_anything_is_decoded(tokenizer, monkeypatch):
    gen = Generator(FakeEngine(tokenizer, max_model_len=2048))
    monkeypatch.setattr(gen.tokens, "pieces", lambda *a, **k: pytest.fail("decoded an oversized prompt"))
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(gen.plan_completion(CompletionRequest(model="m", prompt=[100] * 2048, echo=True, logprobs=1)))
    assert (info.value.param, info.value.code) == ("prompt", "context_length_exceeded")


def test_a_huge_text_prompt_is_refused_without_tokenising_it(tokenizer):
    gen = Generator(FakeEngine(tokenizer, max_model_len=2048))
    calls = []
    gen.planner.tokenizer = lambda *a, **k: calls.append(1)
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(gen.plan_completion(CompletionRequest(model="m", prompt="hello world " * 600_000)))
    assert info.value.code == "context_length_exceeded" and "at least" in info.value.message and not calls


def test_prompts_are_tokenised_in_a_worker_thread_and_decoded_only_for_echo(tokenizer):
    engine = FakeEngine(tokenizer)
    gen = Generator(engine)
    real = gen.planner.tokenizer

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def __len__(self):
            return len(real)

        def __call__(self, *args, **kwargs):
            engine.threads.add(threading.current_thread().name)
            assert not kwargs.get("return_offsets_mapping")  # offsets only for echo + logprobs
            return real(*args, **kwargs)

    gen.planner.tokenizer = Spy()
    for prompt in ("hello", [5, 6, 7]):
        plan = asyncio.run(gen.plan_completion(CompletionRequest(model="m", prompt=prompt)))
        assert (plan.prompts[0].text, plan.prompts[0].offsets) == (None, None)
    assert engine.threads and threading.main_thread().name not in engine.threads
    plan = asyncio.run(gen.plan_chat(chat()))
    assert plan.prompts[0].text is None and threading.main_thread().name not in engine.threads


def test_a_lone_surrogate_is_a_400_not_a_tokenizer_crash(tokenizer):
    gen = Generator(FakeEngine(tokenizer))
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(gen.plan_completion(CompletionRequest(model="m", prompt="a\ud800b")))
    assert info.value.param == "prompt"


# ---- tokens as text ------------------------------------------------------------------------------
def test_multi_byte_tokens_have_exact_bytes_distinct_strings_and_pieces_that_join_to_the_text(tokenizer):
    strings = TokenStrings(tokenizer)
    ids = tokenizer(MULTIBYTE)["input_ids"]
    assert {tokenizer.decode([i]) for i in ids[:2]} == {"\ufffd"}  # why decoding alone is not enough
    assert b"".join(strings.bytes(i) for i in ids) == MULTIBYTE.encode()
    assert strings.display(ids[0]) == "bytes:\\xc3" and strings.display(ids[-1]) == "i"
    assert len({strings.display(i) for i in ids}) == len(set(ids))
    pieces = strings.pieces(ids)
    assert "".join(pieces) == MULTIBYTE and pieces[:2] == ["", "é"]
    added = tokenizer.convert_tokens_to_ids("</s>")
    assert strings.bytes(added) == b"</s>"


def test_echo_of_a_token_prompt_is_its_decoded_text_with_exact_offsets(tokenizer):
    gen = Generator(FakeEngine(tokenizer))
    ids = tokenizer(MULTIBYTE)["input_ids"]
    body = CompletionRequest(model="m", prompt=ids, echo=True, logprobs=1, max_tokens=0)
    plan = asyncio.run(gen.plan_completion(body))
    prompt = plan.prompts[0]
    assert prompt.text == MULTIBYTE == tokenizer.decode(ids)
    block = gen.prompt_logprobs_block(prompt, [None] + [{t: Logprob(-1.0, rank=1)} for t in ids[1:]], 1)
    assert "".join(block["tokens"]) == MULTIBYTE
    assert [MULTIBYTE[o:o + len(t)] for o, t in zip(block["text_offset"], block["tokens"])] == block["tokens"]


# ---- logprobs blocks -----------------------------------------------------------------------------
def _entry():
    # The sampled token 9 ranks 4th; vLLM adds it to the top 3 it was asked for.
    return {9: Logprob(-4.0, rank=4), 7: Logprob(-0.5, rank=1), 8: Logprob(-1.5, rank=3), 6: Logprob(-1.0, rank=2)}


def test_chat_top_logprobs_are_exactly_the_k_best_by_rank(tokenizer):
    gen = Generator(FakeEngine(tokenizer))
    block = gen.chat_logprobs_block([9], [_entry()], 3)["content"][0]
    assert block["logprob"] == -4.0 and block["token"] == gen.tokens.display(9)
    assert [t["logprob"] for t in block["top_logprobs"]] == [-0.5, -1.0, -1.5]  # the sampled one is not in the top 3
    assert [t["logprob"] for t in gen.chat_logprobs_block([9], [_entry()], 2)["content"][0]["top_logprobs"]] == [-0.5, -1.0]
    assert gen.chat_logprobs_block([9], [{9: Logprob(-4.0, rank=4)}], 0)["content"][0]["top_logprobs"] == []


def test_chat_logprobs_bytes_are_the_tokens_own(tokenizer):
    gen = Generator(FakeEngine(tokenizer))
    ids = tokenizer("é")["input_ids"]
    content = gen.chat_logprobs_block(ids, [{t: Logprob(-1.0, rank=1)} for t in ids], 0)["content"]
    assert [b for c in content for b in c["bytes"]] == list("é".encode())
    assert all(c["bytes"] != [239, 191, 189] for c in content)


def test_completion_top_logprobs_are_the_k_best_and_the_chosen_one(tokenizer):
    gen = Generator(FakeEngine(tokenizer))
    block = gen.completion_logprobs_block([9], [_entry()], 2, 0)
    top = block["top_logprobs"][0]
    assert list(top.values()) == [-0.5, -1.0, -4.0]  # best first; the chosen token as well (OpenAI: up to k + 1)
    assert block["tokens"] == [gen.tokens.pieces([9])[0]] and block["token_logprobs"] == [-4.0]
    assert list(gen.completion_logprobs_block([7], [_entry()], 0, 0)["top_logprobs"][0].values()) == [-0.5]


# ---- echo with max_tokens 0, greedy n > 1, engine errors -----------------------------------------
def test_echo_with_max_tokens_0_returns_the_scored_prompt_and_generates_nothing(tokenizer):
    engine = FakeEngine(tokenizer)
    gen = Generator(engine)
    body = CompletionRequest(model="m", prompt="hello world", echo=True, logprobs=1, max_tokens=0, n=2)
    plan = asyncio.run(gen.plan_completion(body))
    assert plan.params is None
    out = asyncio.run(gen.completion(body, plan, target(), Outcome("cmpl-1")))
    assert engine.generated == [] and len(engine.scored) == 1
    assert [c["index"] for c in out["choices"]] == [0, 1]
    choice = out["choices"][0]
    assert choice["text"] == "hello world" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == "hello world" and lp["token_logprobs"][0] is None
    assert all(v == -2.0 for v in lp["token_logprobs"][1:])
    assert all(len(top) == 2 for top in lp["top_logprobs"][1:])  # the best (token 5) and the prompt's own
    assert out["usage"] == {"prompt_tokens": len(plan.prompts[0].ids), "completion_tokens": 0,
                            "total_tokens": len(plan.prompts[0].ids)}

    stream_body = CompletionRequest(model="m", prompt="hello world", echo=True, max_tokens=0, stream=True)
    events = asyncio.run(_collect(gen.completion_stream(stream_body, asyncio.run(gen.plan_completion(stream_body)),
                                                        target(), Outcome("cmpl-2"))))
    assert [json.loads(e[6:])["choices"][0]["text"] for e in events] == ["hello world"]


def test_greedy_with_n_above_1_is_top_1_sampling(tokenizer):
    gen = Generator(FakeEngine(tokenizer))
    params = asyncio.run(gen.plan_completion(CompletionRequest(model="m", prompt="hi", temperature=0, n=3))).params
    assert (params.n, params.top_k, params.temperature) == (3, 1, 1.0)
    single = asyncio.run(gen.plan_completion(CompletionRequest(model="m", prompt="hi", temperature=0))).params
    assert single.temperature == 0.0


def test_an_error_vllm_blames_on_the_request_is_a_400(tokenizer):
    gen = Generator(FakeEngine(tokenizer, fail=VLLMValidationError("Token id 999 is out of vocabulary", parameter="prompt")))
    body = CompletionRequest(model="m", prompt="hi")
    with pytest.raises(VLLMValidationError) as info:
        asyncio.run(gen.completion(body, asyncio.run(gen.plan_completion(body)), target(), Outcome("c")))
    error = as_openai_error(info.value)
    assert (error.status, error.param, error.type) == (400, "prompt", "invalid_request_error")

    finished = []
    stream_body = CompletionRequest(model="m", prompt="hi", stream=True)
    events = asyncio.run(_collect(sse_stream(
        gen.completion_stream(stream_body, asyncio.run(gen.plan_completion(stream_body)), target(), Outcome("c")),
        lambda status, _: finished.append(status))))
    assert finished == [400] and json.loads(events[-1][6:])["error"]["type"] == "invalid_request_error"


# ---- task hygiene --------------------------------------------------------------------------------
def test_a_failing_prompt_cancels_and_awaits_its_siblings():
    async def scenario():
        ended = []

        async def slow():
            try:
                await asyncio.sleep(60)
            finally:
                await asyncio.sleep(0.01)  # an abort takes a moment
                ended.append("slow")

        async def failing():
            await asyncio.sleep(0.01)
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await gather_or_cancel([slow(), failing()])
        assert ended == ["slow"]  # ended before the failure reached the caller (who releases the lease)

    asyncio.run(scenario())


def test_merged_streams_are_aborted_before_the_stream_closes(tokenizer):
    class Endless(FakeEngine):
        aborted = 0

        async def generate(self, ids, params, lora, cache_salt=None):
            out = CompletionOutput(0, "x", [40], None, None)
            try:
                while True:
                    yield RequestOutput("r", None, ids, None, [out], finished=False)
                    await asyncio.sleep(0.001)
            finally:
                await asyncio.sleep(0.01)
                Endless.aborted += 1

    async def scenario():
        gen = Generator(Endless(tokenizer))
        body = CompletionRequest(model="m", prompt=["a", "b"], stream=True, max_tokens=100)
        stream = gen.completion_stream(body, await gen.plan_completion(body), target(), Outcome("c"))
        await stream.__anext__()
        await stream.aclose()
        assert Endless.aborted == 2

    asyncio.run(scenario())


def test_a_stream_closed_mid_send_finishes_as_499_after_closing_its_source():
    async def scenario():
        closed, finished = [], []

        async def events():
            try:
                yield "data: 1\n\n"
                yield "data: 2\n\n"
            finally:
                closed.append(True)

        stream = sse_stream(events(), lambda status, _: finished.append((status, closed[:])))
        await stream.__anext__()
        await stream.aclose()  # the client left while the first chunk was being sent
        assert finished == [(499, [True])]

    asyncio.run(scenario())


async def _collect(stream) -> list[str]:
    return [event async for event in stream if event != "data: [DONE]\n\n"]
