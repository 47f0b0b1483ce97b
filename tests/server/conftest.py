"""Session-scoped live alter-serve process on the demo model, with the demo views and two tenants.

Tenants:
- "demo": original, forget-<head> for each demo forget head, forget-all, and "swap" (hot-swap target);
- "other": original and its private view "rnd-x".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from alter_serve.core.fingerprint import fingerprint, module_shapes
from alter_serve.core.views import View
from alter_serve.demo_setup import register_demo
from alter_serve.registry import Registry

from .bundle_factory import random_bundle
from .live import LiveServer


def make_registry(model_dir: Path, data: Path) -> Registry:
    registry = Registry(f"sqlite:///{data / 'registry.db'}", data,
                        base_fingerprint=fingerprint(model_dir), base_shapes=module_shapes(model_dir))
    registry.create_all()
    return registry


@contextmanager
def serving_bundle(model_dir: Path, bundle_dir: Path, data: Path, views: dict[str, dict[str, float]],
                   extra_args: Sequence[str] = ("--max-model-len", "512")) -> Iterator[LiveServer]:
    """A live server on `model_dir` with one bundle, its `views` (name → forget-head weights) and
    a tenant "acme" granted "original" and those views (key "tenant"); stopped on exit."""
    registry = make_registry(model_dir, data)
    registry.store_bundle("bundle", bundle_dir)
    for name, forget in views.items():
        registry.define_view(View(name=name, forget=forget), "bundle")
    registry.create_tenant("acme", views=["original", *views])
    _, key = registry.create_key("acme")
    registry.close()
    server = LiveServer(model_dir, data, {"tenant": key}, extra_args=list(extra_args)).start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def live_server(demo_model_dir, demo_bundle_dir, tmp_path_factory) -> LiveServer:
    model_dir = Path(demo_model_dir)
    data = tmp_path_factory.mktemp("serve")
    registry = make_registry(model_dir, data)
    demo = register_demo(registry, Path(demo_bundle_dir), data / "demo-keys.json")
    random_bundle(model_dir, ["x", "y"], seed=1).save(data / "rnd-src")
    registry.store_bundle("rnd", data / "rnd-src")
    registry.define_view(View(name="rnd-x", forget={"x": 1.0}), "rnd")
    registry.define_view(View(name="swap", forget={"y": 1.0}), "rnd")
    registry.grant_view("demo", "swap")
    registry.create_tenant("other", views=["original", "rnd-x"], default_view="original")
    _, other_key = registry.create_key("other")
    keys = {"tenant": demo["tenant_key"], "admin": demo["admin_key"], "other": other_key}
    registry.close()
    server = LiveServer(model_dir, data, keys).start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
