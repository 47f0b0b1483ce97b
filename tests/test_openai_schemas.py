"""Request bodies as the OpenAI API accepts them (null = default, echo with max_tokens 0, 20 top
logprobs, stream_options.include_obfuscation) and validation errors as it reports them (`param` is
the parameter, without pydantic's union tags; a 405 keeps its Allow header)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from alter_serve.api.errors import install_error_handlers
from alter_serve.serving.schemas import ChatCompletionRequest, CompletionRequest

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client():
    app = FastAPI()  # the bodies alone: not the /v1 paths, whose validation errors authenticate first
    install_error_handlers(app)

    @app.post("/completions")
    async def completions(body: CompletionRequest) -> dict:
        return body.model_dump()

    @app.post("/chat")
    async def chat(body: ChatCompletionRequest) -> dict:
        return body.model_dump()

    return TestClient(app)


def error(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize("field", ["temperature", "top_p", "n", "stream", "stop", "seed", "user", "presence_penalty",
                                   "frequency_penalty", "echo", "logprobs", "max_tokens", "stream_options",
                                   "ignore_eos", "min_tokens"])
def test_null_on_an_optional_completion_field_means_its_default(client, field):
    sent = client.post("/completions", json={"model": "m", "prompt": "x", field: None})
    assert sent.status_code == 200, sent.text
    assert sent.json()[field] == CompletionRequest.model_fields[field].default


@pytest.mark.parametrize("field", ["logprobs", "top_logprobs", "max_tokens", "max_completion_tokens", "n", "temperature"])
def test_null_on_an_optional_chat_field_means_its_default(client, field):
    sent = client.post("/chat", json={"model": "m", "messages": MESSAGES, field: None})
    assert sent.status_code == 200, sent.text
    assert sent.json()[field] == ChatCompletionRequest.model_fields[field].default


def test_null_on_a_required_field_is_still_refused_by_name(client):
    assert error(client.post("/completions", json={"model": None, "prompt": "x"}))["param"] == "model"
    assert error(client.post("/chat", json={"model": "m", "messages": None}))["param"] == "messages"


def test_max_tokens_0_is_allowed_with_echo_only(client):
    assert client.post("/completions", json={"model": "m", "prompt": "x", "echo": True, "max_tokens": 0}).status_code == 200
    err = error(client.post("/completions", json={"model": "m", "prompt": "x", "max_tokens": 0}))
    assert err["param"] == "max_tokens" and "echo" in err["message"]


def test_up_to_20_chat_top_logprobs_and_the_dependency_names_its_parameter(client):
    body = {"model": "m", "messages": MESSAGES, "logprobs": True}
    assert client.post("/chat", json={**body, "top_logprobs": 20}).status_code == 200
    assert error(client.post("/chat", json={**body, "top_logprobs": 21}))["param"] == "top_logprobs"
    err = error(client.post("/chat", json={"model": "m", "messages": MESSAGES, "top_logprobs": 2}))
    assert err["param"] == "top_logprobs" and "logprobs" in err["message"]


def test_stream_options_of_newer_clients_are_accepted(client):
    body = {"model": "m", "prompt": "x", "stream": True,
            "stream_options": {"include_usage": True, "include_obfuscation": False}}
    assert client.post("/completions", json=body).status_code == 200
    err = error(client.post("/completions", json={"model": "m", "prompt": "x", "stream_options": {}}))
    assert err["param"] == "stream_options"


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "prompt": 5}, "prompt"),
    ({"model": "m", "prompt": [1, "a"]}, "prompt"),
    ({"model": "m", "prompt": [True, 2]}, "prompt"),  # a boolean is not a token id
])
def test_param_names_the_parameter_not_the_union_member(client, body, param):
    err = error(client.post("/completions", json=body))
    assert err["param"] == param, err
    assert "str" not in err["message"].split("parameter")[-1] and "list[" not in err["message"]


def test_param_of_a_chat_message_content(client):
    err = error(client.post("/chat", json={"model": "m", "messages": [{"role": "user", "content": None}]}))
    assert err["param"] == "messages.0.content"
    parts = [{"type": "image_url", "image_url": {"url": "x"}}]
    err = error(client.post("/chat", json={"model": "m", "messages": [{"role": "user", "content": parts}]}))
    assert err["param"] == "messages.0.content" and "TextPart" not in err["message"]


def test_method_not_allowed_keeps_the_allow_header(client):
    response = client.get("/completions")
    assert error(response, 405)["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"
