"""Request bodies of the OpenAI-compatible routes, validated by pydantic.

Unknown fields are refused (a typo must not silently change sampling). Bounds follow the OpenAI API,
and so does null: an explicit `null` on an optional field means its default.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_N = 16
MAX_STOP = 4
MAX_PROMPTS = 64
MAX_LOGPROBS = 5  # completions `logprobs` (OpenAI's legacy limit)
MAX_TOP_LOGPROBS = 20  # chat `top_logprobs` (OpenAI's limit; at most engine.vllm_engine.MAX_LOGPROBS)
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
CHAT_MAX_TOKENS = 1024  # this server's default for chat (lowered to the room the prompt leaves)

Probability = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
TokenId = Annotated[int, Field(strict=True, ge=0)]  # strict: `true` or 1.5 is not a token id


class Body(BaseModel):
    """A request body (or part of one): unknown fields refused, null on an optional field = default."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        # The OpenAI API (and its clients' typed params) treat `"temperature": null` as "not sent".
        # Required fields keep their null, so it is refused with their name.
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


class StreamOptions(Body):
    include_usage: bool = False
    # Sent by newer openai clients: random padding against length side channels. Accepted, ignored.
    include_obfuscation: bool = True


class SamplingFields(Body):
    """Options shared by completions and chat completions."""

    model: str = Field(min_length=1, max_length=256)
    temperature: Temperature = 1.0
    top_p: Probability = 1.0
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    # vLLM extensions (same names as vLLM's own server), used by benchmarks for fixed-length outputs.
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)

    # The completion-token limit of a request that sends none (before the tenant's cap and the context).
    default_max_tokens: ClassVar[int]

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo):
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return options

    @property
    def include_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool = False  # before max_tokens: its check reads it
    max_tokens: int | None = Field(default=None, ge=0, description=(
        f"default {COMPLETION_MAX_TOKENS}; 0 only with echo (the prompt back, with its logprobs: scoring)"))
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    default_max_tokens: ClassVar[int] = COMPLETION_MAX_TOKENS

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt):
        if isinstance(prompt, str):
            prompts = [prompt]
        else:
            prompts = prompt
            if prompts and isinstance(prompts[0], int):
                prompts = [prompts]
        if not prompts:
            raise ValueError("prompt must not be empty")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        for item in prompts:
            if isinstance(item, str) and item == "":
                raise ValueError("prompt must not be an empty string")
            if isinstance(item, list) and not item:
                raise ValueError("token prompts must be non-empty lists of non-negative token ids")
        return prompts

    @field_validator("max_tokens")
    @classmethod
    def _nothing_to_generate_needs_echo(cls, max_tokens: int | None, info: ValidationInfo) -> int | None:
        if max_tokens == 0 and not info.data.get("echo"):
            raise ValueError("max_tokens must be at least 1; 0 is allowed only with echo (the prompt back)")
        return max_tokens

    @property
    def token_limit(self) -> int | None:
        """The completion-token limit the client sent (None: not sent)."""
        return self.max_tokens


class TextPart(Body):
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False  # before top_logprobs: its check reads it
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    default_max_tokens: ClassVar[int] = CHAT_MAX_TOKENS

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top

    @property
    def token_limit(self) -> int | None:
        """The completion-token limit the client sent (None: not sent)."""
        return self.max_completion_tokens or self.max_tokens


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response_id: str = Field(min_length=1, max_length=128)
    rating: float = Field(ge=-1e6, le=1e6, allow_inf_nan=False)
    comment: str | None = Field(default=None, max_length=4000)
