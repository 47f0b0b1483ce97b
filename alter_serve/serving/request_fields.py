"""What the OpenAI routes do with each request field: the one table behind docs/openai-compat.md.

Every field of the OpenAI SDK's completions and chat-completions requests, and every field vLLM's
own OpenAI server takes, has a row here with one of three statuses:

- **honoured**: it changes what is generated or returned, as in OpenAI's API or vLLM's server;
- **ignored**: accepted and without effect (bookkeeping, or a hint that cannot change the output);
- **refused**: a 400 whose `param` names the field and whose message says "not supported".

A field in no row is unknown, and refused as OpenAI does ("Unrecognized request argument
supplied"): a typo must not silently change sampling.

`render_markdown()` writes the table of the document (a test keeps the two equal), and a test
sends every row's `example`: an honoured row must change the engine's prompt or SamplingParams, or
the response, against its `baseline`; an ignored row must change neither; a refused row must be a
400 naming `param`. Rows marked `generated` are also the schema: `serving.schemas` declares those
fields from them (an ignored field takes any value; a refused one takes only `accepts`, the value
that asks for nothing). The other rows describe fields `serving.schemas` declares itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["honoured", "ignored", "refused"]
Endpoint = Literal["completions", "chat"]
BOTH: tuple[Endpoint, ...] = ("completions", "chat")
COMPLETIONS: tuple[Endpoint, ...] = ("completions",)
CHAT: tuple[Endpoint, ...] = ("chat",)


@dataclass(frozen=True, slots=True)
class Row:
    """One field (or one kind of value of a field) and what the server does with it.

    `example` is merged into a minimal request to exercise the row; `baseline` is the request it is
    compared with (default: `example` without the field's top-level key). `param` is the 400's
    `param` for a refused row (default: `field`)."""

    field: str
    status: Status
    note: str
    example: dict[str, Any]
    endpoints: tuple[Endpoint, ...] = BOTH
    source: str = "OpenAI"
    baseline: dict[str, Any] | None = None
    param: str | None = None
    accepts: Any = None
    generated: bool = False
    checked_by: str | None = None  # honoured rows whose effect another test checks (not the walk's diff)

    @property
    def key(self) -> str:
        """The top-level request field the row is about."""
        return re.match(r"[a-z_]+", self.field).group()

    @property
    def refusal_param(self) -> str:
        return self.param or self.field

    def baseline_request(self) -> dict[str, Any]:
        if self.baseline is not None:
            return self.baseline
        return {k: v for k, v in self.example.items() if k != self.key}


def _refused(name: str, note: str, example: Any, *, accepts: Any = None, endpoints=BOTH, source: str = "vLLM") -> Row:
    """A field refused whatever its value, except `accepts` (its default: asking for nothing)."""
    return Row(name, "refused", note, {name: example}, endpoints, source, accepts=accepts, generated=True)


def _ignored(name: str, note: str, example: Any, *, endpoints=BOTH, source: str = "OpenAI") -> Row:
    """A field accepted with any value, and without effect."""
    return Row(name, "ignored", note, {name: example}, endpoints, source, generated=True)


def _honoured(name: str, note: str, example: Any, *, endpoints=BOTH, source: str = "OpenAI", **more) -> Row:
    return Row(name, "honoured", note, {name: example}, endpoints, source, **more)


_USER = {"role": "user", "content": "hello"}
_CALL = {"id": "call-1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": \"x\"}"}}
_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
_TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
_STREAM = {"stream": True}

ROWS: tuple[Row, ...] = (
    # ---- what to run on -----------------------------------------------------------------------
    _honoured("model", "a view granted to the key's tenant, an A/B experiment alias, or `default`: the tenant's "
              "default view (unless the tenant has a view or alias of that name)", "default",
              baseline={}),
    _honoured("prompt", "text, a list of texts, token ids, or a list of token id lists (at most 64 prompts)",
              "goodbye", endpoints=COMPLETIONS, baseline={}),
    _honoured("messages", "rendered with the model's chat template (see the `messages[]` rows)",
              [{"role": "user", "content": "goodbye"}], endpoints=CHAT, baseline={}),
    # ---- messages -----------------------------------------------------------------------------
    Row("messages[].name", "honoured", "passed to the chat template with the message, as vLLM does",
        {"messages": [{**_USER, "name": "ann"}]}, CHAT, baseline={}),
    Row("messages[].content (text parts)", "honoured", "the parts' texts joined with a newline, as vLLM does",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]},
        CHAT, baseline={}),
    Row("messages[].content (refusal parts)", "honoured", "assistant messages: the refusal's text, as a text part",
        {"messages": [_USER, {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}, _USER]},
        CHAT, baseline={"messages": [_USER, {"role": "assistant", "content": "yes"}, _USER]}),
    Row("messages[].content (image, audio, file parts)", "refused", "the served models read text only",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
        CHAT, param="messages.0.content"),
    Row("messages[].content: null", "honoured", "assistant messages (e.g. one that called a tool): empty content",
        {"messages": [_USER, {"role": "assistant", "content": None}, _USER]}, CHAT,
        baseline={"messages": [_USER, {"role": "assistant", "content": "yes"}, _USER]}),
    Row("messages[].role: developer", "honoured", "rendered as a system message", {
        "messages": [{"role": "developer", "content": "be brief"}, _USER]}, CHAT, baseline={}),
    Row("messages[].role: tool", "honoured", "a tool's result (`content`, `tool_call_id`), passed to the template",
        {"messages": [_USER, {"role": "assistant", "content": None, "tool_calls": [_CALL]},
                      {"role": "tool", "content": "42", "tool_call_id": "call-1"}]}, CHAT,
        baseline={"messages": [_USER, {"role": "assistant", "content": None, "tool_calls": [_CALL]}]}),
    Row("messages[].tool_calls", "honoured", "an assistant's earlier tool calls, passed to the template with their "
        "`arguments` parsed from JSON, as vLLM does", {"messages": [_USER, {"role": "assistant", "content": None,
                                                                              "tool_calls": [_CALL]}]}, CHAT,
        baseline={"messages": [_USER, {"role": "assistant", "content": None}]}),
    Row("messages[].refusal", "ignored", "an assistant message's refusal text is not rendered, as in vLLM",
        {"messages": [_USER, {"role": "assistant", "content": "yes", "refusal": "no"}, _USER]}, CHAT,
        baseline={"messages": [_USER, {"role": "assistant", "content": "yes"}, _USER]}),
    Row("messages[].role: function", "refused", "the deprecated function role; no tool parser is served",
        {"messages": [_USER, {"role": "function", "name": "f", "content": "1"}]}, CHAT, param="messages.1.role"),
    Row("messages[].function_call", "refused", "deprecated function calls; no tool parser is served",
        {"messages": [_USER, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}]},
        CHAT, param="messages.1.function_call"),
    Row("messages[].audio", "refused", "the served models read text only",
        {"messages": [_USER, {"role": "assistant", "content": None, "audio": {"id": "a"}}]}, CHAT,
        param="messages.1.audio"),
    # ---- how long -----------------------------------------------------------------------------
    _honoured("max_tokens", "completions default 16, chat default 1024 (lowered to the room the prompt leaves); "
              "at most the tenant's cap", 3),
    _honoured("max_completion_tokens", "as `max_tokens`; wins over it", 3, endpoints=CHAT),
    _honoured("min_tokens", "", 1, source="vLLM"),
    _honoured("ignore_eos", "", True, source="vLLM"),
    _honoured("stop", "at most 4 non-empty strings", ["x"]),
    _honoured("stop_token_ids", "token ids below the vocabulary size", [5], source="vLLM"),
    Row("include_stop_str_in_output", "honoured", "", {"stop": ["x"], "include_stop_str_in_output": True},
        source="vLLM"),
    # ---- sampling -----------------------------------------------------------------------------
    _honoured("temperature", "0 to 2; 0 is greedy (also with n > 1: n equal choices, as OpenAI)", 0.5),
    _honoured("top_p", "(0, 1]", 0.5),
    _honoured("top_k", "-1 or 0: off", 5, source="vLLM"),
    _honoured("min_p", "[0, 1]", 0.1, source="vLLM"),
    _honoured("presence_penalty", "-2 to 2", 0.5),
    _honoured("frequency_penalty", "-2 to 2", 0.5),
    _honoured("repetition_penalty", "above 0; 1 is off", 1.2, source="vLLM"),
    _honoured("logit_bias", "token id (a string, as OpenAI) → bias in [-100, 100]; ids below the vocabulary size",
              {"5": 10}),
    _honoured("allowed_token_ids", "token ids below the vocabulary size", [5, 6], source="vLLM"),
    _honoured("bad_words", "", ["bad"], source="vLLM"),
    _honoured("seed", "reproducible sampling", 7),
    _honoured("n", "1 to 16 choices per prompt", 2),
    Row("best_of", "ignored", "equal to `n` (or absent): nothing beyond `n`", {"n": 2, "best_of": 2}, COMPLETIONS),
    Row("best_of", "refused", "other than `n`: vLLM V1 dropped best-of ranking", {"best_of": 3}, COMPLETIONS),
    _refused("use_beam_search", "beam search is not served", True, accepts=False),
    _refused("length_penalty", "beam search only", 0.5, accepts=1.0),
    _refused("watermarking", "", True, accepts=False),
    _refused("repetition_detection", "", {"max_pattern_size": 4}),
    _refused("thinking_token_budget", "no reasoning models are served", 16),
    # ---- output format ------------------------------------------------------------------------
    Row("response_format: text", "ignored", "the default", {"response_format": {"type": "text"}},
        source="OpenAI chat, vLLM completions"),
    Row("response_format: json_object", "honoured", "JSON output, through vLLM's structured outputs",
        {"response_format": {"type": "json_object"}}, source="OpenAI chat, vLLM completions"),
    Row("response_format: json_schema", "honoured", "output that matches `json_schema.schema`, through vLLM's "
        "structured outputs", {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": _SCHEMA}}},
        source="OpenAI chat, vLLM completions"),
    Row("response_format: structural_tag", "refused", "", {"response_format": {"type": "structural_tag", "format": {}}},
        source="vLLM", param="response_format.type"),
    _refused("structured_outputs", "use `response_format`", {"regex": "a+"}),
    _honoured("echo", "the prompt before the completion (with `max_tokens` 0: the prompt alone, scored)", True,
              endpoints=COMPLETIONS),
    _refused("echo", "use `continue_final_message` and prepend the final message yourself", True, accepts=False,
             endpoints=CHAT),
    _refused("suffix", "insertion is not served", "!", endpoints=COMPLETIONS, source="OpenAI"),
    _honoured("skip_special_tokens", "", False, source="vLLM"),
    _honoured("spaces_between_special_tokens", "", False, source="vLLM"),
    # ---- logprobs -----------------------------------------------------------------------------
    _honoured("logprobs", "0 to 5 alternatives per token; with `echo`, the prompt's too", 2, endpoints=COMPLETIONS),
    _honoured("logprobs", "each token's logprob", True, endpoints=CHAT),
    Row("top_logprobs", "honoured", "0 to 20 alternatives per token; needs `logprobs`",
        {"logprobs": True, "top_logprobs": 2}, CHAT),
    _refused("prompt_logprobs", "on /v1/completions use `echo` with `logprobs`", 1),
    _refused("logprob_token_ids", "", [5]),
    _refused("return_tokens_as_token_ids", "", True, accepts=False),
    _refused("return_token_ids", "", True, accepts=False),
    _refused("return_token_offsets", "", True, accepts=False),
    _refused("return_prompt_text", "", True, accepts=False, endpoints=CHAT),
    # ---- streaming ----------------------------------------------------------------------------
    _honoured("stream", "server-sent events ending in `data: [DONE]`", True),
    Row("stream_options.include_usage", "honoured", "a last chunk with the usage", {
        **_STREAM, "stream_options": {"include_usage": True}}),
    Row("stream_options.continuous_usage_stats", "honoured", "with `include_usage`: every chunk carries the usage "
        "so far (all choices together)", {**_STREAM, "stream_options": {"include_usage": True,
                                                                         "continuous_usage_stats": True}},
        source="vLLM", baseline={**_STREAM, "stream_options": {"include_usage": True}}),
    Row("stream_options.include_obfuscation", "ignored", "no obfuscation padding is sent", {
        **_STREAM, "stream_options": {"include_obfuscation": False}}, baseline=_STREAM),
    _refused("stream_interval", "each engine step is sent as it comes", 4),
    # ---- chat template ------------------------------------------------------------------------
    _honoured("add_generation_prompt", "default true (false when `continue_final_message`)", False,
              endpoints=CHAT, source="vLLM"),
    Row("continue_final_message", "honoured", "the answer continues the final (assistant) message; not with "
        "`add_generation_prompt` true", {"messages": [_USER, {"role": "assistant", "content": "Sure"}],
                                         "continue_final_message": True}, CHAT, "vLLM",
        baseline={"messages": [_USER, {"role": "assistant", "content": "Sure"}], "add_generation_prompt": False}),
    _honoured("chat_template_kwargs", "variables for the model's chat template; not its reserved arguments "
              "(`tokenize`, `chat_template`, `add_generation_prompt`, ...)", {"greeting": "hi"}, endpoints=CHAT,
              source="vLLM"),
    _refused("chat_template", "a request may not send template code; the model's own is used", "{{ messages }}",
             endpoints=CHAT),
    _refused("documents", "", [{"title": "t", "text": "x"}], endpoints=CHAT),
    _honoured("add_special_tokens", "completions default true, chat default false (the template adds them)", False,
              endpoints=COMPLETIONS, source="vLLM"),
    _honoured("add_special_tokens", "completions default true, chat default false (the template adds them)", True,
              endpoints=CHAT, source="vLLM"),
    _refused("truncate_prompt_tokens", "a prompt that does not fit is refused instead", 4),
    _refused("truncation_side", "", "left"),
    _refused("reasoning_effort", "no reasoning models are served", "low", endpoints=CHAT, source="OpenAI, vLLM"),
    _ignored("include_reasoning", "no reasoning parser is served: there is nothing to include", False,
             endpoints=CHAT, source="vLLM"),
    _refused("verbosity", "", "low", endpoints=CHAT, source="OpenAI"),
    # ---- tools --------------------------------------------------------------------------------
    _refused("tools", "no tool parser is served; an empty list is accepted", [_TOOL], accepts=[], endpoints=CHAT,
             source="OpenAI"),
    Row("tool_choice: none", "ignored", "no tool is ever called", {"tool_choice": "none"}, CHAT),
    _refused("tool_choice", "other than `none`: no tool parser is served", "auto", accepts="none", endpoints=CHAT,
             source="OpenAI"),
    _ignored("parallel_tool_calls", "no tool is ever called", False, endpoints=CHAT),
    _refused("functions", "deprecated; no tool parser is served; an empty list is accepted", [_TOOL["function"]],
             accepts=[], endpoints=CHAT, source="OpenAI"),
    _refused("function_call", "deprecated; other than `none`: no tool parser is served", "auto", accepts="none",
             endpoints=CHAT, source="OpenAI"),
    # ---- other modalities and OpenAI-hosted features ------------------------------------------
    Row("modalities: [\"text\"]", "ignored", "text is what is served", {"modalities": ["text"]}, CHAT),
    _refused("modalities", "other than `[\"text\"]`: the served models write text only", ["text", "audio"],
             accepts=["text"], endpoints=CHAT, source="OpenAI"),
    _refused("audio", "the served models write text only", {"voice": "alloy", "format": "wav"}, endpoints=CHAT,
             source="OpenAI"),
    _refused("web_search_options", "", {}, endpoints=CHAT, source="OpenAI"),
    _refused("moderation", "", {"model": "omni-moderation-latest"}, endpoints=CHAT, source="OpenAI"),
    _refused("prompt_embeds", "", "AAAA", endpoints=COMPLETIONS),
    _refused("mm_processor_kwargs", "the served models read text only", {"x": 1}, endpoints=CHAT),
    _refused("media_io_kwargs", "the served models read text only", {"x": {}}, endpoints=CHAT),
    _refused("mm_payload", "", "none", accepts="tensors"),
    _refused("return_mm_kwargs", "", False),
    # ---- serving internals --------------------------------------------------------------------
    _refused("cache_salt", "the server salts each tenant's prefix cache itself", "salt"),
    _refused("priority", "requests are served first come, first served", 1, accepts=0),
    _refused("request_id", "the server names each response (`id`, `x-request-id`)", "my-id"),
    _refused("kv_transfer_params", "", {}),
    _refused("ec_transfer_params", "", {}),
    _refused("vllm_xargs", "", {"x": 1}),
    _refused("routed_experts_prompt_start", "", 1, accepts=0),
    # ---- bookkeeping --------------------------------------------------------------------------
    _honoured("user", "the sticky key of A/B experiments (else the API key)", "user-1",
              checked_by="tests/test_experiments_assign.py"),
    _ignored("metadata", "", {"k": "v"}, endpoints=CHAT),
    _ignored("store", "nothing is stored", True, endpoints=CHAT),
    _ignored("service_tier", "one tier", "auto", endpoints=CHAT),
    _ignored("safety_identifier", "", "s-1", endpoints=CHAT),
    _ignored("prompt_cache_key", "prefix caching is automatic, per tenant", "k", endpoints=CHAT),
    _ignored("prompt_cache_options", "prefix caching is automatic, per tenant", {"mode": "implicit"}, endpoints=CHAT),
    _ignored("prompt_cache_retention", "prefix caching is automatic, per tenant", "24h", endpoints=CHAT),
    _ignored("prediction", "a latency hint; the output is the same without it",
             {"type": "content", "content": "x"}, endpoints=CHAT),
    _ignored("session_id", "", "s-1", source="vLLM"),
)


def rows(endpoint: Endpoint) -> tuple[Row, ...]:
    return tuple(r for r in ROWS if endpoint in r.endpoints)


def generated(endpoint: Endpoint, status: Status) -> dict[str, Row]:
    """The rows `serving.schemas` declares as fields for `endpoint`, by field name."""
    return {r.field: r for r in rows(endpoint) if r.generated and r.status == status}


def refusal(row: Row) -> str:
    """The message of a refused row's 400."""
    note = f": {row.note}" if row.note else ""
    return f"'{row.key}' is not supported by this server{note} (see docs/openai-compat.md)"


# ---- the document -------------------------------------------------------------------------------
_ENDPOINTS = {BOTH: "both", COMPLETIONS: "completions", CHAT: "chat"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """The table of docs/openai-compat.md, between its markers."""
    lines = ["| field | endpoints | from | status | notes | example |", "|---|---|---|---|---|---|"]
    for r in ROWS:
        example = json.dumps(r.example, separators=(",", ":"))
        lines.append(f"| `{_cell(r.field)}` | {_ENDPOINTS[r.endpoints]} | {r.source} | {r.status} | {_cell(r.note)} "
                     f"| `{_cell(example)}` |")
    return "\n".join(lines) + "\n"


TABLE_START = "<!-- request-fields:start (generated by alter_serve.serving.request_fields.render_markdown) -->"
TABLE_END = "<!-- request-fields:end -->"
