"""Fuzz the public API from its own OpenAPI schema (schemathesis): no 5xx, no traceback in any body.

Tenant routes are fuzzed with the tenant key (generation requests really run on the engine); the
admin routes are fuzzed with the tenant key too, which must be refused whatever the input —
fuzzing them as admin would delete the views the other tests use.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.vllm
EXAMPLES_PER_OPERATION = 20


def _operations(live_server):
    admin = {"Authorization": f"Bearer {live_server.keys['admin']}"}  # the schema is for admins only
    raw = httpx.get(f"{live_server.base_url}/openapi.json", headers=admin, timeout=30).json()
    schema = schemathesis.openapi.from_dict(raw)
    schema.config.update(base_url=live_server.base_url)
    return [result.ok() for result in schema.get_all_operations() if result.ok().path != "/dashboard"]


def test_no_server_errors_and_no_tracebacks(live_server):
    restarts_before = httpx.get(f"{live_server.base_url}/ready", timeout=30).json()["restarts"]
    headers = {"Authorization": f"Bearer {live_server.keys['tenant']}"}
    failures: list[str] = []
    operations = _operations(live_server)
    assert any(op.path == "/v1/completions" for op in operations)

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def fuzz(case) -> None:
            response = case.call(headers=headers, timeout=60)
            label = f"{case.method} {case.formatted_path} → {response.status_code}"
            if response.status_code >= 500 or "Traceback" in response.text:
                failures.append(f"{label}: {response.text[:300]}")
            if case.path.startswith("/admin") and response.status_code not in (400, 403, 404):
                failures.append(f"{label}: an admin route answered a tenant key")

        fuzz()
    assert not failures, "\n".join(failures)
    ready = httpx.get(f"{live_server.base_url}/ready", timeout=30).json()
    assert ready["restarts"] == restarts_before, "a fuzzed request killed the engine:\n" + live_server.log_tail(80)
