"""The OpenAI routes around the generator, without an engine (the app on the tiny model; the
generator and the view lease are fakes): a client that disconnects cancels its non-streaming
request and frees what it held; failures are metered with the status the client got; model
listing and retrieval cover experiment aliases."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest
from vllm.exceptions import VLLMValidationError

from alter_serve.api.app import create_app
from alter_serve.serving.planning import Plan, Prompt
from alter_serve.serving.routing import Target, cache_salt
from alter_serve.engine.vllm_engine import EngineUnavailable
from alter_serve.registry import Limits

from .admin_app import build_service
from .tiny_model import build_tiny_model

ARMS = [{"name": "control", "view": "original", "weight": 1}, {"name": "treat", "view": "original", "weight": 1}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routes")
    service = build_service(build_tiny_model(tmp / "model"), tmp / "serve")
    registry = service.registry
    registry.create_tenant("acme", views=["original"], default_view="original", limits=Limits(max_tokens_cap=5))
    registry.create_tenant("other", views=["original"], default_view="original")
    registry.create_experiment("ab", alias="chat-ab", tenants=["acme"], arms=ARMS)
    registry.create_experiment("old", alias="old-ab", tenants=["acme"], arms=ARMS, status="stopped")
    keys = {name: registry.create_key(name)[1] for name in ("acme", "other")}
    return SimpleNamespace(service=service, app=create_app(service, start_engine=False), keys=keys)


class FakeGenerator:
    """Plans instantly; `completion` runs until cancelled, or raises `fail`."""

    def __init__(self, fail: Exception | None = None):
        self.fail = fail
        self.limit = None
        self.started = self.cancelled = False

    async def plan_completion(self, body, limit=None, budget=None):
        self.limit = limit
        return Plan([Prompt([1, 2, 3])], None)

    async def completion(self, body, plan, target, outcome):
        self.started = True
        if self.fail is not None:
            raise self.fail
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    async def completion_stream(self, body, plan, target, outcome):
        yield "data: {}\n\n"


@pytest.fixture
def served(setup, monkeypatch):
    """The app with a fake generator and leases; yields (setup, generator, leases, logged rows)."""
    leases, rows = [], []

    def target(model, routed, principal):
        lease = SimpleNamespace(version=SimpleNamespace(label="original@base", version=None), lora=None, released=False)
        lease.release = lambda: setattr(lease, "released", True)
        leases.append(lease)
        return Target(model, lease, routed.experiment, routed.arm, cache_salt=cache_salt(principal))

    generator = FakeGenerator()
    monkeypatch.setattr(setup.service.router, "lease", target)
    monkeypatch.setattr(setup.service, "generator", generator)
    monkeypatch.setattr(setup.service.request_log, "append", rows.append)
    return setup, generator, leases, rows


def _scope(app, path: str, key: str, body: bytes) -> dict:
    headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {key}".encode()),
               (b"content-length", str(len(body)).encode())]
    return {"type": "http", "http_version": "1.1", "method": "POST", "path": path, "raw_path": path.encode(),
            "query_string": b"", "headers": headers, "scheme": "http", "server": ("test", 80),
            "client": ("127.0.0.1", 1), "root_path": "", "app": app}


def test_a_client_that_disconnects_cancels_its_request_and_frees_its_permit_and_lease(served):
    setup, generator, leases, rows = served
    body = json.dumps({"model": "original", "prompt": "hi"}).encode()

    async def scenario():
        gone, read = asyncio.Event(), False

        async def receive():
            nonlocal read
            if not read:
                read = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        sent = []

        async def send(message):
            sent.append(message)

        call = asyncio.create_task(setup.app(_scope(setup.app, "/v1/completions", setup.keys["acme"], body),
                                             receive, send))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if generator.started:
                break
        assert generator.started and not call.done()
        gone.set()  # the client hangs up
        await asyncio.wait_for(call, 5)

    asyncio.run(scenario())
    assert generator.cancelled and leases[-1].released
    assert generator.limit == 5  # the tenant's cap, for a body that sent no max_tokens
    assert rows[-1].status_code == 499
    tenant_id = setup.service.registry.authenticate(setup.keys["acme"]).tenant_id
    assert setup.service.limiter.usage(tenant_id)["active"] == 0


@pytest.mark.parametrize("failure,status,code", [
    (EngineUnavailable("restarting after a crash"), 503, "service_unavailable"),
    (VLLMValidationError("Token id 9999 is out of vocabulary", parameter="prompt"), 400, None),
])
def test_a_failure_is_answered_and_metered_with_one_status(served, failure, status, code):
    setup, generator, leases, rows = served
    generator.fail = failure

    async def post():
        transport = httpx.ASGITransport(app=setup.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/completions", json={"model": "original", "prompt": "hi", "max_tokens": 2},
                                     headers={"Authorization": f"Bearer {setup.keys['acme']}"})

    response = asyncio.run(post())
    assert response.status_code == status and response.json()["error"]["code"] == code
    assert rows[-1].status_code == status and leases[-1].released


def _get(setup, path: str, key: str) -> httpx.Response:
    async def get():
        transport = httpx.ASGITransport(app=setup.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path, headers={"Authorization": f"Bearer {key}"})

    return asyncio.run(get())


def test_models_list_experiment_aliases_and_each_can_be_retrieved(setup):
    listed = _get(setup, "/v1/models", setup.keys["acme"]).json()["data"]
    # the stopped experiment's alias is not usable; `default` is the tenant's default view
    assert [m["id"] for m in listed] == ["chat-ab", "default", "original"]
    alias = _get(setup, "/v1/models/chat-ab", setup.keys["acme"])
    assert alias.status_code == 200 and alias.json()["experiment"]["name"] == "ab"
    assert alias.json()["object"] == "model" and alias.json() == next(m for m in listed if m["id"] == "chat-ab")
    assert _get(setup, "/v1/models/original", setup.keys["acme"]).json()["lineage"]["version"] == "base"
    assert [m["id"] for m in _get(setup, "/v1/models", setup.keys["other"]).json()["data"]] == ["default", "original"]
    assert _get(setup, "/v1/models/chat-ab", setup.keys["other"]).status_code == 404  # another tenant's alias


@pytest.mark.parametrize("name", ["nope", "old-ab", "a/b", "Original"])
def test_retrieving_a_model_one_may_not_use_is_model_not_found(setup, name):
    response = _get(setup, f"/v1/models/{name}", setup.keys["acme"])
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": f"The model '{name}' does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
