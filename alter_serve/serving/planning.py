"""Planning: a validated OpenAI request → tokenised prompts and the engine's SamplingParams, checked
against the model's context, before any response starts (so every problem is still a 400).

Tokenising runs in a worker thread (a large prompt takes seconds). A prompt must leave room for at
least one completion token. A `max_tokens` the client sent is kept as sent (400 when the longest
prompt + it passes the context); one it did not send is the tenant's limit or the endpoint default,
lowered to the room the prompt leaves in the context and in the tenant's token budget.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from ..engine.vllm_engine import VllmEngine
from .errors import InvalidRequest
from .schemas import ChatCompletionRequest, CompletionRequest, ResponseFormat
from .tokens import TokenStrings


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


class Planner:
    """Plans requests for one engine: its tokenizer, and its context length (known once it runs)."""

    def __init__(self, engine: VllmEngine, tokens: TokenStrings):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.tokens = tokens

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def _fits(self, n_tokens: int, param: str, at_least: bool = False) -> None:
        """A prompt must leave room for at least one token (vLLM's rule; the scoring pass of echo +
        logprobs generates one too). `at_least`: `n_tokens` is a lower bound, not a count."""
        if n_tokens >= self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens, and the prompt has "
                f"{'at least ' if at_least else ''}{n_tokens} tokens, which leaves no room for a completion. "
                f"Reduce the {param}.", param=param, code="context_length_exceeded")

    def _from_text(self, text: str, param: str, *, echo: bool = False, offsets: bool = False,
                   add_special_tokens: bool = True) -> Prompt:
        try:
            n_bytes = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:  # the tokenizer would fail on it with a TypeError
            raise InvalidRequest(f"The {param} is not valid Unicode text (a lone surrogate at character "
                                 f"{exc.start}).", param=param) from None
        self._fits(self.tokens.min_token_count(n_bytes), param, at_least=True)  # a huge prompt: before tokenising
        enc = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=offsets)
        ids = list(enc["input_ids"])
        self._fits(len(ids), param)
        return Prompt(ids, text if echo else None, [start for start, _ in enc["offset_mapping"]] if offsets else None)

    def _check_token_ids(self, ids, param: str) -> None:
        vocab = len(self.tokenizer)
        if ids and max(ids) >= vocab:
            raise InvalidRequest(f"token ids must be below the vocabulary size {vocab}", param=param)

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
            raise InvalidRequest("This model has no chat template; use /v1/completions.", param="messages")
        messages = [m.for_template() for m in body.messages]
        if body.continue_final_message and messages[-1]["role"] != "assistant":
            raise InvalidRequest("continue_final_message needs an assistant message last (the one to continue).",
                                 param="continue_final_message")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=body.generation_prompt,
                continue_final_message=body.continue_final_message, **(body.chat_template_kwargs or {}))
        except Exception as exc:  # template errors (e.g. roles out of order) are the caller's
            raise InvalidRequest(f"The chat template refused these messages: {exc}", param="messages") from exc
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
                raise InvalidRequest(
                    f"This model's maximum context length is {self.max_model_len} tokens. The request asks for "
                    f"{longest} prompt tokens + {sent} completion tokens. Reduce the prompt or max_tokens.",
                    param="max_tokens", code="context_length_exceeded")
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
            raise InvalidRequest(str(exc), param=getattr(exc, "parameter", None)) from None

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


def structured_outputs(response_format: ResponseFormat | None) -> StructuredOutputsParams | None:
    """vLLM's structured outputs for an OpenAI `response_format` (None for text: no constraint)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=response_format.json_schema.schema_)

