"""Running a planned request on the engine, and its outputs as OpenAI responses.

A request arrives here planned (`planning.Plan`: its tokenised prompts and SamplingParams) and
routed (`routing.Target`: a lease on the view version that serves it, its experiment arm and its
tenant's prefix-cache partition). The generator runs it on the engine with the lease's
LoRARequest and shapes the outputs: a completion or chat completion object, or, streamed, the
server-sent events of its chunks (built from templates, see `ChunkFrame`). No HTTP here: the API
layer frames the stream and answers errors (`api.streaming`).

Tokens as text (completions `tokens`, chat `token` and `bytes`) come from `tokens.TokenStrings`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vllm import SamplingParams

from ..engine.vllm_engine import VllmEngine, cancel_and_wait
from .planning import Plan, Planner, Prompt
from .routing import Target
from .schemas import ChatCompletionRequest, CompletionRequest
from .tokens import TokenStrings, utf8_decoder

T = TypeVar("T")


@dataclass
class Outcome:
    """What the request produced, for metrics and the request log."""

    response_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    started: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))  # one timestamp for every chunk, as OpenAI

    def first_token(self) -> None:
        """Record the time to first token, once: called on every engine output, kept on the first."""
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.started


def _ranked(entry: dict) -> list[tuple[int, Any]]:
    """A position's logprobs (token id → vLLM Logprob), best rank first."""
    return sorted(entry.items(), key=lambda item: (item[1].rank if item[1].rank is not None else 1 << 62,
                                                   -item[1].logprob))



class Generator:
    """Plans, runs and shapes completions and chat completions for one engine and its tokenizer."""

    def __init__(self, engine: VllmEngine):
        self.engine = engine
        self.tokens = TokenStrings(engine.tokenizer)
        self.planner = Planner(engine, self.tokens)

    async def plan_completion(self, body: CompletionRequest, limit: int | None = None,
                              budget: int | None = None) -> Plan:
        """`Planner.plan_completion`: tokenise and check before any response starts."""
        return await self.planner.plan_completion(body, limit, budget)

    async def plan_chat(self, body: ChatCompletionRequest, limit: int | None = None,
                        budget: int | None = None) -> Plan:
        """`Planner.plan_chat`: render, tokenise and check before any response starts."""
        return await self.planner.plan_chat(body, limit, budget)

    # ---- logprobs ---------------------------------------------------------------------------
    def _legacy_top(self, entry: dict, k: int, token_id: int) -> dict[str, float]:
        """Completions `top_logprobs` at one position: the `k` most likely tokens and the chosen one
        (so up to k + 1, as OpenAI's legacy API), best first; a string shown by two ids keeps the better."""
        top: dict[str, float] = {}
        for tid, lp in _ranked(entry):
            if tid == token_id or (lp.rank is not None and lp.rank <= k):
                top.setdefault(self.tokens.display(tid), lp.logprob)
        return top

    def prompt_logprobs_block(self, prompt: Prompt, plps: list[dict | None], k: int) -> dict:
        token_logprobs, top = [None], [None]
        for tid, entry in zip(prompt.ids[1:], plps[1:]):
            token_logprobs.append(entry[tid].logprob)
            top.append(self._legacy_top(entry, k, tid))
        return {"tokens": self.tokens.pieces(prompt.ids), "token_logprobs": token_logprobs,
                "top_logprobs": top, "text_offset": list(prompt.offsets)}

    def completion_logprobs_block(self, token_ids, logprobs, k: int, start_offset: int, decoder=None) -> dict:
        """`decoder` carries a character split across stream chunks (one per choice)."""
        pieces = self.tokens.pieces(token_ids, decoder)
        values, top, offsets, at = [], [], [], start_offset
        for tid, entry, piece in zip(token_ids, logprobs or [], pieces):
            values.append(entry[tid].logprob)
            top.append(self._legacy_top(entry, k, tid))
            offsets.append(at)
            at += len(piece)
        return {"tokens": pieces[:len(values)], "token_logprobs": values, "top_logprobs": top, "text_offset": offsets}

    def _chat_token(self, token_id: int, logprob: float) -> dict:
        return {"token": self.tokens.display(token_id), "logprob": logprob, "bytes": list(self.tokens.bytes(token_id))}

    def chat_logprobs_block(self, token_ids, logprobs, k: int) -> dict:
        """Chat `logprobs`: per token, its own entry and exactly the `k` most likely (by rank), so the
        chosen token is among them only when it ranks within k."""
        content = []
        for tid, entry in zip(token_ids, logprobs or []):
            content.append({**self._chat_token(tid, entry[tid].logprob),
                            "top_logprobs": [self._chat_token(t, lp.logprob) for t, lp in _ranked(entry)[:k]]})
        return {"content": content}

    # ---- completions ------------------------------------------------------------------------
    async def _prompt_logprobs(self, body: CompletionRequest, prompt: Prompt, target: Target) -> dict | None:
        if not (body.echo and body.logprobs is not None):
            return None
        plps = await self.engine.prompt_logprobs(prompt.ids, body.logprobs, target.lease.lora, target.cache_salt)
        return self.prompt_logprobs_block(prompt, plps, body.logprobs)

    def _completion_choice(self, body: CompletionRequest, index: int, prompt: Prompt, echo_block: dict | None,
                           output) -> dict:
        """One choice; `output` None: echo only (max_tokens 0)."""
        echoed = prompt.text if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            logprobs = echo_block
            if output is not None:
                block = self.completion_logprobs_block(output.token_ids, output.logprobs, body.logprobs, len(echoed))
                logprobs = {k: echo_block[k] + block[k] for k in block} if echo_block is not None else block
        if output is None:
            return {"index": index, "text": echoed, "logprobs": logprobs, "finish_reason": "length"}
        return {"index": index, "text": echoed + output.text, "logprobs": logprobs,
                "finish_reason": output.finish_reason}

    async def completion(self, body: CompletionRequest, plan: Plan, target: Target, outcome: Outcome) -> dict:
        async def one(prompt: Prompt):
            echo_block = await self._prompt_logprobs(body, prompt, target)
            final = None
            if plan.params is not None:
                async for final in self.engine.generate(prompt.ids, plan.params, target.lease.lora, target.cache_salt):
                    pass
            return echo_block, final

        results = await gather_or_cancel([one(p) for p in plan.prompts])
        choices = []
        for i, (prompt, (echo_block, final)) in enumerate(zip(plan.prompts, results)):
            if final is None:
                choices += [self._completion_choice(body, i * body.n + j, prompt, echo_block, None) for j in range(body.n)]
                continue
            for output in sorted(final.outputs, key=lambda o: o.index):
                choices.append(self._completion_choice(body, i * body.n + output.index, prompt, echo_block, output))
                outcome.completion_tokens += len(output.token_ids)
        outcome.prompt_tokens = sum(len(p.ids) for p in plan.prompts)
        return {"id": outcome.response_id, "object": "text_completion", "created": outcome.created,
                "model": target.model, "system_fingerprint": target.fingerprint, "choices": choices,
                "usage": usage(outcome)}

    async def completion_stream(self, body: CompletionRequest, plan: Plan, target: Target,
                                outcome: Outcome) -> AsyncIterator[str]:
        prompts, params = plan.prompts, plan.params
        outcome.prompt_tokens = sum(len(p.ids) for p in prompts)
        echoes = [await self._prompt_logprobs(body, p, target) for p in prompts]
        frame = ChunkFrame(outcome, "text_completion", target, body.continuous_usage)
        plain = body.logprobs is None and not body.echo  # the common case: text only, built from a template
        streams: dict[int, _ChoiceStream] = {}

        def render(prompt_index: int, output) -> str:
            index = prompt_index * body.n + output.index
            outcome.completion_tokens += len(output.token_ids)
            if plain:
                return frame.event(text_choice(index, output.text, output.finish_reason))
            choice = streams.get(index)
            text = output.text
            first = choice is None
            if first:  # the first chunk of this choice carries the echo
                choice = streams[index] = _ChoiceStream(len(prompts[prompt_index].text) if body.echo else 0)
                text = (prompts[prompt_index].text if body.echo else "") + text
            logprobs = None
            if body.logprobs is not None:
                logprobs = self.completion_logprobs_block(output.token_ids, output.logprobs, body.logprobs,
                                                          choice.offset, choice.decoder)
                choice.offset += sum(map(len, logprobs["tokens"]))
                if first and echoes[prompt_index] is not None:
                    logprobs = {k: echoes[prompt_index][k] + logprobs[k] for k in logprobs}
            return frame.event(_json({"index": index, "text": text, "logprobs": logprobs,
                                      "finish_reason": output.finish_reason}))

        if params is None:  # echo only: one chunk per choice
            for i, prompt in enumerate(prompts):
                for j in range(body.n):
                    yield frame.event(_json(self._completion_choice(body, i * body.n + j, prompt, echoes[i], None)))
        elif len(prompts) == 1:  # the common case: the engine's stream directly, no merging layer
            async with aclosing(self.engine.generate(prompts[0].ids, params, target.lease.lora, target.cache_salt)) as results:
                async for result in results:
                    outcome.first_token()
                    for output in result.outputs:
                        yield render(0, output)
        else:
            async with aclosing(self._merged(prompts, params, target)) as merged:
                async for prompt_index, output in merged:
                    outcome.first_token()
                    yield render(prompt_index, output)
        if body.include_usage_chunk:
            yield sse({"id": outcome.response_id, "object": "text_completion", "created": outcome.created,
                       "model": target.model, "choices": [], "usage": usage(outcome)})

    async def _merged(self, prompts: list[Prompt], params: SamplingParams, target: Target):
        """Interleave the delta outputs of several prompts as they arrive: (prompt index, output).
        (A single prompt never comes here: completion_stream iterates the engine directly.)"""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int, prompt: Prompt):
            try:
                async for result in self.engine.generate(prompt.ids, params, target.lease.lora, target.cache_salt):
                    for output in result.outputs:
                        queue.put_nowait((index, output))
            except BaseException as exc:  # hand the failure to the consumer
                queue.put_nowait((index, exc))
                raise
            queue.put_nowait((index, done))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            await cancel_and_wait(tasks)  # engine requests aborted before the caller releases the lease

    # ---- chat -------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, plan: Plan, target: Target, outcome: Outcome) -> dict:
        prompt, params = plan.prompts[0], plan.params
        final = None
        async for final in self.engine.generate(prompt.ids, params, target.lease.lora, target.cache_salt):
            pass
        choices = []
        for output in sorted(final.outputs, key=lambda o: o.index):
            outcome.completion_tokens += len(output.token_ids)
            choices.append({
                "index": output.index, "message": {"role": "assistant", "content": output.text},
                "logprobs": self.chat_logprobs_block(output.token_ids, output.logprobs, body.top_logprobs or 0)
                if body.logprobs else None,
                "finish_reason": output.finish_reason,
            })
        outcome.prompt_tokens = len(prompt.ids)
        return {"id": outcome.response_id, "object": "chat.completion", "created": outcome.created,
                "model": target.model, "system_fingerprint": target.fingerprint, "choices": choices,
                "usage": usage(outcome)}

    async def chat_stream(self, body: ChatCompletionRequest, plan: Plan, target: Target,
                          outcome: Outcome) -> AsyncIterator[str]:
        prompt, params = plan.prompts[0], plan.params
        outcome.prompt_tokens = len(prompt.ids)
        started: set[int] = set()
        frame = ChunkFrame(outcome, "chat.completion.chunk", target, body.continuous_usage)
        k = body.top_logprobs or 0

        async with aclosing(self.engine.generate(prompt.ids, params, target.lease.lora, target.cache_salt)) as results:
            async for result in results:
                outcome.first_token()
                for output in result.outputs:
                    outcome.completion_tokens += len(output.token_ids)
                    first = output.index not in started
                    if first:
                        started.add(output.index)
                    if not body.logprobs:
                        yield frame.event(delta_choice(output.index, output.text, output.finish_reason, first))
                        continue
                    delta: dict = {"role": "assistant", "content": output.text} if first else {"content": output.text}
                    yield frame.event(_json({
                        "index": output.index, "delta": delta,
                        "logprobs": self.chat_logprobs_block(output.token_ids, output.logprobs, k),
                        "finish_reason": output.finish_reason,
                    }))
        if body.include_usage_chunk:
            yield sse({"id": outcome.response_id, "object": "chat.completion.chunk", "created": outcome.created,
                       "model": target.model, "system_fingerprint": target.fingerprint, "choices": [],
                       "usage": usage(outcome)})



@dataclass
class _ChoiceStream:
    """One streamed completion choice with logprobs: where its next token starts in its text, and
    the bytes of a character its last chunk began."""

    offset: int
    decoder: Any = field(default_factory=utf8_decoder)


async def gather_or_cancel(work: Iterable[Awaitable[T]]) -> list[T]:
    """`asyncio.gather`, except that when one fails (or the caller is cancelled) the others are
    cancelled and awaited before the failure propagates: none keeps an engine request running."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        await cancel_and_wait(tasks)
        raise


def usage(outcome: Outcome) -> dict:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


def _json(payload) -> str:
    return json.dumps(payload, separators=(",", ":"))


def sse(payload: dict) -> str:
    return f"data: {_json(payload)}\n\n"


# Streaming chunks are written from templates: the envelope (id, object, created, model,
# fingerprint) is serialised once per response and each token's choice is a few string joins, the
# bytes `sse(...)` of the same dict would give (same key order, same escaping, compact separators).
_str = json.encoder.encode_basestring_ascii  # what json.dumps does for a str (ensure_ascii)
_NULL = "null"


class ChunkFrame:
    """`data: {"id":…,"object":…,"created":…,"model":…,"system_fingerprint":…,"choices":[` … `]}`,
    and with `continuous_usage` (vLLM's `continuous_usage_stats`) `"usage":{…}` after the choices:
    the outcome's usage so far, all choices together."""

    __slots__ = ("head", "outcome", "continuous_usage")
    TAIL = "]}\n\n"

    def __init__(self, outcome: Outcome, obj: str, target: Target, continuous_usage: bool = False):
        self.head = (f'data: {{"id":{_str(outcome.response_id)},"object":{_str(obj)},"created":{outcome.created},'
                     f'"model":{_str(target.model)},"system_fingerprint":{_str(target.fingerprint)},"choices":[')
        self.outcome = outcome
        self.continuous_usage = continuous_usage

    def event(self, choice_json: str) -> str:
        if self.continuous_usage:
            return f'{self.head}{choice_json}],"usage":{_json(usage(self.outcome))}}}\n\n'
        return self.head + choice_json + self.TAIL


def text_choice(index: int, text: str, finish_reason: str | None) -> str:
    """A completion chunk's choice without logprobs: `{"index","text","logprobs":null,"finish_reason"}`."""
    return (f'{{"index":{index},"text":{_str(text)},"logprobs":null,"finish_reason":'
            f'{_NULL if finish_reason is None else _str(finish_reason)}}}')


def delta_choice(index: int, content: str, finish_reason: str | None, first: bool) -> str:
    """A chat chunk's choice without logprobs; the first of each choice carries the role."""
    role = '"role":"assistant",' if first else ""
    return (f'{{"index":{index},"delta":{{{role}"content":{_str(content)}}},"logprobs":null,"finish_reason":'
            f'{_NULL if finish_reason is None else _str(finish_reason)}}}')


SSE_DONE = "data: [DONE]\n\n"



def new_response_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"

