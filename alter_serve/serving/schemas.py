"""Request bodies of the OpenAI-compatible routes, validated by pydantic (no web code: the routes
parse them, and the service plans and runs them; so they live in the service layer).

What each field does is in `request_fields.ROWS` (docs/openai-compat.md): honoured, accepted and
ignored, or refused with a 400 that names it and says "not supported". The fields that table
marks `generated` are declared from it here (`_TableFields`); the rest are written out below.
Any other field is refused as unknown (a typo must not silently change sampling). Bounds follow
the OpenAI API, and so does null: an explicit `null` on an optional field means its default.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, Json, ValidationInfo, create_model, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from . import request_fields
from .request_fields import Endpoint

MAX_N = 16
MAX_STOP = 4
MAX_PROMPTS = 64
MAX_LOGPROBS = 5  # completions `logprobs` (OpenAI's legacy limit)
MAX_TOP_LOGPROBS = 20  # chat `top_logprobs` (OpenAI's limit; at most engine.vllm_engine.MAX_LOGPROBS)
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
CHAT_MAX_TOKENS = 1024  # this server's default for chat (lowered to the room the prompt leaves)
MAX_TOKEN_LIST = 1024  # stop_token_ids, allowed_token_ids, bad_words
# The model name that means the tenant's default view (a view or experiment alias so named wins).
DEFAULT_MODEL = "default"

Probability = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
TokenId = Annotated[int, Field(strict=True, ge=0)]  # strict: `true` or 1.5 is not a token id
# logit_bias keys are token ids written as strings (JSON object keys), as in the OpenAI API.
BiasKey = Annotated[int, Field(ge=0)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]
# The arguments of apply_chat_template itself, and the template's `messages`: not template variables.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})


def not_supported(name: str, why: str = "") -> PydanticCustomError:
    """The validation error of a known field this server does not serve (the 400 names it)."""
    return PydanticCustomError("not_supported", "'{name}' is not supported by this server{why}",
                               {"name": name, "why": f": {why}" if why else ""})


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


def _table_fields(endpoint: Endpoint) -> type[Body]:
    """The fields `request_fields` declares for `endpoint`: each ignored one takes any value; each
    refused one only its `accepts` value (its default, which asks for nothing)."""
    ignored = request_fields.generated(endpoint, "ignored")
    refused = request_fields.generated(endpoint, "refused")
    fields: dict[str, Any] = {
        name: (Any, Field(default=None, description=f"Accepted and ignored. {row.note}".strip()))
        for name, row in ignored.items()}
    fields |= {name: (Any, Field(default=row.accepts, description=request_fields.refusal(row)))
               for name, row in refused.items()}

    def refuse(cls, value, info: ValidationInfo):
        row = refused[info.field_name]
        if value != row.accepts:
            raise PydanticCustomError("not_supported", request_fields.refusal(row))
        return value

    validators = {"_refuse": field_validator(*refused, mode="before")(refuse)} if refused else {}
    return create_model(f"_{endpoint.title()}TableFields", __base__=Body, __validators__=validators, **fields)


class StreamOptions(Body):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(default=False, description=(
        "vLLM's: with include_usage, every chunk carries the usage so far (all choices together)"))
    # Sent by newer openai clients: random padding against length side channels. Accepted, ignored.
    include_obfuscation: bool = True


class JsonSchemaFormat(Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    """`text` (the default), `json_object` (any JSON) or `json_schema` (JSON matching the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @field_validator("type", mode="before")
    @classmethod
    def _structural_tag(cls, kind):
        if kind == "structural_tag":
            raise not_supported("response_format.type: structural_tag")
        return kind

    @field_validator("json_schema")
    @classmethod
    def _schema_with_its_type(cls, spec: JsonSchemaFormat | None, info: ValidationInfo):
        if spec is not None and info.data.get("type") != "json_schema":
            raise ValueError("json_schema is only allowed with type json_schema")
        return spec

    @model_validator(mode="after")
    def _json_schema_needs_a_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object (name and schema)")
        return self


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
    logit_bias: dict[BiasKey, Bias] | None = Field(default=None, description=(
        "token id → bias added to its logit, in [-100, 100]; ids below the vocabulary size"))
    response_format: ResponseFormat | None = None
    # vLLM's sampling extensions (same names and meaning as vLLM's own server).
    top_k: int = Field(default=0, ge=-1, description="sample from the k most likely tokens; -1 or 0: all")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False,
                         description="drop tokens less likely than min_p × the most likely one's probability")
    repetition_penalty: float = Field(default=1.0, gt=0.0, allow_inf_nan=False,
                                      description="> 1 discourages tokens already in the prompt or output")
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=MAX_TOKEN_LIST)
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[TokenId] | None = Field(default=None, min_length=1, max_length=MAX_TOKEN_LIST)
    bad_words: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, max_length=MAX_TOKEN_LIST)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

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

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk: vLLM's `continuous_usage_stats`, which needs `include_usage`."""
        return self.include_usage_chunk and self.stream_options.continuous_usage_stats


class CompletionRequest(SamplingFields, _table_fields("completions")):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool = False  # before max_tokens: its check reads it
    max_tokens: int | None = Field(default=None, ge=0, description=(
        f"default {COMPLETION_MAX_TOKENS}; 0 only with echo (the prompt back, with its logprobs: scoring)"))
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N, description="accepted equal to n only")
    add_special_tokens: bool = Field(default=True, description="vLLM's: add the tokenizer's special tokens (BOS)")

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

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        # vLLM V1 no longer ranks best_of candidates; best_of == n asks for nothing beyond n.
        if best_of is not None and best_of != info.data.get("n", 1):
            raise not_supported("best_of", "only best_of equal to n (vLLM V1 dropped best-of ranking)")
        return best_of

    @property
    def token_limit(self) -> int | None:
        """The completion-token limit the client sent (None: not sent)."""
        return self.max_tokens


class TextPart(Body):
    type: Literal["text"]
    text: str


class RefusalPart(Body):
    type: Literal["refusal"]
    refusal: str


class FunctionCall(Body):
    name: str = Field(min_length=1, max_length=256)
    arguments: Json[Any] = Field(description="JSON text; the chat template gets it parsed, as in vLLM")


class ToolCall(Body):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


# Content part types the OpenAI API defines that this server does not (text-only models).
_MEDIA_PARTS = frozenset({"image_url", "input_audio", "file", "video_url", "audio_url"})


class ChatMessage(Body):
    """One message. `content` may be null (or absent) on assistant messages only, e.g. one that
    called tools; text parts are joined with a newline, as vLLM does."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | RefusalPart] | None
    name: str | None = Field(default=None, max_length=64)
    tool_call_id: str | None = Field(default=None, max_length=256, description="tool messages: the call answered")
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128, description="assistant messages")
    refusal: str | None = Field(default=None, description="accepted and ignored (not rendered), as in vLLM")
    function_call: Any = None
    audio: Any = None

    @model_validator(mode="before")
    @classmethod
    def _assistant_content_may_be_absent(cls, data):
        if isinstance(data, dict) and data.get("role") == "assistant" and "content" not in data:
            return {**data, "content": None}
        return data

    @field_validator("role", mode="before")
    @classmethod
    def _function_role(cls, role):
        if role == "function":
            raise not_supported("role: function", "the deprecated function role; no tool parser is served")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content):
        if isinstance(content, list):
            kinds = {p.get("type") for p in content if isinstance(p, dict)}
            if media := sorted(k for k in kinds if k in _MEDIA_PARTS):
                raise not_supported(f"content parts of type {', '.join(media)}", "the served models read text only")
        return content

    @field_validator("content")
    @classmethod
    def _null_content_is_an_assistants(cls, content, info: ValidationInfo):
        if content is None and info.data.get("role") not in (None, "assistant"):
            raise ValueError(f"content is required for a {info.data['role']} message (null only for assistant)")
        return content

    @field_validator("tool_calls")
    @classmethod
    def _calls_are_an_assistants(cls, calls, info: ValidationInfo):
        if calls is not None and info.data.get("role") != "assistant":
            raise ValueError("tool_calls belong to assistant messages")
        return calls

    @field_validator("function_call", "audio", mode="before")
    @classmethod
    def _refused(cls, value, info: ValidationInfo):
        raise not_supported(info.field_name, "deprecated function calls; no tool parser is served"
                            if info.field_name == "function_call" else "the served models read text only")

    def text(self) -> str:
        """The content as one string: text (and refusal) parts joined with a newline; null is empty."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text if isinstance(p, TextPart) else p.refusal for p in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template sees it (as vLLM passes it): developer is system."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return message


class ChatCompletionRequest(SamplingFields, _table_fields("chat")):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False  # before top_logprobs: its check reads it
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM's chat-template options. add_generation_prompt before continue_final_message: its check reads it.
    add_generation_prompt: bool | None = Field(default=None, description=(
        "end the prompt with the template's assistant header; default true (false with continue_final_message)"))
    continue_final_message: bool = Field(default=False, description=(
        "leave the final (assistant) message open, for the answer to continue it"))
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, description=(
        "further variables for the model's chat template (not apply_chat_template's own arguments)"))
    add_special_tokens: bool = Field(default=False, description=(
        "vLLM's: add the tokenizer's special tokens on top of the template's"))

    default_max_tokens: ClassVar[int] = CHAT_MAX_TOKENS

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top

    @field_validator("continue_final_message")
    @classmethod
    def _one_way_to_end(cls, keep_open: bool, info: ValidationInfo) -> bool:
        if keep_open and info.data.get("add_generation_prompt"):
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        return keep_open

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_only(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        if kwargs and (reserved := sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())):
            raise not_supported(f"chat_template_kwargs key {', '.join(reserved)}",
                                "apply_chat_template's own arguments are set by the server")
        return kwargs

    @property
    def generation_prompt(self) -> bool:
        """Whether the rendered prompt ends with the assistant header (vLLM's add_generation_prompt)."""
        if self.add_generation_prompt is not None:
            return self.add_generation_prompt
        return not self.continue_final_message

    @property
    def token_limit(self) -> int | None:
        """The completion-token limit the client sent (None: not sent)."""
        return self.max_completion_tokens or self.max_tokens


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response_id: str = Field(min_length=1, max_length=128)
    rating: float = Field(ge=-1e6, le=1e6, allow_inf_nan=False)
    comment: str | None = Field(default=None, max_length=4000)
