"""Turn validated OpenAI requests into engine calls, and engine outputs into OpenAI responses.

Pure request/response shaping: no auth, no routing. The `Target` says which view version serves
the request (held by a lease for the request's whole life) and which experiment arm chose it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind

from ..engine.adapters import Lease
from ..engine.vllm_engine import EngineUnavailable, VllmEngine
from .errors import OpenAIError, error_body, invalid
from .schemas import ChatCompletionRequest, CompletionRequest


@dataclass
class Target:
    """Where a request goes: the model name asked for, the view version, the A/B arm."""

    model: str
    lease: Lease
    experiment: str | None = None
    arm: str | None = None

    @property
    def view_label(self) -> str:
        return self.lease.version.label

    @property
    def fingerprint(self) -> str:
        arm = f";exp={self.experiment};arm={self.arm}" if self.experiment else ""
        return f"alter:{self.view_label}{arm}"

    def headers(self) -> dict[str, str]:
        headers = {"x-alter-view": self.view_label}
        if self.experiment:
            headers.update({"x-alter-experiment": self.experiment, "x-alter-arm": self.arm or ""})
        return headers


@dataclass
class Prompt:
    ids: list[int]
    text: str
    offsets: list[int]  # char offset of each prompt token within `text`


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


class Generator:
    """Shapes completions and chat completions for one engine and its tokenizer."""

    def __init__(self, engine: VllmEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # ---- prompts ----------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _from_text(self, text: str, add_special_tokens: bool = True) -> Prompt:
        enc = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return Prompt(list(enc["input_ids"]), text, [start for start, _ in enc["offset_mapping"]])

    def _from_ids(self, ids: list[int]) -> Prompt:
        vocab = len(self.tokenizer)
        if any(t >= vocab for t in ids):
            raise invalid(f"token ids must be below the vocabulary size {vocab}", "prompt")
        pieces = [self.token_text(t) for t in ids]
        offsets, at = [], 0
        for piece in pieces:
            offsets.append(at)
            at += len(piece)
        return Prompt(list(ids), "".join(pieces), offsets)

    def completion_prompts(self, body: CompletionRequest) -> list[Prompt]:
        return [self._from_text(p) if isinstance(p, str) else self._from_ids(p) for p in body.prompt]

    def chat_prompt(self, body: ChatCompletionRequest) -> Prompt:
        if not getattr(self.tokenizer, "chat_template", None):
            raise invalid("This model has no chat template; use /v1/completions.", "messages")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # template errors (e.g. roles out of order) are the caller's
            raise invalid(f"The chat template refused these messages: {exc}", "messages") from exc
        return self._from_text(text, add_special_tokens=False)

    def check_length(self, prompts: list[Prompt], max_tokens: int, param: str) -> None:
        for prompt in prompts:
            if len(prompt.ids) + max_tokens > self.max_model_len:
                raise invalid(
                    f"This model's maximum context length is {self.max_model_len} tokens. The request asks for "
                    f"{len(prompt.ids)} prompt tokens + {max_tokens} completion tokens. Reduce the prompt or {param}.",
                    param, "context_length_exceeded")

    def default_max_tokens(self, prompts: list[Prompt]) -> int:
        room = self.max_model_len - max(len(p.ids) for p in prompts)
        if room < 1:
            raise invalid(f"The prompt fills the model's {self.max_model_len}-token context.", "messages",
                          "context_length_exceeded")
        return room

    @staticmethod
    def sampling(body, max_tokens: int, logprobs: int | None, stream: bool) -> SamplingParams:
        try:
            return SamplingParams(
                n=body.n, temperature=body.temperature, top_p=body.top_p, max_tokens=max_tokens,
                stop=body.stop, seed=body.seed, logprobs=logprobs,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                ignore_eos=body.ignore_eos, min_tokens=min(body.min_tokens, max_tokens),
                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            )
        except (ValueError, VLLMClientError) as exc:  # vLLM's own checks, e.g. "n must be 1 when using greedy sampling"
            raise invalid(str(exc), getattr(exc, "parameter", None)) from None

    # ---- logprobs ---------------------------------------------------------------------------
    def _top(self, entry: dict) -> dict[str, float]:
        return {self.token_text(tid): lp.logprob for tid, lp in entry.items()}

    def prompt_logprobs_block(self, prompt: Prompt, plps: list[dict | None]) -> dict:
        token_logprobs, top = [None], [None]
        for tid, entry in zip(prompt.ids[1:], plps[1:]):
            token_logprobs.append(entry[tid].logprob)
            top.append(self._top(entry))
        return {"tokens": [self.token_text(t) for t in prompt.ids], "token_logprobs": token_logprobs,
                "top_logprobs": top, "text_offset": list(prompt.offsets)}

    def completion_logprobs_block(self, token_ids, logprobs, start_offset: int) -> dict:
        tokens, values, top, offsets, at = [], [], [], [], start_offset
        for tid, entry in zip(token_ids, logprobs or []):
            piece = self.token_text(tid)
            tokens.append(piece)
            values.append(entry[tid].logprob)
            top.append(self._top(entry))
            offsets.append(at)
            at += len(piece)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": top, "text_offset": offsets}

    def chat_logprobs_block(self, token_ids, logprobs) -> dict:
        content = []
        for tid, entry in zip(token_ids, logprobs or []):
            piece = self.token_text(tid)
            content.append({
                "token": piece, "logprob": entry[tid].logprob, "bytes": list(piece.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in self._top(entry).items()],
            })
        return {"content": content}

    # ---- completions ------------------------------------------------------------------------
    async def _prompt_logprobs(self, body: CompletionRequest, prompt: Prompt, target: Target) -> dict | None:
        if not (body.echo and body.logprobs is not None):
            return None
        plps = await self.engine.prompt_logprobs(prompt.ids, body.logprobs, target.lease.lora)
        return self.prompt_logprobs_block(prompt, plps)

    def _completion_choice(self, body, index, prompt, echo_block, output, text_prefix="") -> dict:
        start = len(prompt.text) if body.echo else 0
        logprobs = None
        if body.logprobs is not None:
            block = self.completion_logprobs_block(output.token_ids, output.logprobs, start)
            if echo_block is not None:
                block = {k: echo_block[k] + block[k] for k in block}
            logprobs = block
        text = (prompt.text if body.echo else "") + output.text
        return {"index": index, "text": text_prefix + text if text_prefix else text, "logprobs": logprobs,
                "finish_reason": output.finish_reason}

    def plan_completion(self, body: CompletionRequest) -> tuple[list[Prompt], SamplingParams]:
        """Tokenise and check a completion request before any response starts (errors stay 400s)."""
        prompts = self.completion_prompts(body)
        max_tokens = body.max_tokens or 16
        self.check_length(prompts, max_tokens, "max_tokens")
        return prompts, self.sampling(body, max_tokens, body.logprobs, stream=body.stream)

    async def completion(self, body: CompletionRequest, plan, target: Target, outcome: Outcome) -> dict:
        prompts, params = plan

        async def one(prompt: Prompt):
            echo_block = await self._prompt_logprobs(body, prompt, target)
            final = None
            async for final in self.engine.generate(prompt.ids, params, target.lease.lora):
                pass
            return prompt, echo_block, final

        results = await asyncio.gather(*(one(p) for p in prompts))
        choices = []
        for i, (prompt, echo_block, final) in enumerate(results):
            for output in sorted(final.outputs, key=lambda o: o.index):
                choices.append(self._completion_choice(body, i * body.n + output.index, prompt, echo_block, output))
                outcome.completion_tokens += len(output.token_ids)
        outcome.prompt_tokens = sum(len(p.ids) for p in prompts)
        return {"id": outcome.response_id, "object": "text_completion", "created": outcome.created,
                "model": target.model, "system_fingerprint": target.fingerprint, "choices": choices,
                "usage": usage(outcome)}

    async def completion_stream(self, body: CompletionRequest, plan, target: Target, outcome: Outcome) -> AsyncIterator[str]:
        prompts, params = plan
        outcome.prompt_tokens = sum(len(p.ids) for p in prompts)
        echoes = [await self._prompt_logprobs(body, p, target) for p in prompts]
        offsets: dict[int, int] = {}
        frame = ChunkFrame(outcome, "text_completion", target)
        plain = body.logprobs is None and not body.echo  # the common case: text only, built from a template

        def render(prompt_index: int, output) -> str:
            index = prompt_index * body.n + output.index
            outcome.completion_tokens += len(output.token_ids)
            if plain:
                return frame.event(text_choice(index, output.text, output.finish_reason))
            prompt = prompts[prompt_index]
            first = index not in offsets
            start = offsets.get(index, len(prompt.text) if body.echo else 0)
            text = (prompt.text if (first and body.echo) else "") + output.text
            logprobs = None
            if body.logprobs is not None:
                logprobs = self.completion_logprobs_block(output.token_ids, output.logprobs, start)
                if first and echoes[prompt_index] is not None:
                    logprobs = {k: echoes[prompt_index][k] + logprobs[k] for k in logprobs}
            offsets[index] = start + len(output.text)
            return frame.event(_json({"index": index, "text": text, "logprobs": logprobs,
                                      "finish_reason": output.finish_reason}))

        if len(prompts) == 1:  # the common case: the engine's stream directly, no merging layer
            async for result in self.engine.generate(prompts[0].ids, params, target.lease.lora):
                outcome.first_token()
                for output in result.outputs:
                    yield render(0, output)
        else:
            async for prompt_index, output in self._merged(prompts, params, target):
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
                async for result in self.engine.generate(prompt.ids, params, target.lease.lora):
                    for output in result.outputs:
                        await queue.put((index, output))
            except BaseException as exc:  # hand the failure to the consumer
                await queue.put((index, exc))
                return
            await queue.put((index, done))

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
            for task in tasks:
                task.cancel()

    # ---- chat -------------------------------------------------------------------------------
    def plan_chat(self, body: ChatCompletionRequest) -> tuple[Prompt, SamplingParams]:
        """Render, tokenise and check a chat request before any response starts."""
        prompt = self.chat_prompt(body)
        max_tokens = body.token_limit or min(self.default_max_tokens([prompt]), 1024)
        self.check_length([prompt], max_tokens, "max_tokens")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return prompt, self.sampling(body, max_tokens, logprobs, stream=body.stream)

    async def chat(self, body: ChatCompletionRequest, plan, target: Target, outcome: Outcome) -> dict:
        prompt, params = plan
        final = None
        async for final in self.engine.generate(prompt.ids, params, target.lease.lora):
            pass
        choices = []
        for output in sorted(final.outputs, key=lambda o: o.index):
            outcome.completion_tokens += len(output.token_ids)
            choices.append({
                "index": output.index, "message": {"role": "assistant", "content": output.text},
                "logprobs": self.chat_logprobs_block(output.token_ids, output.logprobs) if body.logprobs else None,
                "finish_reason": output.finish_reason,
            })
        outcome.prompt_tokens = len(prompt.ids)
        return {"id": outcome.response_id, "object": "chat.completion", "created": outcome.created,
                "model": target.model, "system_fingerprint": target.fingerprint, "choices": choices,
                "usage": usage(outcome)}

    async def chat_stream(self, body: ChatCompletionRequest, plan, target: Target, outcome: Outcome) -> AsyncIterator[str]:
        prompt, params = plan
        outcome.prompt_tokens = len(prompt.ids)
        started: set[int] = set()
        frame = ChunkFrame(outcome, "chat.completion.chunk", target)

        async for result in self.engine.generate(prompt.ids, params, target.lease.lora):
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
                    "logprobs": self.chat_logprobs_block(output.token_ids, output.logprobs),
                    "finish_reason": output.finish_reason,
                }))
        if body.include_usage_chunk:
            yield sse({"id": outcome.response_id, "object": "chat.completion.chunk", "created": outcome.created,
                       "model": target.model, "system_fingerprint": target.fingerprint, "choices": [],
                       "usage": usage(outcome)})


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
    """`data: {"id":…,"object":…,"created":…,"model":…,"system_fingerprint":…,"choices":[` … `]}`."""

    __slots__ = ("head",)
    TAIL = "]}\n\n"

    def __init__(self, outcome: Outcome, obj: str, target: Target):
        self.head = (f'data: {{"id":{_str(outcome.response_id)},"object":{_str(obj)},"created":{outcome.created},'
                     f'"model":{_str(target.model)},"system_fingerprint":{_str(target.fingerprint)},"choices":[')

    def event(self, choice_json: str) -> str:
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


async def sse_stream(
    events: AsyncIterator[str], on_finish: Callable[[int, BaseException | None], None]
) -> AsyncIterator[str]:
    """Wrap an event stream: errors become an SSE error event, [DONE] ends it, `on_finish` always runs."""
    status, failure = 200, None
    try:
        async for event in events:
            yield event
        yield SSE_DONE
    except OpenAIError as exc:
        status, failure = exc.status, exc
        yield sse(error_body(exc))
    except EngineUnavailable as exc:
        status, failure = 503, exc
        yield sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": "service_unavailable"}})
    except asyncio.CancelledError as exc:  # client went away
        status, failure = 499, exc
        raise
    except Exception as exc:
        status, failure = 500, exc
        yield sse({"error": {"message": "The server had an error while streaming.", "type": "server_error",
                             "param": None, "code": "internal_error"}})
    finally:
        on_finish(status, failure)


def new_response_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"
