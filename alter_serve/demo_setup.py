"""Idempotent registration of the demo: bundle "demo", its views, tenant "demo" and its keys.

Views: "original" (built in), "forget-<head>" for each forget head (B_r + ω(1)·B_head), and
"forget-all" (B_r + ω(k)·Σ_d B_d), with ω(n) the bundle's view calibration for n heads (1 without
one; see train.calibration: stacking heads at full weight would cost most of the retain set).

Secrets are shown once by the registry, so the demo keeps them in a 0600 JSON file next to its
database (created 0600, atomically) — a convenience for the demo only.
"""

from __future__ import annotations

import json
from pathlib import Path

from .core.manifest import Calibration
from .core.views import ORIGINAL_VIEW, View, calibrated_view
from .registry import NotFound, Registry
from .registry.keys import write_secret_file

DEMO_BUNDLE = "demo"
DEMO_TENANT = "demo"


def demo_views(forget_heads: list[str], calibration: Calibration | None = None) -> list[View]:
    views = [View(name=f"forget-{head}", retain=1.0, forget={head: 1.0}) for head in forget_heads]
    views.append(View(name="forget-all", retain=1.0, forget={head: 1.0 for head in forget_heads}))
    return views if calibration is None else [calibrated_view(v, calibration) for v in views]


def register_demo(registry: Registry, bundle_dir: Path, keys_file: Path) -> dict:
    """Register (or refresh) the demo objects; return {"tenant_key", "admin_key", "views"}."""
    update = registry.store_bundle(DEMO_BUNDLE, bundle_dir, replace=True)
    views = demo_views(update.bundle.forget_heads, update.bundle.calibration)
    existing = {v.name for v in registry.list_views()}
    for view in views:
        registry.define_view(view, DEMO_BUNDLE, replace=view.name in existing)
    names = [ORIGINAL_VIEW] + [v.name for v in views]
    try:
        tenant = registry.get_tenant(DEMO_TENANT)
        for name in set(names) - set(tenant.views):
            registry.grant_view(DEMO_TENANT, name)
    except NotFound:
        registry.create_tenant(DEMO_TENANT, views=names, default_view=ORIGINAL_VIEW)
    keys = _load_keys(registry, keys_file)
    if keys is None:
        _, tenant_key = registry.create_key(DEMO_TENANT, "tenant")
        _, admin_key = registry.create_key(None, "admin")
        keys = {"tenant_key": tenant_key, "admin_key": admin_key}
        write_secret_file(keys_file, json.dumps(keys, indent=2))
    return {**keys, "views": names}


def _load_keys(registry: Registry, keys_file: Path) -> dict | None:
    """The saved demo keys, if both still authenticate."""
    if not keys_file.is_file():
        return None
    keys = json.loads(keys_file.read_text())
    tenant = registry.authenticate(keys.get("tenant_key", ""))
    admin = registry.authenticate(keys.get("admin_key", ""))
    if tenant is None or admin is None or not admin.is_admin:
        return None
    return keys
