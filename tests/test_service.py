"""`AlterService` on a real registry, without an engine: how a request for an experiment alias is
routed (only granted views; paused traffic outside the arms; sticky by user, else by API key), the
request-log buffer when the registry cannot be written, and importing the configured admin key."""

from __future__ import annotations

import asyncio
import logging

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from alter_serve import metrics
from alter_serve.core.views import View
from alter_serve.registry import RequestLogEntry
from alter_serve.registry.experiments import sticky_value
from alter_serve.registry.models import RequestLogRow, grants
from alter_serve.serving.errors import ModelNotFound

from .admin_app import build_service, store_random_bundle
from .tiny_model import build_tiny_model

ARMS = [{"name": "control", "view": "original", "weight": 1}, {"name": "forget", "view": "forget-x", "weight": 1}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def service(model_dir, tmp_path):
    """Tenant acme granted original and forget-x; experiment 'ab' on alias 'chat' between the two."""
    service = build_service(model_dir, tmp_path / "serve")
    registry = service.registry
    registry.store_bundle("rnd", store_random_bundle(service, "rnd", ["x"], seed=1))
    registry.define_view(View(name="forget-x", forget={"x": 1.0}), "rnd")
    registry.create_tenant("acme", views=["original", "forget-x"])
    registry.create_experiment("ab", alias="chat", tenants=["acme"], arms=ARMS)
    yield service
    registry.close()


def lookup(user: str | None = None):
    """The sticky lookup the OpenAI routes pass for a request with this `user` and no headers."""
    return lambda kind, key_id: sticky_value(kind, user=user, headers={}, key_id=key_id)


def route(service, secret: str, user: str | None = None):
    return service.router.route(service.registry.request_context(secret, "chat"), lookup(user))


def test_an_alias_serves_only_views_the_tenant_is_granted(service):
    _, secret = service.registry.create_key("acme")
    served = {route(service, secret, f"user-{i}").view for i in range(40)}
    assert served == {"original", "forget-x"}
    # An arm whose grant is gone behind the registry's checks (a database from before they existed,
    # or a direct edit): the alias answers as the view itself would, 404 model_not_found.
    with service.registry.engine.begin() as conn:
        conn.execute(grants.delete())
    with pytest.raises(ModelNotFound) as caught:
        route(service, secret, "user-0")
    assert caught.value.code == "model_not_found"


def test_paused_traffic_goes_to_control_outside_the_arms(service):
    _, secret = service.registry.create_key("acme")
    service.registry.update_experiment("ab", status="paused")
    routed = {(r.view, r.experiment, r.arm, r.paused, r.sample_arm)
              for r in (route(service, secret, f"user-{i}") for i in range(40))}
    # Served by the control arm (and so labelled), counted in no arm's statistics.
    assert routed == {("original", "ab", "control", True, None)}


def test_without_a_user_a_client_keeps_the_arm_of_its_api_key(service):
    keys = [service.registry.create_key("acme")[1] for _ in range(12)]
    for secret in keys[:3]:
        assert len({route(service, secret).arm for _ in range(20)}) == 1
    assert {route(service, secret).arm for secret in keys} == {"control", "forget"}


def _entries(*ids: str) -> list[RequestLogEntry]:
    return [RequestLogEntry(i, "acme", "chat", "original", 200, 1.0, None, "ab", "control") for i in ids]


def _logged(service) -> list[str]:
    with service.registry.engine.connect() as conn:
        return list(conn.execute(select(RequestLogRow.response_id).order_by(RequestLogRow.id)).scalars())


def _registry_down(batch):
    raise RuntimeError("registry unreachable")


def test_a_request_log_batch_the_registry_refuses_is_written_by_the_next_flush(service, monkeypatch):
    for row in _entries("r0", "r1"):
        service.request_log.append(row)
    with monkeypatch.context() as patch:
        patch.setattr(service.registry, "log_requests", _registry_down)
        with pytest.raises(RuntimeError, match="unreachable"):
            asyncio.run(service.request_log.flush())
    service.request_log.append(_entries("r2")[0])
    asyncio.run(service.request_log.flush())
    assert _logged(service) == ["r0", "r1", "r2"]


def test_the_request_log_kept_for_retry_is_bounded(service, monkeypatch, caplog):
    monkeypatch.setattr(service.request_log, "MAX_PENDING_ROWS", 4)
    dropped_before = metrics.REQUEST_LOG_DROPPED._value.get()
    with monkeypatch.context() as patch:
        patch.setattr(service.registry, "log_requests", _registry_down)
        for batch in (("r0", "r1", "r2"), ("r3", "r4", "r5")):
            for row in _entries(*batch):
                service.request_log.append(row)
            with pytest.raises(RuntimeError), caplog.at_level(logging.ERROR, "alter_serve.serving.request_log"):
                asyncio.run(service.request_log.flush())
    assert service.request_log.dropped_rows == 2 and "dropped the 2 oldest" in caplog.text
    assert metrics.REQUEST_LOG_DROPPED._value.get() - dropped_before == 2  # exported to Prometheus too
    asyncio.run(service.request_log.flush())
    assert _logged(service) == ["r2", "r3", "r4", "r5"]


def test_a_row_is_timed_when_logged_not_when_its_batch_is_written(service):
    """A response of experiment 'ab' whose batch is written after 'ab' was deleted and created
    again belongs to the old experiment, not to the new one of the same name."""
    service.request_log.append(_entries("old")[0])
    service.registry.delete_experiment("ab")
    service.registry.create_experiment("ab", alias="chat", tenants=["acme"], arms=ARMS)
    asyncio.run(service.request_log.flush())
    assert _logged(service) == ["old"]
    assert [a.requests for a in service.registry.experiment_results("ab")] == [0, 0]


def test_the_configured_admin_key_is_imported_and_checked_with_a_clear_message(service):
    registry = service.registry
    secret = "9f8e7d6c5b4a39281706f5e4d3c2b1a0" * 2  # what `openssl rand -hex 32` prints: no `as-` prefix
    service.config = service.config.model_copy(update={"admin_key": SecretStr(secret)})
    assert service.ensure_admin_key() is None
    assert registry.authenticate(secret).is_admin
    assert service.ensure_admin_key() is None  # already imported
    registry.create_key(None, "admin")  # the last active admin key cannot be revoked
    registry.revoke_key(registry.find_key(secret).id)
    with pytest.raises(ValueError, match=r"configured admin key \(ALTER_SERVE_ADMIN_KEY, key id \d+, prefix 9f8e7d6c\) "
                                         r"was revoked at .*; set ALTER_SERVE_ADMIN_KEY to a new secret"):
        service.ensure_admin_key()

    _, tenant_secret = registry.create_key("acme")
    registry.set_disabled("acme", True)  # it does not authenticate, but it is still acme's key
    service.config = service.config.model_copy(update={"admin_key": SecretStr(tenant_secret)})
    with pytest.raises(ValueError, match="is an API key of tenant 'acme', not an admin key; set ALTER_SERVE_ADMIN_KEY"):
        service.ensure_admin_key()
