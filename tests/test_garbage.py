"""Garbage collection (`registry.garbage`, `alter-serve gc`, POST /admin/gc): superseded bundle
versions, orphaned bundle folders, unreferenced composed views and upload debris go, request-log
rows past the retention go; anything a bundle, view or the engine still uses, and anything younger
than the grace, stays. A dry run lists the same and removes nothing."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import pytest

from alter_serve.cli import main
from alter_serve.core.views import View
from alter_serve.registry import RequestLogEntry
from alter_serve.registry.models import utcnow

from .admin_app import AdminApp, build_service, store_random_bundle
from .tiny_model import build_tiny_model

HOUR = 3600


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model"))


def age(path, seconds: float = 2 * HOUR) -> None:
    """Make `path` look `seconds` old."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def _littered(service):
    """A registry with a superseded bundle version, a recomposed view, a removed view, an orphaned
    bundle folder and upload debris; everything on disk made 2 h old. Returns the hashes in play."""
    reg = service.registry
    reg.store_bundle("rnd", store_random_bundle(service, "rnd-v1", ["x"], seed=1))
    old_bundle = reg.get_bundle("rnd").content_hash
    reg.define_view(View(name="forget-x", forget={"x": 1.0}), "rnd")
    reg.define_view(View(name="gone", forget={"x": 0.5}), "rnd")
    old_view = reg.get_view("forget-x").content_hash
    gone_view = reg.remove_view("gone").content_hash
    reg.store_bundle("rnd", store_random_bundle(service, "rnd-v2", ["x"], seed=2), replace=True)
    data = reg.data_dir
    orphan = data / "bundles" / ("f" * 64)
    orphan.mkdir()
    (orphan / "weights.safetensors").write_bytes(b"half a bundle")
    for debris in (data / "uploads" / "upload-abc", data / "bundles" / ".staging-abc", data / "views" / ".compose-abc",
                   data / "head-legacy"):
        debris.mkdir()
        (debris / "weights.safetensors").write_bytes(b"x" * 100)
    for root in ("bundles", "views", "uploads"):
        for entry in (data / root).iterdir():
            age(entry)
    age(data / "head-legacy")
    return {"old_bundle": old_bundle, "bundle": reg.get_bundle("rnd").content_hash, "old_view": old_view,
            "gone_view": gone_view, "view": reg.get_view("forget-x").content_hash, "orphan": orphan.name}


def test_gc_removes_what_nothing_references_and_never_what_is_referenced(model_dir, tmp_path):
    service = build_service(model_dir, tmp_path / "serve")
    reg, data = service.registry, service.registry.data_dir
    h = _littered(service)
    now = utcnow()
    reg.log_requests([RequestLogEntry(response_id=f"r{i}", tenant="t", model="m", view="original", status_code=200,
                                      latency_ms=1.0, created_at=now - timedelta(days=10 - i)) for i in range(10)])
    # Superseded just now: within the grace the old version stays; past it, it goes.
    kept = reg.collect_garbage(grace_s=HOUR, keep_views={h["old_view"]})
    assert kept.bundle_versions == () and kept.view_folders == (h["gone_view"],)
    assert kept.bundle_folders == (h["orphan"],)
    assert set(kept.debris) == {"uploads/upload-abc", "bundles/.staging-abc", "views/.compose-abc", "head-legacy"}

    service = build_service(model_dir, tmp_path / "again")  # the same litter again, in a fresh data dir
    reg, data = service.registry, service.registry.data_dir
    h = _littered(service)
    reg.log_requests([RequestLogEntry(response_id=f"r{i}", tenant="t", model="m", view="original", status_code=200,
                                      latency_ms=1.0, created_at=now - timedelta(days=10 - i)) for i in range(10)])
    before = sorted(str(p.relative_to(data)) for p in data.rglob("*"))
    dry = reg.collect_garbage(grace_s=0, retention_days=5.5, retention_rows=3, dry_run=True)
    assert dry.dry_run and dry.bundle_versions == (f"rnd@{h['old_bundle']}",)
    assert set(dry.bundle_folders) == {h["old_bundle"], h["orphan"]}
    assert set(dry.view_folders) == {h["old_view"], h["gone_view"]}
    assert dry.request_log_rows == 7  # 5 older than 5.5 days; of the 5 younger, all but the newest 3
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*")) == before  # a dry run removes nothing
    assert len(reg.list_bundle_versions("rnd")) == 2

    done = reg.collect_garbage(grace_s=0, retention_days=5.5, retention_rows=3)
    assert not done.dry_run and (done.bundle_versions, done.bundle_folders, done.view_folders, done.debris,
                                 done.request_log_rows) == (dry.bundle_versions, dry.bundle_folders,
                                                            dry.view_folders, dry.debris, dry.request_log_rows)
    assert {p.name for p in (data / "bundles").iterdir()} == {h["bundle"]}
    assert {p.name for p in (data / "views").iterdir()} == {h["view"]}
    assert list((data / "uploads").iterdir()) == [] and not (data / "head-legacy").exists()
    # What is referenced still works: the current bundle opens, the view's folder is whole.
    assert reg.open_bundle("rnd").content_hash() == h["bundle"]
    assert [v.content_hash for v in reg.list_bundle_versions("rnd")] == [h["bundle"]]
    assert reg.ensure_composed("forget-x").path == data / "views" / h["view"]
    assert (data / "views" / h["view"] / "adapter_model.safetensors").is_file()
    with reg.engine.connect() as conn:
        ids = [r for (r,) in conn.exec_driver_sql("SELECT response_id FROM request_log ORDER BY id")]
    assert ids == ["r7", "r8", "r9"]
    again = reg.collect_garbage(grace_s=0, retention_days=5.5, retention_rows=3)
    assert (again.bundle_versions, again.bundle_folders, again.view_folders, again.debris,
            again.request_log_rows) == ((), (), (), (), 0)


def test_gc_spares_young_folders_and_what_the_engine_serves(model_dir, tmp_path):
    """A folder written for a store that has not committed its row yet is young: never taken. A
    view version the engine still serves (draining) is kept by `keep_views`."""
    service = build_service(model_dir, tmp_path / "serve")
    reg, data = service.registry, service.registry.data_dir
    h = _littered(service)
    young = data / "bundles" / ("e" * 64)
    young.mkdir()  # as store_bundle leaves it between writing the folder and committing its row
    report = reg.collect_garbage(grace_s=HOUR, keep_views={h["gone_view"]})
    assert young.name not in report.bundle_folders and young.is_dir()
    assert h["gone_view"] not in report.view_folders and (data / "views" / h["gone_view"]).is_dir()
    assert h["old_bundle"] not in report.bundle_folders  # superseded less than the grace ago


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with AdminApp.start(tmp_path_factory.mktemp("gc"), request_log_retention_rows=1, gc_grace_s=0) as running:
        yield running


def test_gc_route_and_cli(app, capsys, monkeypatch):
    service = app.service
    debris = service.registry.data_dir / "uploads" / "upload-stale"
    debris.mkdir()
    age(debris)
    with app.client() as admin:
        assert admin.post("/admin/gc", json={"dry_run": True}).json()["debris"] == ["uploads/upload-stale"]
        assert debris.is_dir()
        refused = admin.post("/admin/gc", json={"dry_run": True}, headers={"Authorization": "Bearer as-nope"})
        assert refused.status_code == 401
    service.registry.log_requests([RequestLogEntry(response_id=f"r{i}", tenant="t", model="m", view="original",
                                                   status_code=200, latency_ms=1.0) for i in range(3)])
    monkeypatch.setenv("ALTER_SERVE_URL", app.url)
    monkeypatch.setenv("ALTER_SERVE_ADMIN_KEY", app.admin_key)
    assert main(["gc", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "upload debris" in out and "uploads/upload-stale" in out and "would remove 2 item(s)" in out
    assert debris.is_dir()
    assert main(["gc", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["debris"] == ["uploads/upload-stale"] and report["request_log_rows"] == 2 and not debris.exists()
