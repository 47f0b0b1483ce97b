"""A view whose engine load fails after the registry committed it is marked failed (issue 18 §5):
the admin call says so, GET /admin/views and /v1/models show it, its requests answer 503
"failed to load" instead of "being loaded, retry" forever, and a later successful load clears it."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from alter_serve.serving.errors import Unavailable
from alter_serve.serving.routing import Routed

from .admin_app import AdminApp, store_random_bundle


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with AdminApp.start(tmp_path_factory.mktemp("loadfail"), registry_poll_s=0) as running:
        yield running


def test_a_failed_load_is_marked_failed_and_cleared_by_a_good_load(app, monkeypatch):
    service = app.service
    service.registry.store_bundle("rnd", store_random_bundle(service, "rnd", ["x"], seed=3))

    async def broken(lora):
        raise RuntimeError("LoRA rank does not fit the engine")

    add_lora = service.engine.add_lora
    monkeypatch.setattr(service.engine, "add_lora", broken)
    with app.client() as admin:
        defined = admin.put("/admin/views/fx", json={"bundle": "rnd", "forget": {"x": 1.0}})
        assert defined.status_code == 500, defined.text
        error = defined.json()["error"]
        assert error["code"] == "view_load_failed" and "LoRA rank does not fit the engine" in error["message"]
        assert "marked failed" in error["message"]
        view = next(v for v in admin.get("/admin/views").json()["data"] if v["name"] == "fx")
        assert view["loaded"] is False and "RuntimeError: LoRA rank does not fit" in view["load_error"]
        assert view["load_failed_at"] is not None
        admin.post("/admin/tenants", json={"name": "acme", "views": ["original", "fx"]}).raise_for_status()
        key = admin.post("/admin/tenants/acme/keys").json()["key"]
    card = httpx.get(app.url + "/v1/models/fx", headers={"Authorization": f"Bearer {key}"}).json()
    assert card["lineage"]["load_failed"] is True and card["lineage"]["loaded"] is False

    # A request for it: a 503 that says the view is broken, and no load started per request.
    monkeypatch.setattr(service.router, "engine", SimpleNamespace(ready=True))  # the engine is up
    principal = service.registry.authenticate(key)
    with pytest.raises(Unavailable) as refused:
        service.router.lease("fx", Routed("fx"), principal)
    assert "failed to load" in refused.value.message
    assert "fx" not in service.publisher._loading

    # Fixed (the engine takes it again) and defined again: it loads, and the mark is gone.
    monkeypatch.setattr(service.engine, "add_lora", add_lora)
    with app.client() as admin:
        assert admin.put("/admin/views/fx", json={"bundle": "rnd", "forget": {"x": 1.0}}).status_code == 200
    assert "fx" not in service.publisher.load_failures
    lease = service.router.lease("fx", Routed("fx"), principal)
    assert lease.view_label.startswith("fx@")
    lease.lease.release()
    with app.client() as admin:
        view = next(v for v in admin.get("/admin/views").json()["data"] if v["name"] == "fx")
    assert view["loaded"] is True and view["load_error"] is None
