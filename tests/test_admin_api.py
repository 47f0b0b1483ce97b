"""The admin API's changes over HTTP (uvicorn in a thread, no engine): a tenant PATCH is one
transaction, experiments only serve granted views, numbers out of range answer 400/404 instead of
500, and feedback is for responses the tenant was served (404 otherwise) at a bounded rate."""

from __future__ import annotations

import httpx
import pytest

from alter_serve.serving.limits import FeedbackLimiter
from alter_serve.registry import RequestLogEntry

from .admin_app import AdminApp, store_random_bundle


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """Views original and forget-x (of a random bundle); tenant acme granted original (default)."""
    with AdminApp.start(tmp_path_factory.mktemp("admin-api")) as running:
        folder = store_random_bundle(running.service, "rnd", ["x"], seed=4)
        with running.client() as admin:
            for method, path, body in [
                ("POST", "/admin/bundles", {"name": "rnd", "path": str(folder)}),
                ("PUT", "/admin/views/forget-x", {"bundle": "rnd", "forget": {"x": 1.0}}),
                ("POST", "/admin/tenants", {"name": "acme", "views": ["original"], "default_view": "original"}),
            ]:
                assert admin.request(method, path, json=body).status_code == 200
        yield running


def error(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["message"]


def test_a_tenant_patch_is_applied_all_or_nothing_in_order(app):
    with app.client() as admin:
        before = admin.get("/admin/tenants").json()["data"]
        status, message = error(admin.patch("/admin/tenants/acme", json={"grant": ["forget-x"], "revoke": ["ghost"],
                                                                         "disabled": True}))
        assert status == 404 and "'ghost'" in message
        assert admin.get("/admin/tenants").json()["data"] == before  # the grant was not applied alone

        # grant, then default, then revoke: one PATCH moves the tenant from original to forget-x
        moved = admin.patch("/admin/tenants/acme", json={"grant": ["forget-x"], "default_view": "forget-x",
                                                         "revoke": ["original"], "limits": {"max_concurrent": 3}})
        assert moved.status_code == 200, moved.text
        body = moved.json()
        assert (body["views"], body["default_view"], body["limits"]["max_concurrent"]) == (["forget-x"], "forget-x", 3)

        kept = admin.patch("/admin/tenants/acme", json={"grant": ["original"]}).json()
        assert kept["default_view"] == "forget-x"  # absent: unchanged
        cleared = admin.patch("/admin/tenants/acme", json={"default_view": None}).json()
        assert cleared["default_view"] is None and cleared["views"] == ["forget-x", "original"]
        status, message = error(admin.patch("/admin/tenants/acme", json={"limits": {"max_concurrent": 2**31}}))
        assert status == 400 and "2147483647" in message
        admin.patch("/admin/tenants/acme", json={"default_view": "original", "revoke": ["forget-x"], "limits": {}})


def test_experiments_serve_only_granted_views_and_bounded_numbers(app):
    arms = [{"name": "control", "view": "original", "weight": 1}, {"name": "forget", "view": "forget-x", "weight": 1}]
    experiment = {"name": "ab", "alias": "chat", "tenants": ["acme", "acme"], "arms": arms}
    with app.client() as admin:
        status, message = error(admin.post("/admin/experiments", json=experiment))
        assert status == 400 and "tenant 'acme' is not granted view 'forget-x'" in message
        huge = [{**arm, "weight": 1e308} for arm in arms]
        status, message = error(admin.post("/admin/experiments", json={**experiment, "arms": huge}))
        assert status == 400 and "less than or equal to 1000000" in message

        assert admin.patch("/admin/tenants/acme", json={"grant": ["forget-x"]}).status_code == 200
        created = admin.post("/admin/experiments", json=experiment)
        assert created.status_code == 200 and created.json()["tenants"] == ["acme"]
        assert admin.patch("/admin/experiments/ab", json={"tenants": ["acme", "acme"]}).json()["tenants"] == ["acme"]
        status, message = error(admin.patch("/admin/tenants/acme", json={"revoke": ["forget-x"]}))
        assert status == 409 and "arm of experiment(s) ['ab']" in message

        probe = {"results": [{"arm": "control", "view": "original", "samples": 2**31, "metrics": {"x": 1.0}}]}
        status, message = error(admin.post("/admin/experiments/ab/probes", json=probe))
        assert status == 400 and "2147483647" in message
        status, message = error(admin.delete(f"/admin/keys/{10**20}"))
        assert status == 404 and f"API key {10**20} not found" in message
        assert admin.patch("/admin/experiments/ab", json={"status": "stopped"}).status_code == 200


def test_a_feedback_reply_says_whether_its_response_is_known(app):
    registry = app.service.registry
    _, tenant_key = registry.create_key("acme")

    def rate(response_id: str) -> dict:
        reply = httpx.post(app.url + "/v1/feedback", json={"response_id": response_id, "rating": 4},
                           headers={"Authorization": f"Bearer {tenant_key}"})
        assert reply.status_code == 200, reply.text
        return reply.json()

    unknown = httpx.post(app.url + "/v1/feedback", json={"response_id": "cmpl-unknown", "rating": 4},
                         headers={"Authorization": f"Bearer {tenant_key}"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "response_id"
    registry.log_requests([RequestLogEntry("cmpl-known", "acme", "original", "original", 200, 1.0)])
    known = rate("cmpl-known")
    assert (known["attributed"], known["view"], known["arm"]) == (True, "original", None)
    # Another tenant's response is the same 404 as one never served: it reveals nothing.
    registry.create_tenant("globex", views=["original"])
    registry.log_requests([RequestLogEntry("cmpl-globex", "globex", "original", "original", 200, 1.0)])
    theirs = httpx.post(app.url + "/v1/feedback", json={"response_id": "cmpl-globex", "rating": 1},
                        headers={"Authorization": f"Bearer {tenant_key}"})
    assert theirs.status_code == 404 and theirs.json()["error"]["message"] == unknown.json()["error"]["message"].replace(
        "cmpl-unknown", "cmpl-globex")


def test_feedback_is_rate_limited(app, monkeypatch):
    _, tenant_key = app.service.registry.create_key("acme")
    app.service.registry.log_requests([RequestLogEntry("cmpl-rated", "acme", "original", "original", 200, 1.0)])
    monkeypatch.setattr(app.service, "feedback_limiter", FeedbackLimiter(per_minute=2))  # config feedback_per_minute
    replies = [httpx.post(app.url + "/v1/feedback", json={"response_id": "cmpl-rated", "rating": 1},
                          headers={"Authorization": f"Bearer {tenant_key}"}) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 429]
    assert replies[-1].json()["error"]["code"] == "rate_limit_exceeded" and replies[-1].headers["retry-after"] == "30"
