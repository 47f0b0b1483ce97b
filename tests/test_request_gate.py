"""What the app does before a route runs: the key is checked before an /admin or /v1 body is read,
and bodies over their path's limit answer 413 in the OpenAI format, also when sent chunked.

The app is driven at the ASGI level, so a test can see exactly how much of a body was read."""

from __future__ import annotations

import asyncio
import json

import pytest

from alter_serve.api.app import BodyLimit, create_app

from .admin_app import build_service
from .tiny_model import build_tiny_model

CHUNK = b"x" * (1 << 20)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    service = build_service(build_tiny_model(tmp / "model"), tmp / "serve", max_body_bytes=1 << 20)
    service.registry.create_tenant("acme")
    return service


@pytest.fixture(scope="module")
def app(service):
    return create_app(service, start_engine=False)


def call(app, method: str, path: str, *, key: str | None = None, chunks: int = 0,
         content_type: bytes = b"application/json", body: bytes | None = None) -> tuple[int, dict, int]:
    """Send a request straight to the ASGI app; the body is `body`, or `chunks` MiB sent chunked
    (no content-length). Returns (status, JSON body, how many body messages the app read)."""
    headers = [(b"content-type", content_type)]
    if key is not None:
        headers.append((b"authorization", b"Bearer " + key.encode()))
    parts = [body] if body is not None else [CHUNK] * chunks
    if body is not None:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "http_version": "1.1", "method": method, "path": path, "raw_path": path.encode(),
             "query_string": b"", "headers": headers, "scheme": "http", "server": ("test", 80),
             "client": ("127.0.0.1", 1), "root_path": "", "app": app}
    read = 0
    sent: list[dict] = []

    async def receive():
        nonlocal read
        if read < len(parts):
            read += 1
            return {"type": "http.request", "body": parts[read - 1], "more_body": read < len(parts)}
        await asyncio.sleep(3600)  # the client stays connected; the app must not wait for more

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=60))
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(payload), read


@pytest.mark.parametrize("path", ["/admin/bundles/upload", "/admin/bundles/demo/heads/bio", "/admin/tenants"])
def test_admin_body_is_not_read_without_an_admin_key(app, service, path):
    status, body, read = call(app, "POST" if path != "/admin/bundles/demo/heads/bio" else "PUT", path, chunks=64,
                              content_type=b"multipart/form-data; boundary=x")
    assert (status, body["error"]["code"], read) == (401, "invalid_api_key", 0)

    _, tenant_key = service.registry.create_key("acme")
    status, body, read = call(app, "POST", path, key=tenant_key, chunks=64, content_type=b"multipart/form-data; boundary=x")
    assert (status, body["error"]["type"], read) == (403, "permission_error", 0)


def test_admin_key_passes_the_gate_once(app, service, monkeypatch):
    _, admin_key = service.registry.create_key(None, "admin")
    calls = []
    authenticate = service.registry.authenticate
    monkeypatch.setattr(service.registry, "authenticate", lambda secret: calls.append(secret) or authenticate(secret))
    status, body, _ = call(app, "POST", "/admin/tenants", key=admin_key, body=json.dumps({"name": "initech"}).encode())
    assert status == 200 and body["name"] == "initech"
    assert calls == [admin_key]  # the route reuses the principal the gate authenticated


def test_chunked_body_over_the_limit_is_413_not_a_parse_error(app, service):
    _, admin_key = service.registry.create_key(None, "admin")
    status, body, read = call(app, "POST", "/admin/tenants", key=admin_key, chunks=3)
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    assert read == 2  # refused at the chunk that crossed the 1 MiB limit, the rest never read
    status, body, _ = call(app, "POST", "/v1/completions", key=admin_key, chunks=3)
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    assert "1048576-byte limit" in body["error"]["message"]


def test_declared_length_over_the_limit_is_413_before_reading(app, service):
    _, tenant_key = service.registry.create_key("acme")
    status, body, read = call(app, "POST", "/v1/chat/completions", key=tenant_key, body=b"{" + b" " * (2 << 20) + b"}")
    assert (status, body["error"]["code"], read) == (413, "request_too_large", 0)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/feedback"])
@pytest.mark.parametrize("key", [None, "as-not-a-real-key", "f" * 64])
def test_openai_body_is_not_read_without_a_valid_key(app, path, key):
    """The key is checked before the body is read, let alone JSON-parsed and validated: a caller
    without a key cannot make the server parse megabytes (issue 18: auth before body parsing)."""
    status, body, read = call(app, "POST", path, key=key, chunks=1)
    assert (status, body["error"]["code"], read) == (401, "invalid_api_key", 0)


def test_a_tenant_key_passes_the_gate_once_for_non_model_routes(app, service, monkeypatch):
    _, tenant_key = service.registry.create_key("acme")
    calls = []
    authenticate = service.registry.authenticate
    monkeypatch.setattr(service.registry, "authenticate", lambda secret: calls.append(secret) or authenticate(secret))
    status, body, _ = call(app, "GET", "/v1/models", key=tenant_key)
    assert status == 200 and body["object"] == "list"
    assert calls == [tenant_key]  # the route reuses the principal the gate authenticated


def test_uploads_have_their_own_limit():
    limit = BodyLimit(None, default=1 << 20, limits=(("/admin/bundles", 5 << 30),))
    assert limit.limit_for("/admin/bundles/upload") == 5 << 30
    assert limit.limit_for("/admin/bundles/demo/heads/bio") == 5 << 30
    assert limit.limit_for("/admin/tenants") == 1 << 20 and limit.limit_for("/v1/completions") == 1 << 20
