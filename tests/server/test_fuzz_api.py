"""Fuzz the public API from its own OpenAPI schema (schemathesis): no 5xx, no traceback in any body.

Tenant routes are fuzzed with the tenant key (generation requests really run on the engine); the
admin routes are fuzzed with the tenant key too, which must be refused (403) whatever the input —
fuzzing them as admin would delete the views the other tests use.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def api_schema(live_server):
    schema = httpx.get(f"{live_server.base_url}/openapi.json", timeout=30).json()
    loaded = schemathesis.openapi.from_dict(schema)
    loaded.config.update(base_url=live_server.base_url)
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.exclude(path="/dashboard", method="GET").parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_no_tracebacks(case, live_server):
    key = live_server.keys["tenant"]
    response = case.call(headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}"
    assert "Traceback" not in response.text
    if case.path.startswith("/admin"):
        assert response.status_code in (403, 404, 405, 422, 400), response.text[:300]
