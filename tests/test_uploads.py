"""Bundle and head uploads stream to disk (issue 18 §5): the multipart body is read once, as it
arrives, into a folder under `<data_dir>/uploads/`, never parsed into Starlette's spooled form (a
copy in RAM or the system temp folder, then a second copy); a part over its cap stops at 413
without reading the rest; the folder is gone after every call, good or refused."""

from __future__ import annotations

import io

import httpx
import pytest
from starlette.requests import Request

from alter_serve.core.names import MANIFEST_FILE, WEIGHTS_FILE

from .admin_app import AdminApp, store_random_bundle


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with AdminApp.start(tmp_path_factory.mktemp("uploads")) as running:
        yield running


def _files(folder):
    return {"manifest": ("manifest.json", (folder / MANIFEST_FILE).read_bytes(), "application/json"),
            "weights": ("weights.safetensors", (folder / WEIGHTS_FILE).read_bytes(), "application/octet-stream")}


def test_an_upload_streams_to_the_data_dir_without_form_parsing(app, monkeypatch):
    async def no_form(*args, **kwargs):
        raise AssertionError("the upload was parsed as a form (spooled, then copied)")

    monkeypatch.setattr(Request, "form", no_form)
    seen = []
    from alter_serve.api import uploads

    receive = uploads.receive_form

    async def spy(request, folder, files, texts=()):
        seen.append(folder)
        return await receive(request, folder, files, texts)

    monkeypatch.setattr("alter_serve.api.admin_routes.receive_form", spy)
    folder = store_random_bundle(app.service, "streamed", ["x"], seed=5)
    with app.client() as admin:
        stored = admin.post("/admin/bundles/upload", data={"name": "streamed"}, files=_files(folder))
        assert stored.status_code == 200, stored.text
        assert stored.json()["bundle"]["manifest"]["heads"]["forget"] == ["x"]
        uploads_root = app.service.registry.data_dir / "uploads"
        assert seen[0].parent == uploads_root and list(uploads_root.iterdir()) == []  # cleaned up
        head = io.BytesIO((folder / WEIGHTS_FILE).read_bytes())
        wrong = admin.put("/admin/bundles/streamed/heads/x", files={"weights": ("h.safetensors", head)})
        assert wrong.status_code == 400  # validated as before: not one [out, rank] tensor per module
        assert list(uploads_root.iterdir()) == []


def test_refused_uploads_are_clear_and_leave_nothing(app, monkeypatch):
    folder = store_random_bundle(app.service, "capped", ["x"], seed=6)
    uploads_root = app.service.registry.data_dir / "uploads"
    monkeypatch.setattr(app.service.config, "max_upload_bytes", 1024)
    with app.client() as admin:
        big = admin.post("/admin/bundles/upload", data={"name": "capped"}, files=_files(folder))
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        assert "1024-byte limit" in big.json()["error"]["message"]
        monkeypatch.undo()
        missing = admin.post("/admin/bundles/upload", data={"name": "capped"},
                             files={"manifest": _files(folder)["manifest"]})
        assert missing.status_code == 400 and "weights" in missing.json()["error"]["message"]
        extra = admin.post("/admin/bundles/upload", data={"name": "capped", "color": "red"}, files=_files(folder))
        assert extra.status_code == 400 and "Unexpected form field 'color'" in extra.json()["error"]["message"]
        not_form = admin.post("/admin/bundles/upload", json={"name": "capped"})
        assert not_form.status_code == 400 and "multipart/form-data" in not_form.json()["error"]["message"]
        no_name = admin.post("/admin/bundles/upload", files=_files(folder))
        assert no_name.status_code == 400 and no_name.json()["error"]["param"] == "name"
    assert list(uploads_root.iterdir()) == []
    assert "capped" not in [b.name for b in app.service.registry.list_bundles()]
    assert httpx.get(app.url + "/health").status_code == 200
