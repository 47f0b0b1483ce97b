"""The OpenAI-compatible API, judged by the official `openai` client against a live server."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

pytestmark = pytest.mark.vllm
PROMPT = "Question: What genre does the author write?\nAnswer:"


def test_models_lists_only_granted_views_with_lineage(live_server):
    models = {m.id: m for m in live_server.client().models.list().data}
    assert {"original", "forget-all", "swap"} <= set(models)
    assert "rnd-x" not in models  # the other tenant's private view
    lineage = models["forget-all"].model_extra["lineage"]
    assert lineage["bundle"] == "demo" and lineage["loaded"] is True
    assert lineage["heads"]["retain"] == 1.0 and set(lineage["heads"]["forget"]) and len(lineage["version"]) == 12
    assert models["original"].model_extra["lineage"]["bundle"] is None
    other = {m.id: m for m in live_server.client("other").models.list().data}
    # `default` is the tenant's default view under a name every tenant's client can use.
    assert set(other) == {"original", "rnd-x", "default"}
    assert other["default"].model_extra["default_view"] in {"original", "rnd-x"}


def test_completion_string_and_list_prompts_with_usage(live_server):
    client = live_server.client()
    one = client.completions.create(model="original", prompt=PROMPT, max_tokens=8, temperature=0)
    assert len(one.choices) == 1 and one.choices[0].text
    assert one.usage.completion_tokens == 8 or one.choices[0].finish_reason == "stop"
    assert one.usage.total_tokens == one.usage.prompt_tokens + one.usage.completion_tokens
    many = client.completions.create(model="original", prompt=[PROMPT, "Question: Who?\nAnswer:"], max_tokens=4,
                                     temperature=0.8, n=2, seed=3)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    assert many.usage.prompt_tokens > one.usage.prompt_tokens
    assert 4 <= many.usage.completion_tokens <= 16
    greedy = client.completions.create(model="original", prompt=PROMPT, max_tokens=8, temperature=0, n=2)
    assert [c.text for c in greedy.choices] == [one.choices[0].text] * 2  # n greedy choices, as OpenAI


def test_greedy_is_deterministic_and_seed_reproduces_sampling(live_server):
    client = live_server.client()
    a = client.completions.create(model="forget-all", prompt=PROMPT, max_tokens=12, temperature=0)
    b = client.completions.create(model="forget-all", prompt=PROMPT, max_tokens=12, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    s1 = client.completions.create(model="original", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7)
    s2 = client.completions.create(model="original", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7)
    assert s1.choices[0].text == s2.choices[0].text


def test_stop_sequence_cuts_output(live_server):
    client = live_server.client()
    full = client.completions.create(model="original", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    cut_at = full.strip()[:3]
    stopped = client.completions.create(model="original", prompt=PROMPT, max_tokens=16, temperature=0,
                                        stop=[cut_at]).choices[0]
    assert cut_at not in stopped.text and stopped.finish_reason == "stop"


def test_echo_logprobs_cover_prompt_and_completion(live_server):
    out = live_server.client().completions.create(model="forget-all", prompt=PROMPT, max_tokens=3, temperature=0,
                                                  echo=True, logprobs=2).choices[0]
    assert out.text.startswith(PROMPT)
    lp = out.logprobs
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(lp.top_logprobs)
    assert "".join(lp.tokens) == out.text
    assert lp.text_offset == sorted(lp.text_offset)
    assert all(len(top) >= 2 for top in lp.top_logprobs[1:])


def test_echo_with_max_tokens_0_scores_the_prompt_alone(live_server):
    client = live_server.client()
    scored = client.completions.create(model="forget-all", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    one = client.completions.create(model="forget-all", prompt=PROMPT, max_tokens=1, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == PROMPT and scored.usage.completion_tokens == 0
    assert "".join(choice.logprobs.tokens) == PROMPT
    assert choice.logprobs.token_logprobs == pytest.approx(one.choices[0].logprobs.token_logprobs[:-1], abs=1e-5)


def test_token_prompts_with_multi_byte_characters_echo_exactly(live_server):
    from transformers import AutoTokenizer

    text = "Question: Où est né l'auteur — 東京?\nAnswer:"
    ids = AutoTokenizer.from_pretrained(live_server.model_dir)(text)["input_ids"]
    out = live_server.client().completions.create(model="original", prompt=ids, max_tokens=0, echo=True,
                                                  logprobs=2).choices[0]
    assert out.text == text and "".join(out.logprobs.tokens) == text
    assert [text[o:o + len(t)] for o, t in zip(out.logprobs.text_offset, out.logprobs.tokens)] == out.logprobs.tokens
    keys = [k for top in out.logprobs.top_logprobs[1:] for k in top]
    assert "\ufffd" not in "".join(keys)  # a partial character is shown as bytes:\x.., never as U+FFFD


def test_explicit_nulls_mean_defaults(live_server):
    nulls = {k: None for k in ("temperature", "top_p", "n", "stream", "stop", "seed", "presence_penalty",
                               "frequency_penalty", "echo", "logprobs", "user", "stream_options")}
    with live_server.http() as http:
        completion = http.post("/v1/completions", json={"model": "original", "prompt": PROMPT, "max_tokens": 2,
                                                        **nulls})
        chat = http.post("/v1/chat/completions", json={"model": "original", "max_tokens": None, "logprobs": None,
                                                        "top_logprobs": None, "n": None, "temperature": None,
                                                        "messages": [{"role": "user", "content": "Hi"}]})
    assert completion.status_code == 200, completion.text
    assert len(completion.json()["choices"]) == 1 and completion.json()["usage"]["completion_tokens"] <= 2
    assert chat.status_code == 200, chat.text


def test_streaming_completion_is_sse_and_ends_with_done(live_server):
    body = {"model": "original", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with live_server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 6 and chunks[-1]["choices"] == []
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    plain = live_server.client().completions.create(model="original", prompt=PROMPT, max_tokens=6, temperature=0)
    assert text == plain.choices[0].text


def test_chat_completion_uses_the_chat_template(live_server):
    client = live_server.client()
    chat = client.chat.completions.create(model="original", temperature=0, max_tokens=10,
                                          messages=[{"role": "user", "content": "What genre does the author write?"}])
    plain = client.completions.create(model="original", prompt=PROMPT, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.prompt_tokens > 0 and chat.system_fingerprint.startswith("alter:original@")


def test_chat_logprobs_top_k_by_rank_and_exact_bytes(live_server):
    client = live_server.client()
    messages = [{"role": "user", "content": "What genre does the author write?"}]
    chat = client.chat.completions.create(model="original", temperature=0, max_tokens=4, logprobs=True,
                                          top_logprobs=20, messages=messages)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for token in content:
        values = [t.logprob for t in token.top_logprobs]
        assert len(values) == 20 and values == sorted(values, reverse=True)
        assert token.logprob == pytest.approx(values[0], abs=1e-5)  # greedy: the chosen token ranks first
    assert b"".join(bytes(t.bytes) for t in content).decode().startswith(chat.choices[0].message.content)
    bare = client.chat.completions.create(model="original", temperature=0, max_tokens=2, logprobs=True,
                                          messages=messages)
    assert all(t.top_logprobs == [] for t in bare.choices[0].logprobs.content)


def test_models_can_be_retrieved_one_by_one(live_server):
    client = live_server.client()
    assert client.models.retrieve("forget-all").id == "forget-all"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("rnd-x")  # another tenant's
    assert info.value.body["code"] == "model_not_found"


def test_chat_streaming_with_usage(live_server):
    stream = live_server.client().chat.completions.create(
        model="forget-all", temperature=0, max_tokens=5, stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},  # newer clients send the latter
        messages=[{"role": "user", "content": "What genre does the author write?"}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    # The usage chunk counts what was generated: all 5 tokens ("length"), or fewer when the view
    # ended its answer ("stop"; which one depends on the demo model this machine trained).
    used = chunks[-1].usage.completion_tokens
    finish = next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices and c.choices[0].finish_reason)
    assert 1 <= used <= 5 and finish == ("length" if used == 5 else "stop"), (used, finish)
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + used
    assert {c.system_fingerprint for c in chunks} == {chunks[0].system_fingerprint}


def test_response_headers_name_the_view_version(live_server):
    raw = live_server.client().completions.with_raw_response.create(model="forget-all", prompt=PROMPT, max_tokens=1)
    assert raw.headers["x-alter-view"].startswith("forget-all@")


# ---- errors: OpenAI body and status --------------------------------------------------------------
def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


@pytest.mark.parametrize("patch,param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"n": 0}, "n"),
    ({"logprobs": 9}, "logprobs"),
    ({"bogus_field": 1}, "bogus_field"),
])
def test_invalid_parameters_are_400(live_server, patch, param):
    body = {"model": "original", "prompt": PROMPT, "max_tokens": 4, **patch}
    with live_server.http() as http:
        err = _error(http.post("/v1/completions", json=body), 400)
    assert err["type"] == "invalid_request_error" and param in (err["param"] or "") + err["message"]


def test_bad_json_is_400(live_server):
    with live_server.http() as http:
        err = _error(http.post("/v1/completions", content=b'{"model": "original", "prompt": ',
                               headers={"content-type": "application/json"}), 400)
    assert "JSON" in err["message"]


def test_chat_errors_are_400(live_server):
    with live_server.http() as http:
        _error(http.post("/v1/chat/completions", json={"model": "original", "messages": []}), 400)
        _error(http.post("/v1/chat/completions", json={"model": "original", "max_tokens": 0,
                                                        "messages": [{"role": "user", "content": "hi"}]}), 400)


def test_oversized_body_is_413(live_server):
    with live_server.http() as http:
        err = _error(http.post("/v1/completions", json={"model": "original", "prompt": "x" * (9 << 20)}), 413)
    assert err["code"] == "request_too_large"


@pytest.mark.parametrize("key", [None, "as-not-a-real-key", "Bearer", "sk-wrong"])
def test_bad_or_missing_key_is_401(live_server, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=live_server.base_url, timeout=30) as http:
        err = _error(http.post("/v1/completions", json={"model": "original", "prompt": PROMPT}, headers=headers), 401)
        assert err["type"] == "authentication_error"
        # the key is checked before the body is parsed, so a bad key beats a bad body
        for path, body in (("/v1/completions", {"model": "original", "prompt": PROMPT, "max_tokens": -1}),
                           ("/v1/chat/completions", {"model": "original", "messages": "nope"})):
            assert _error(http.post(path, json=body, headers=headers), 401)["type"] == "authentication_error"


def test_openai_client_sees_typed_errors(live_server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key="as-wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        live_server.client().completions.create(model="nope", prompt=PROMPT, max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        live_server.client().completions.create(model="original", prompt=PROMPT, max_tokens=0)


@pytest.mark.parametrize("name", [
    "rnd-x",            # another tenant's view
    "Original", " original", "original ", "ORIGINAL", "forget-all\n",
    "does-not-exist", "",
])
def test_ungranted_or_unknown_models_are_the_same_404(live_server, name):
    with live_server.http() as http:
        response = http.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 1})
    if name == "":
        _error(response, 400)
        return
    err = _error(response, 404)
    assert err["code"] == "model_not_found"
    assert err["message"] == f"The model '{name}' does not exist or you do not have access to it."


def test_raw_base_path_and_versioned_names_are_404(live_server):
    with live_server.http() as http:
        version = http.get("/v1/models").json()["data"]
        label = next(m for m in version if m["id"] == "forget-all")["lineage"]["version"]
        for name in [str(live_server.model_dir), f"forget-all@{label}", "demo"]:
            _error(http.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 1}), 404)


def test_admin_endpoints_refuse_tenant_keys(live_server):
    with live_server.http("tenant") as http:
        err = _error(http.get("/admin/tenants"), 403)
    assert err["type"] == "permission_error"
    with live_server.http(None) as http:
        _error(http.get("/admin/views"), 401)


def test_health_ready_and_metrics(live_server):
    with live_server.http(None) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/ready").json()["ready"] is True
        _error(http.get("/metrics"), 401)  # its labels name every tenant and view: admins only
    with live_server.http("tenant") as http:
        _error(http.get("/metrics"), 403)
    with live_server.http("admin") as http:
        metrics = http.get("/metrics").text
    assert "alter_requests_total" in metrics and 'tenant="demo"' in metrics
    assert "vllm:lora_requests_info" in metrics


def test_response_format_and_vllm_sampling_extras_on_the_engine(live_server):
    """JSON mode and a JSON schema through vLLM's structured outputs on this backend; logit_bias,
    top_k and the default model through the official client; the context length on model cards."""
    client = live_server.client()
    ask = [{"role": "user", "content": "Describe a cat."}]
    anything = client.completions.create(model="original", prompt="Give me a JSON object about a cat:", max_tokens=64,
                                         temperature=0, extra_body={"response_format": {"type": "json_object"}})
    # This small model rambles inside a JSON string rather than close it, so JSON mode shows here as
    # an answer that opens an object; the schema below is tight enough for it to finish (with a
    # frequency penalty: else it pads the object with whitespace until max_tokens).
    assert anything.choices[0].text.startswith("{")
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"],
              "additionalProperties": False}
    shaped = client.chat.completions.create(
        model="default", messages=ask, max_tokens=64, temperature=0, frequency_penalty=2.0,  # no endless whitespace
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}}).choices[0]
    assert shaped.finish_reason == "stop", shaped.message.content
    assert isinstance(json.loads(shaped.message.content)["age"], int)

    forced = client.completions.create(model="original", prompt=PROMPT, max_tokens=3, temperature=1.0, seed=1,
                                       logprobs=0, logit_bias={"100": 100}).choices[0]
    assert len(set(forced.logprobs.tokens)) == 1  # one token, every time
    greedy = client.completions.create(model="original", prompt=PROMPT, max_tokens=8, temperature=0)
    top1 = client.completions.create(model="original", prompt=PROMPT, max_tokens=8, temperature=1.0,
                                     extra_body={"top_k": 1})
    assert top1.choices[0].text == greedy.choices[0].text
    assert all(m.model_extra["max_model_len"] > 0 for m in client.models.list().data)
