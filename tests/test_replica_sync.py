"""Several replicas on one registry: a change made through one replica's admin API reaches the
others' engines (`ViewPublisher.sync`, polled every `registry_poll_s`), and a request on a
replica that has not loaded a view yet starts its load instead of answering 503 forever.

Two `AdminApp`s (real app, real registry, the vLLM engine never started: its adapter table records
what would be loaded) share one data directory and one registry URL, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from .admin_app import AdminApp, store_random_bundle
from .server.bundle_factory import random_head_file
from .tiny_model import build_tiny_model

POLL_S = 0.2
WAIT_S = 10.0  # generous for 2 busy CPU cores; a sync takes one poll interval plus milliseconds


def wait_until(predicate, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout_s} s waiting until {what}")


def served(app: AdminApp, view: str) -> str | None:
    """The label `view@version` this replica serves for `view`, if its engine has that LoRA."""
    version = app.service.adapters.current(view)
    if version is None or version.lora is None or version.lora.lora_int_id not in app.service.engine.lora_ids:
        return None
    return version.label


def engine_loras(app: AdminApp) -> set[str]:
    return {lora.lora_name for lora in app.service.engine._loras.values()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def replicas(registry_url, model_dir, tmp_path):
    a = AdminApp.start(tmp_path, model_dir, database_url=registry_url, registry_poll_s=POLL_S)
    b = AdminApp.start(tmp_path, model_dir, database_url=registry_url, registry_poll_s=POLL_S)
    yield a, b
    b.stop()
    a.stop()


def test_view_changes_on_one_replica_reach_the_other(replicas, tmp_path):
    a, b = replicas
    with a.client() as admin_a, b.client() as admin_b:
        folder = store_random_bundle(a.service, "rnd", ["x", "y"], seed=1)
        admin_a.post("/admin/bundles", json={"name": "rnd", "path": str(folder)}).raise_for_status()

        # a new view, created through A, is published to B's engine within the poll interval
        created = admin_a.put("/admin/views/no-x", json={"bundle": "rnd", "forget": {"x": 1.0}})
        created.raise_for_status()
        label = created.json()["version"]
        assert served(a, "no-x") == label
        wait_until(lambda: served(b, "no-x") == label, f"B serves {label}")
        listed = {v["name"]: v for v in admin_b.get("/admin/views").json()["data"]}
        assert listed["no-x"]["loaded"] is True

        # a head hot-swapped through A: B swaps to the new version, and the old one leaves its engine
        head = random_head_file(a.service.registry.open_bundle("rnd"), tmp_path / "x.safetensors", seed=9)
        with head.open("rb") as f:
            swapped = admin_a.put("/admin/bundles/rnd/heads/x", files={"weights": ("x.safetensors", f)})
        swapped.raise_for_status()
        [new_label] = swapped.json()["views"]
        assert new_label != label and served(a, "no-x") == new_label
        wait_until(lambda: served(b, "no-x") == new_label, f"B serves {new_label}")
        wait_until(lambda: engine_loras(b) == {new_label}, "B's engine drops the old version")

        # a view deleted through A is unpublished on B
        admin_a.delete("/admin/views/no-x").raise_for_status()
        wait_until(lambda: b.service.adapters.current("no-x") is None, "B unpublishes no-x")
        wait_until(lambda: not engine_loras(b), "B's engine drops no-x")
        assert b.service.adapters.current("original") is not None  # the base model stays


def test_a_request_for_a_view_not_loaded_here_loads_it(registry_url, model_dir, tmp_path):
    """Polling off on B: the first request for a view A created starts B's load of it (503 with
    Retry-After while it loads); B recomposes the view's folder itself when its storage lacks it."""
    with AdminApp.start(tmp_path, model_dir, database_url=registry_url, registry_poll_s=POLL_S) as a, \
         AdminApp.start(tmp_path, model_dir, database_url=registry_url, registry_poll_s=0) as b:
        with a.client() as admin_a:
            folder = store_random_bundle(a.service, "rnd", ["x"], seed=2)
            admin_a.post("/admin/bundles", json={"name": "rnd", "path": str(folder)}).raise_for_status()
            label = admin_a.put("/admin/views/no-x", json={"bundle": "rnd", "forget": {"x": 1.0}}).json()["version"]
            admin_a.post("/admin/tenants", json={"name": "acme", "views": ["no-x"]}).raise_for_status()
            key = admin_a.post("/admin/tenants/acme/keys").json()["key"]
        view = a.service.registry.get_view("no-x")
        shutil.rmtree(view.path)  # as if B's storage had never received A's folder

        time.sleep(3 * POLL_S)
        assert b.service.adapters.current("no-x") is None  # B does not poll
        body = {"model": "no-x", "prompt": "hello", "max_tokens": 2}
        answer = httpx.post(b.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert answer.status_code == 503 and "Retry-After" in answer.headers  # the engine is not running here
        wait_until(lambda: served(b, "no-x") == label, f"B loads {label} on demand")
        assert (view.path / "adapter_model.safetensors").is_file()  # recomposed: the same content hash
