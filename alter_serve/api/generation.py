"""Turn validated OpenAI requests into engine calls, and engine outputs into OpenAI responses.

Pure request/response shaping: no auth, no routing. The `Target` says which view version serves
the request (held by a lease for the request's whole life) and which experiment arm chose it.

Tokens as text. A byte-level BPE token can end inside a multi-byte character, so a token decoded
alone is not its text. `TokenStrings` works from each token's exact bytes:
- a token's string (chat `token`, completions `top_logprobs` keys) is its bytes as UTF-8, or
  `bytes:\\xe2\\x80` when they are not whole characters (OpenAI's notation); chat `bytes` are exact;
- completions `tokens` are the text each token adds to the decoded sequence: `''.join(tokens)` is
  the text, and `text_offset` indexes into it (a token ending inside a character adds '', the next
  one adds the character).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from ..engine.adapters import Lease
from ..engine.vllm_engine import VllmEngine, cancel_and_wait
from .errors import as_openai_error, error_body, invalid
from ..serving.schemas import ChatCompletionRequest, CompletionRequest, ResponseFormat

T = TypeVar("T")


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


@dataclass
class Prompt:
    """One tokenised prompt. `text` is there when it is echoed; `offsets` (the char offset of each
    token within `text`) when it is echoed with logprobs."""

    ids: list[int]
    text: str | None = None
    offsets: list[int] | None = None


@dataclass
class Plan:
    """A checked request, ready for the engine. `params` is None when there is nothing to generate
    (completions with echo and max_tokens 0: the prompt back, with its logprobs)."""

    prompts: list[Prompt]
    params: SamplingParams | None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    @property
    def max_tokens(self) -> int:
        """The completion-token limit of each sequence (0: nothing to generate)."""
        return 0 if self.params is None else self.params.max_tokens


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


# ---- tokens as text ------------------------------------------------------------------------------
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _utf8_decoder():
    """Incremental: holds back the bytes of a character a token begins and a later token ends."""
    return codecs.getincrementaldecoder("utf-8")("replace")


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the char a byte-level BPE vocabulary writes per byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenStrings:
    """Exact bytes, display strings and decoded pieces of single tokens (see the module docstring).

    Bytes are exact for byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM) and for SentencePiece
    byte-fallback tokens (`<0xE2>`); other tokens are taken as they decode alone."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._byte_decoder = _gpt2_byte_decoder() if self._byte_level else {}
        # Whether a text's byte count bounds its token count (see min_token_count): fixed per tokenizer.
        self._count_bounded = self._byte_level and tokenizer.backend_tokenizer.normalizer is None
        self._added = {tid: tok.content for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self._bytes: dict[int, bytes] = {}
        self._max_bytes: int | None = None

    def bytes(self, token_id: int) -> bytes:
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._exact_bytes(token_id)
        return cached

    def _exact_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:  # added tokens are stored as their text, never byte-encoded
            return self._added[token_id].encode()
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)
        if match := _BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        if "\u2581" in piece:  # SentencePiece's word-start marker is a space
            return piece.replace("\u2581", " ").encode()
        return self.tokenizer.decode([token_id]).encode()

    def display(self, token_id: int) -> str:
        """The token as one string: its text, or `bytes:\\xNN…` when that is not whole characters."""
        raw = self.bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def pieces(self, ids: Iterable[int], decoder=None) -> list[str]:
        """The text each token adds to the decoded sequence. `decoder` carries a character begun in
        an earlier call (a stream's previous chunk); a fresh one starts a sequence."""
        decoder = decoder or _utf8_decoder()
        return [decoder.decode(self.bytes(t)) for t in ids]

    def min_token_count(self, n_bytes: int) -> int:
        """A lower bound on the number of tokens a text of `n_bytes` UTF-8 bytes encodes to (0: none
        known). Exact-bytes vocabularies without a normalizer only: there no token covers more bytes
        than the longest one does (special tokens and a prefix space only add tokens)."""
        if not self._count_bounded:
            return 0
        if self._max_bytes is None:
            self._max_bytes = max(len(self._exact_bytes(t)) for t in range(len(self.tokenizer))) or 1  # once
        return n_bytes // self._max_bytes


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and type(decoder).__name__ == "ByteLevel"


def _ranked(entry: dict) -> list[tuple[int, Any]]:
    """A position's logprobs (token id → vLLM Logprob), best rank first."""
    return sorted(entry.items(), key=lambda item: (item[1].rank if item[1].rank is not None else 1 << 62,
                                                   -item[1].logprob))


# ---- the generator ------------------------------------------------------------------------------
class Generator:
    """Shapes completions and chat completions for one engine and its tokenizer."""

    def __init__(self, engine: VllmEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.tokens = TokenStrings(self.tokenizer)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # ---- prompts (run in a worker thread: tokenising a large prompt takes seconds) ---------
    def _fits(self, n_tokens: int, param: str, at_least: bool = False) -> None:
        """A prompt must leave room for at least one token (vLLM's rule; the scoring pass of echo +
        logprobs generates one too). `at_least`: `n_tokens` is a lower bound, not a count."""
        if n_tokens >= self.max_model_len:
            raise invalid(
                f"This model's maximum context length is {self.max_model_len} tokens, and the prompt has "
                f"{'at least ' if at_least else ''}{n_tokens} tokens, which leaves no room for a completion. "
                f"Reduce the {param}.", param, "context_length_exceeded")

    def _from_text(self, text: str, param: str, *, echo: bool = False, offsets: bool = False,
                   add_special_tokens: bool = True) -> Prompt:
        try:
            n_bytes = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:  # the tokenizer would fail on it with a TypeError
            raise invalid(f"The {param} is not valid Unicode text (a lone surrogate at character {exc.start}).",
                          param) from None
        self._fits(self.tokens.min_token_count(n_bytes), param, at_least=True)  # a huge prompt: before tokenising
        enc = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=offsets)
        ids = list(enc["input_ids"])
        self._fits(len(ids), param)
        return Prompt(ids, text if echo else None, [start for start, _ in enc["offset_mapping"]] if offsets else None)

    def _check_token_ids(self, ids, param: str) -> None:
        vocab = len(self.tokenizer)
        if ids and max(ids) >= vocab:
            raise invalid(f"token ids must be below the vocabulary size {vocab}", param)

    def _from_ids(self, ids: list[int], *, echo: bool = False, offsets: bool = False) -> Prompt:
        self._fits(len(ids), "prompt")  # before anything is decoded
        self._check_token_ids(ids, "prompt")
        if not echo:
            return Prompt(list(ids))
        pieces = self.tokens.pieces(ids)
        starts, at = [], 0
        for piece in pieces:
            starts.append(at)
            at += len(piece)
        return Prompt(list(ids), "".join(pieces), starts if offsets else None)

    def _chat_prompt(self, body: ChatCompletionRequest) -> Prompt:
        """The messages rendered by the model's chat template, as vLLM renders them: each message
        with its name, tool_call_id and tool calls (`ChatMessage.for_template`), the client's
        template variables, and the generation prompt or the final message left open."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise invalid("This model has no chat template; use /v1/completions.", "messages")
        messages = [m.for_template() for m in body.messages]
        if body.continue_final_message and messages[-1]["role"] != "assistant":
            raise invalid("continue_final_message needs an assistant message last (the one to continue).",
                          "continue_final_message")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=body.generation_prompt,
                continue_final_message=body.continue_final_message, **(body.chat_template_kwargs or {}))
        except Exception as exc:  # template errors (e.g. roles out of order) are the caller's
            raise invalid(f"The chat template refused these messages: {exc}", "messages") from exc
        return self._from_text(text, "messages", add_special_tokens=body.add_special_tokens)

    def _max_tokens(self, prompts: list[Prompt], sent: int | None, limit: int | None, default: int,
                    budget: int | None = None, n: int = 1) -> int:
        """The completion-token limit a request runs with. Sent by the client: as sent, and the
        longest prompt + it must fit the context (else 400, as OpenAI). Not sent: `limit` (the
        tenant's, from its permit) or the endpoint default, lowered to the room the longest prompt
        leaves in the context, and to the room the prompts leave in `budget` (tokens the whole
        request may use: prompts + n × len(prompts) completions; at least 1, the limiter refuses a
        prompt that fills the budget) — a default is never refused as if the client had asked for it."""
        longest = max(len(p.ids) for p in prompts)
        if sent is not None:
            if longest + sent > self.max_model_len:
                raise invalid(
                    f"This model's maximum context length is {self.max_model_len} tokens. The request asks for "
                    f"{longest} prompt tokens + {sent} completion tokens. Reduce the prompt or max_tokens.",
                    "max_tokens", "context_length_exceeded")
            return sent
        allowed = min(limit if limit is not None else default, self.max_model_len - longest)
        if budget is not None:
            room = (budget - sum(len(p.ids) for p in prompts)) // (n * len(prompts))
            allowed = min(allowed, max(1, room))
        return allowed

    def sampling(self, body, max_tokens: int, logprobs: int | None, stream: bool) -> SamplingParams:
        """The engine's SamplingParams for a checked body (the fields request_fields marks honoured)."""
        temperature, top_k = body.temperature, body.top_k
        if temperature == 0 and body.n > 1:
            # vLLM refuses n > 1 with greedy sampling; OpenAI answers n greedy choices. Sampling from
            # the top token alone is greedy, and vLLM allows n of it (logprobs are the raw model's).
            temperature, top_k = 1.0, 1
        for param in ("stop_token_ids", "allowed_token_ids"):
            self._check_token_ids(getattr(body, param), param)
        if body.logit_bias:
            self._check_token_ids(list(body.logit_bias), "logit_bias")
        try:
            return SamplingParams(
                n=body.n, temperature=temperature, top_p=body.top_p, top_k=top_k, min_p=body.min_p,
                max_tokens=max_tokens, stop=body.stop, stop_token_ids=body.stop_token_ids,
                include_stop_str_in_output=body.include_stop_str_in_output, seed=body.seed, logprobs=logprobs,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty, logit_bias=body.logit_bias,
                allowed_token_ids=body.allowed_token_ids, bad_words=body.bad_words,
                ignore_eos=body.ignore_eos, min_tokens=min(body.min_tokens, max_tokens),
                skip_special_tokens=body.skip_special_tokens,
                spaces_between_special_tokens=body.spaces_between_special_tokens,
                structured_outputs=structured_outputs(body.response_format),
                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            )
        except (ValueError, VLLMClientError) as exc:  # vLLM's own checks
            raise invalid(str(exc), getattr(exc, "parameter", None)) from None

    async def plan_completion(self, body: CompletionRequest, limit: int | None = None,
                              budget: int | None = None) -> Plan:
        """Tokenise and check a completion request before any response starts (errors stay 400s).
        `limit`, `budget`: the tenant permit's completion-token limit and token budget, for a body
        that sends no limit (see `_max_tokens`)."""
        return await asyncio.to_thread(self._plan_completion, body, limit, budget)

    def _plan_completion(self, body: CompletionRequest, limit: int | None, budget: int | None = None) -> Plan:
        offsets = body.echo and body.logprobs is not None
        prompts = [self._from_text(p, "prompt", echo=body.echo, offsets=offsets, add_special_tokens=body.add_special_tokens)
                   if isinstance(p, str)
                   else self._from_ids(p, echo=body.echo, offsets=offsets) for p in body.prompt]
        max_tokens = self._max_tokens(prompts, body.token_limit, limit, body.default_max_tokens, budget, body.n)
        if max_tokens == 0:
            return Plan(prompts, None)
        return Plan(prompts, self.sampling(body, max_tokens, body.logprobs, stream=body.stream))

    async def plan_chat(self, body: ChatCompletionRequest, limit: int | None = None,
                        budget: int | None = None) -> Plan:
        """Render, tokenise and check a chat request before any response starts."""
        return await asyncio.to_thread(self._plan_chat, body, limit, budget)

    def _plan_chat(self, body: ChatCompletionRequest, limit: int | None, budget: int | None = None) -> Plan:
        prompt = self._chat_prompt(body)
        max_tokens = self._max_tokens([prompt], body.token_limit, limit, body.default_max_tokens, budget, body.n)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return Plan([prompt], self.sampling(body, max_tokens, logprobs, stream=body.stream))

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


def structured_outputs(response_format: ResponseFormat | None) -> StructuredOutputsParams | None:
    """vLLM's structured outputs for an OpenAI `response_format` (None for text: no constraint)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=response_format.json_schema.schema_)


@dataclass
class _ChoiceStream:
    """One streamed completion choice with logprobs: where its next token starts in its text, and
    the bytes of a character its last chunk began."""

    offset: int
    decoder: Any = field(default_factory=_utf8_decoder)


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


async def sse_stream(
    events: AsyncIterator[str], on_finish: Callable[[int, BaseException | None], None]
) -> AsyncIterator[str]:
    """Wrap an event stream: errors become an SSE error event, [DONE] ends it, `on_finish` always
    runs — after `events` is closed, so its engine requests are aborted before the lease goes."""
    status, failure = 200, None
    try:
        async with aclosing(events):
            async for event in events:
                yield event
        yield SSE_DONE
    except (asyncio.CancelledError, GeneratorExit) as exc:  # client went away (cancelled, or closed mid-send)
        status, failure = 499, exc
        raise
    except Exception as exc:
        error = as_openai_error(exc)
        if error is None:
            status, failure = 500, exc
            yield sse({"error": {"message": "The server had an error while streaming.", "type": "server_error",
                                 "param": None, "code": "internal_error"}})
        else:
            status, failure = error.status, exc
            yield sse(error_body(error))
    finally:
        on_finish(status, failure)


def new_response_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"

