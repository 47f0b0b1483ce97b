"""The request-field table (`serving.request_fields`, docs/openai-compat.md) against the server.

The document is the table rendered; the table covers every field of the OpenAI SDK's requests and
of vLLM's server; and every row's example, sent through the real app (routes, schemas, generator)
to a fake engine, does what its status says: an honoured row changes the engine's prompt or
SamplingParams, or the response, against its baseline; an ignored row changes neither; a refused
row is a 400 naming the field. Then the message rendering vLLM does (names, tool messages, text
parts joined by a newline), continuous usage, logit_bias checks, and the `default` model."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params
from tokenizers import processors
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import StructuredOutputsParams

from alter_serve.serving import request_fields
from alter_serve.api.app import create_app
from alter_serve.serving.generation import Generator
from alter_serve.serving.routing import Target, cache_salt
from alter_serve.serving.schemas import ChatCompletionRequest, CompletionRequest

from .admin_app import build_service
from .tiny_model import build_tiny_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "openai-compat.md"
# Renders what vLLM passes a template: names, tool results and calls (arguments parsed), variables.
TEMPLATE = (
    "{% for m in messages %}{{ m.role }}{% if m.name %}({{ m.name }}){% endif %}"
    "{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}"
    "{% for c in m.tool_calls or [] %}<{{ c.function.name }} q={{ c.function.arguments.q }}>{% endfor %}"
    ": {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    "{% if greeting %}{{ greeting }}{% endif %}")
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
BASE = {"completions": {"model": "original", "prompt": "hello", "max_tokens": 2},
        "chat": {"model": "original", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}}


class FakeEngine:
    """Records each generate call's (prompt ids, SamplingParams); answers n choices of one token."""

    def __init__(self, tokenizer, max_model_len: int = 512):
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.calls: list[tuple[list[int], object]] = []

    async def generate(self, ids, params, lora, cache_salt=None):
        self.calls.append((list(ids), params))
        logprobs = None if params.logprobs is None else [{40: Logprob(-0.5, rank=1), 41: Logprob(-1.5, rank=2)}]
        outputs = [CompletionOutput(i, "ok", [40], None, logprobs, finish_reason="length") for i in range(params.n)]
        yield RequestOutput("r", None, ids, None, outputs, finished=True)

    async def prompt_logprobs(self, ids, top_k, lora, cache_salt=None):
        return [None] + [{tid: Logprob(-1.0, rank=1)} for tid in ids[1:]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compat")
    service = build_service(build_tiny_model(tmp / "model"), tmp / "serve")
    service.registry.create_tenant("acme", views=["original"], default_view="original")
    key = service.registry.create_key("acme")[1]
    tokenizer = service.engine.tokenizer
    tokenizer.chat_template = TEMPLATE
    # A BOS the tokenizer adds, so that add_special_tokens has something to add.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    engine = FakeEngine(tokenizer)
    service.generator = Generator(engine)

    def target(model, routed, principal):
        lease = SimpleNamespace(version=SimpleNamespace(label=f"{routed.view}@base", version=None), lora=None,
                                release=lambda: None)
        return Target(model, lease, routed.experiment, routed.arm, cache_salt=cache_salt(principal))

    service.router.lease = target
    client = TestClient(create_app(service, start_engine=False), headers={"Authorization": f"Bearer {key}"})
    return SimpleNamespace(client=client, engine=engine, service=service, tokenizer=tokenizer)


def send(served, endpoint: str, fields: dict):
    """POST the endpoint's minimal request with `fields`; return (response, engine calls, comparable body)."""
    served.engine.calls.clear()
    response = served.client.post(ENDPOINTS[endpoint], json={**BASE[endpoint], **fields})
    return response, list(served.engine.calls), _comparable(response)


def _comparable(response):
    """The response without what differs on every request (ids, timestamps)."""
    def strip(payload):
        return {k: v for k, v in payload.items() if k not in ("id", "created")} if isinstance(payload, dict) else payload
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return [strip(json.loads(line[6:])) if line != "data: [DONE]" else line
                for line in response.text.splitlines() if line.startswith("data: ")]
    return strip(response.json())


ROWS = [(endpoint, row) for row in request_fields.ROWS for endpoint in row.endpoints]


@pytest.mark.parametrize("endpoint,row", ROWS, ids=[f"{e}:{r.field}:{r.status}" for e, r in ROWS])
def test_every_row_does_what_the_table_says(served, endpoint, row):
    response, calls, body = send(served, endpoint, row.example)
    if row.status == "refused":
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == row.refusal_param and "not supported" in error["message"], error
        assert not calls
        return
    assert response.status_code == 200, response.text
    if row.checked_by:
        return
    _, base_calls, base_body = send(served, endpoint, row.baseline_request())
    same = (calls, body) == (base_calls, base_body)
    assert same == (row.status == "ignored"), (calls, base_calls, body, base_body)


def _sdk_fields(params) -> set[str]:
    return set(typing.get_type_hints(params.CompletionCreateParamsStreaming))


def _vllm_fields(endpoint: str) -> set[str]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletion

    return set((VllmCompletion if endpoint == "completions" else VllmChat).model_fields)


@pytest.mark.parametrize("endpoint,sdk", [("completions", completion_create_params), ("chat", chat_create_params)])
def test_the_table_lists_every_field_of_the_openai_sdk_vllm_and_the_schema(endpoint, sdk):
    listed = {row.key for row in request_fields.rows(endpoint)}
    schema = CompletionRequest if endpoint == "completions" else ChatCompletionRequest
    assert _sdk_fields(sdk) - listed == set()
    assert _vllm_fields(endpoint) - listed == set()
    assert set(schema.model_fields) - listed == set()


def test_the_document_is_the_table():
    text = DOC.read_text()
    start = text.index(request_fields.TABLE_START) + len(request_fields.TABLE_START) + 1
    assert text[start:text.index(request_fields.TABLE_END)] == request_fields.render_markdown()
    readme = (DOC.parents[1] / "README.md").read_text()
    assert "(docs/openai-compat.md)" in readme


def test_an_unknown_field_is_refused_as_openai_does(served):
    response, calls, _ = send(served, "completions", {"tempreature": 0.5})
    assert response.status_code == 400 and not calls
    assert response.json()["error"]["message"] == "Unrecognized request argument supplied: tempreature"
    assert response.json()["error"]["param"] == "tempreature"


def test_a_refused_field_at_the_value_that_asks_nothing_is_accepted(served):
    fields = {"use_beam_search": False, "priority": 0, "tools": [], "tool_choice": "none", "echo": False}
    assert send(served, "chat", fields)[0].status_code == 200


# ---- sampling extras ----------------------------------------------------------------------------
def test_sampling_extras_reach_the_engine(served):
    _, calls, _ = send(served, "completions", {
        "top_k": 7, "min_p": 0.2, "repetition_penalty": 1.3, "logit_bias": {"5": -100, "6": 2.5},
        "stop_token_ids": [9], "allowed_token_ids": [5, 6, 9], "bad_words": ["no"]})
    params = calls[0][1]
    assert (params.top_k, params.min_p, params.repetition_penalty) == (7, 0.2, 1.3)
    assert params.logit_bias == {5: -100.0, 6: 2.5} and params.stop_token_ids == [9]
    assert params.allowed_token_ids == [5, 6, 9] and params.bad_words == ["no"]


@pytest.mark.parametrize("bias,param", [({"99999": 1}, "logit_bias"), ({"5": 101}, "logit_bias"),
                                        ({"x": 1}, "logit_bias.x")])
def test_logit_bias_keys_are_token_ids_in_the_vocabulary_and_values_within_100(served, bias, param):
    response, calls, _ = send(served, "chat", {"logit_bias": bias})
    assert response.status_code == 400 and not calls
    assert response.json()["error"]["param"] == param


def test_response_format_becomes_vllm_structured_outputs(served):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    _, calls, _ = send(served, "chat", {"response_format": {"type": "json_schema",
                                                            "json_schema": {"name": "a", "schema": schema}}})
    assert calls[0][1].structured_outputs == StructuredOutputsParams(json=schema)
    _, calls, _ = send(served, "completions", {"response_format": {"type": "json_object"}})
    assert calls[0][1].structured_outputs == StructuredOutputsParams(json_object=True)
    response, _, _ = send(served, "chat", {"response_format": {"type": "json_schema"}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


def test_best_of_other_than_n_is_refused_by_name(served):
    assert send(served, "completions", {"n": 3, "best_of": 3})[0].status_code == 200
    error = send(served, "completions", {"n": 2, "best_of": 4})[0].json()["error"]
    assert error["param"] == "best_of" and "not supported" in error["message"]


def test_continuous_usage_puts_the_usage_so_far_on_every_chunk(served):
    fields = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "n": 2}
    for endpoint in ENDPOINTS:
        chunks = send(served, endpoint, fields)[2][:-1]
        assert all(c["usage"]["prompt_tokens"] > 0 for c in chunks)
        assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 2]  # one token per choice; the last: usage
        assert chunks[-1]["choices"] == []


# ---- messages -----------------------------------------------------------------------------------
def _prompt(served, messages: list[dict], **fields) -> str:
    response, calls, _ = send(served, "chat", {"messages": messages, **fields})
    assert response.status_code == 200, response.text
    return served.tokenizer.decode(calls[0][0])


def test_messages_are_rendered_as_vllm_renders_them(served):
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": \"cats\"}"}}
    text = _prompt(served, [
        {"role": "developer", "content": [{"type": "text", "text": "be"}, {"type": "text", "text": "brief"}]},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"}])
    assert text == ("system: be\nbrief\nuser(ann): hi\nassistant<lookup q=cats>: \ntool[c1]: 42\nassistant:")


def test_the_template_options(served):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]
    assert _prompt(served, messages, continue_final_message=True).endswith("assistant: Sure")
    assert _prompt(served, [messages[0]], chat_template_kwargs={"greeting": "Hey"}).endswith("assistant:Hey")
    assert _prompt(served, [messages[0]], add_generation_prompt=False) == "user: hi\n"
    assert _prompt(served, [messages[0]], add_special_tokens=True).startswith("<s>")


@pytest.mark.parametrize("fields,param", [
    ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
    ({"continue_final_message": True}, "continue_final_message"),  # the last message is the user's
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0.tool_calls"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
])
def test_template_inputs_it_cannot_render_are_refused_by_name(served, fields, param):
    response, calls, _ = send(served, "chat", fields)
    assert response.status_code == 400 and not calls, response.text
    assert response.json()["error"]["param"] == param


# ---- models -------------------------------------------------------------------------------------
def test_default_serves_the_tenants_default_view_and_is_listed_with_the_context_length(served):
    response = served.client.post("/v1/completions", json={**BASE["completions"], "model": "default"})
    assert response.status_code == 200 and response.headers["x-alter-view"] == "original@base"
    assert response.json()["model"] == "default"
    cards = {card["id"]: card for card in served.client.get("/v1/models").json()["data"]}
    assert set(cards) == {"original", "default"} and cards["default"]["default_view"] == "original"
    assert cards["original"]["max_model_len"] == served.service.engine.config.max_model_len  # engine not started
    assert served.client.get("/v1/models/default").json() == cards["default"]
