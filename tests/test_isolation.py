"""Issue 18 §3, isolation beyond model names: one test per leak, each showing it closed.

The app runs without an engine (uvicorn in a thread, `AdminApp`); the prefix-cache partition is
checked on a live vLLM server in server/test_cache_salt.py, and auth-before-body in
test_request_gate.py."""

from __future__ import annotations

import json
import logging
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from alter_serve import cli
from alter_serve.config import ServeConfig
from alter_serve.demo_setup import register_demo
from alter_serve.registry.keys import write_secret_file
from alter_serve.serving.routing import cache_salt
from alter_serve.serving.service import AlterService

from .admin_app import AdminApp, build_service
from .server.bundle_factory import random_bundle
from .server.live import free_port
from .tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("isolation") / "model")


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def app(model_dir, metrics_port, tmp_path_factory):
    with AdminApp.start(tmp_path_factory.mktemp("app"), model_dir, metrics_port=metrics_port) as running:
        running.service.registry.create_tenant("acme", views=["original"])
        yield running


@pytest.fixture(scope="module")
def tenant_key(app) -> str:
    return app.service.registry.create_key("acme")[1]


def _get(app, path: str, key: str | None) -> httpx.Response:
    return httpx.get(app.url + path, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)


# ---- /metrics names every tenant, view, experiment and arm ------------------------------------------


def test_metrics_are_not_readable_by_tenants(app, tenant_key):
    assert _get(app, "/metrics", None).status_code == 401
    refused = _get(app, "/metrics", tenant_key)
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    assert "alter_engine_ready" in _get(app, "/metrics", app.admin_key).text


def test_prometheus_scrapes_the_separate_metrics_port_without_a_key(app, metrics_port):
    scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30)
    assert scraped.status_code == 200 and "alter_engine_ready" in scraped.text


# ---- /docs and /openapi.json list the admin API ------------------------------------------------------


def test_the_api_schema_is_for_admins_and_the_doc_pages_are_off(app, tenant_key):
    assert _get(app, "/openapi.json", None).status_code == 401
    assert _get(app, "/openapi.json", tenant_key).status_code == 403
    assert "/admin/tenants" in _get(app, "/openapi.json", app.admin_key).json()["paths"]
    for page in ("/docs", "/redoc"):
        assert _get(app, page, app.admin_key).status_code == 404


def test_openapi_docs_publishes_them_when_a_developer_asks(model_dir, tmp_path):
    with AdminApp.start(tmp_path, model_dir, openapi_docs=True) as running:
        assert _get(running, "/openapi.json", None).status_code == 200
        assert _get(running, "/docs", None).status_code == 200


# ---- shared prefix cache (a timing side channel) ------------------------------------------------------


def test_tenants_get_their_own_cache_salt(app):
    registry = app.service.registry
    registry.create_tenant("globex", views=["original"])
    acme, globex = (registry.authenticate(registry.create_key(name)[1]) for name in ("acme", "globex"))
    assert cache_salt(acme) != cache_salt(globex)
    assert cache_salt(acme) == cache_salt(registry.authenticate(registry.create_key("acme")[1]))  # per tenant, not key
    for salt in (cache_salt(acme), cache_salt(globex)):  # vLLM's rule: <= 128 characters, no '@', '/', '\\', NUL
        assert 0 < len(salt) <= 128 and not set(salt) & {"@", "/", "\\", "\0"}


# ---- keys in logs and files ----------------------------------------------------------------------------


def test_a_created_admin_key_goes_to_a_0600_file_not_to_the_log(model_dir, tmp_path, monkeypatch, capsys, caplog):
    served = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: served.append(kwargs))
    config = ServeConfig(data_dir=tmp_path / "serve")
    config.engine.model = str(model_dir)
    with caplog.at_level(logging.DEBUG):
        cli.run_server(config)
    key_file = tmp_path / "serve" / cli.BOOTSTRAP_KEY_FILE
    secret = key_file.read_text().strip()
    assert served and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err + caplog.text and str(key_file) in printed.out
    service = AlterService(config, model_dir)
    assert service.registry.authenticate(secret).is_admin


def test_secret_files_are_0600_from_the_start_and_replaced_atomically(tmp_path):
    path = tmp_path / "keys.json"
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        write_secret_file(path, "first")
        write_secret_file(path, "second")
    finally:
        os.umask(old_umask)
    assert path.read_text() == "second" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no staging file left


def test_demo_keys_json_is_0600(model_dir, tmp_path):
    service = build_service(model_dir, tmp_path / "serve")
    random_bundle(model_dir, ["x"], seed=3).save(tmp_path / "demo-bundle")
    keys_file = tmp_path / "serve" / "demo-keys.json"
    keys = register_demo(service.registry, tmp_path / "demo-bundle", keys_file)
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert json.loads(keys_file.read_text())["tenant_key"] == keys["tenant_key"]


# ---- admin keys: create, list, revoke; tenant keys expire ----------------------------------------------


def test_admin_keys_are_created_listed_and_revoked_over_the_api(app):
    with app.client() as admin:
        created = admin.post("/admin/keys", json={"role": "admin"}).json()
        assert created["role"] == "admin" and created["tenant"] is None
        listed = {k["id"]: k for k in admin.get("/admin/keys").json()["data"]}
        assert listed[created["id"]]["role"] == "admin" and created["key"] not in json.dumps(listed)
        assert _get(app, "/admin/tenants", created["key"]).status_code == 200
        assert admin.delete(f"/admin/keys/{created['id']}").json()["revoked_at"] is not None
        assert _get(app, "/admin/tenants", created["key"]).status_code == 401
        # A tenant key needs a tenant, an admin key has none: clear 400s, not 500s.
        assert admin.post("/admin/keys", json={"role": "tenant"}).status_code == 400
        assert admin.post("/admin/keys", json={"role": "admin", "tenant": "acme"}).status_code == 400


def test_the_last_active_admin_key_cannot_be_revoked(model_dir, tmp_path):
    with AdminApp.start(tmp_path, model_dir) as running, running.client() as admin:
        only = running.service.registry.find_key(running.admin_key).id
        refused = admin.delete(f"/admin/keys/{only}")
        assert refused.status_code == 409 and "last active admin key" in refused.json()["error"]["message"]


def test_tenant_keys_expire(app):
    registry = app.service.registry
    with app.client() as admin:
        soon = (datetime.now(timezone.utc) + timedelta(days=30)).isoformat()
        created = admin.post("/admin/tenants/acme/keys", json={"expires_at": soon}).json()
        assert _get(app, "/v1/models", created["key"]).status_code == 200
        listed = next(k for k in admin.get("/admin/keys").json()["data"] if k["id"] == created["id"])
        assert datetime.fromisoformat(listed["expires_at"]) == datetime.fromisoformat(soon)
        past = admin.post("/admin/tenants/acme/keys", json={"expires_at": "2020-01-01T00:00:00Z"})
        assert past.status_code == 400 and "not in the future" in past.json()["error"]["message"]
        naive = admin.post("/admin/tenants/acme/keys", json={"expires_at": "2099-01-01T00:00:00"})
        assert naive.status_code == 400
    key_id, secret = registry.create_key("acme", expires_at=datetime.now(timezone.utc) + timedelta(seconds=1))
    assert registry.authenticate(secret) is not None
    with registry.engine.begin() as conn:  # an hour later
        conn.exec_driver_sql("UPDATE api_keys SET expires_at = '2020-01-01 00:00:00' WHERE id = ?", (key_id,))
    assert _get(app, "/v1/models", secret).status_code == 401
    assert not next(k for k in registry.list_keys() if k.id == key_id).active
