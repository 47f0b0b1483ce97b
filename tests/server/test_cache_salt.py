"""Tenants that share a view do not share vLLM's prefix cache (issue 18 §3: a cache hit answers
faster, so without a per-tenant `cache_salt` one tenant could time whether another sent a prompt).

Two tenants send the same long prompt to the same view, "original". vLLM's own counter of prefix
cache hits (vllm:prefix_cache_hits_total, read by the admin) shows a tenant's repeat hitting its
own cache, and the other tenant's first send hitting nothing."""

from __future__ import annotations

import time

import httpx
import pytest

from ..tiny_model import build_tiny_model
from .conftest import make_registry
from .live import LiveServer

pytestmark = pytest.mark.vllm
PROMPT = list(range(10, 330))  # 320 token ids: several full KV blocks whatever the backend's block size


@pytest.fixture(scope="module")
def two_tenants(tmp_path_factory) -> LiveServer:
    tmp = tmp_path_factory.mktemp("salt")
    model = build_tiny_model(tmp / "model")
    registry = make_registry(model, tmp)
    keys = {"admin": registry.create_key(None, "admin")[1]}
    for tenant in ("acme", "globex"):
        registry.create_tenant(tenant, views=["original"])
        keys[tenant] = registry.create_key(tenant)[1]
    registry.close()
    server = LiveServer(model, tmp, keys, extra_args=["--max-model-len", "512"]).start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _cache_hits(server: LiveServer) -> float:
    with server.http("admin") as http:
        text = http.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


def _send(server: LiveServer, tenant: str) -> float:
    """Send PROMPT as `tenant`; the prefix-cache hits it caused (vLLM records them after the step)."""
    before = _cache_hits(server)
    with server.http(tenant) as http:
        answer = http.post("/v1/completions", json={"model": "original", "prompt": PROMPT, "max_tokens": 1})
    assert answer.status_code == 200, answer.text
    time.sleep(1.0)
    return _cache_hits(server) - before


def test_a_tenant_hits_its_own_prefix_cache_never_another_tenants(two_tenants):
    assert _send(two_tenants, "acme") == 0
    assert _send(two_tenants, "acme") > 0  # prefix caching is on: a repeat hits
    assert _send(two_tenants, "globex") == 0  # same view, same prompt, other tenant: no hit
    assert _send(two_tenants, "globex") > 0
