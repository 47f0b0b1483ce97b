"""Administration: bundles, head hot-swap, views, tenants, keys, experiments, probes, gc.

Every change is made in the registry first (atomically, in a worker thread), then each view whose
weights changed is published to this server's engine before the call returns, so requests accepted
afterwards use it ("change, then publish"). Other replicas pick the change up at their next
registry poll (`publishing`).

Bundles are registered from a folder under the configured `bundle_dirs`, or from an upload
streamed into a fresh folder under `<data_dir>/uploads/` (`upload_folder`). The registry's
refusals come back as the service's own errors (`errors.registry_call`).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from ..config import ServeConfig
from ..core.views import View, calibrated_view
from ..engine.adapters import AdapterManager
from ..registry import (UNCHANGED, BundleInfo, BundleUpdate, ExperimentInfo, KeyInfo, Limits, ProbeResult, Registry,
                        TenantInfo, ViewInfo)
from ..registry.files import UPLOADS_DIR
from ..registry.garbage import GarbageReport
from ..registry.stats import ExperimentReport
from .errors import InvalidRequest, registry_call
from .publishing import LoadState, ViewPublisher


class Administration:
    """The admin operations of one server (see the module docstring)."""

    def __init__(self, config: ServeConfig, registry: Registry, adapters: AdapterManager, publisher: ViewPublisher):
        self.config, self.registry, self.adapters, self.publisher = config, registry, adapters, publisher

    # ---- bundles ------------------------------------------------------------------------------
    async def register_bundle(self, name: str, path: str, *, replace: bool = False) -> tuple[BundleUpdate, list[str]]:
        """Register the bundle in folder `path` (under a configured bundle_dir) as `name`; publish
        the views it changes. Returns the update and the published versions' labels."""
        return await self.store_bundle(name, self._allowed_path(path), replace=replace)

    def _allowed_path(self, raw: str) -> Path:
        path = Path(raw).expanduser().resolve()
        roots = [Path(r).expanduser().resolve() for r in self.config.bundle_dirs]
        if not any(path == root or root in path.parents for root in roots):
            raise InvalidRequest(f"Bundles may only be registered from the configured bundle_dirs "
                                 f"{[str(r) for r in roots]}; upload the files instead.", param="path")
        return path

    @contextmanager
    def upload_folder(self) -> Iterator[Path]:
        """A fresh folder for one upload under `<data_dir>/uploads/` (on the disk the bundle is
        stored on), removed when the block ends (and by `gc` if a crash left it)."""
        root = self.registry.data_dir / UPLOADS_DIR
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=root))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    async def store_bundle(self, name: str, folder: Path, *, replace: bool = False) -> tuple[BundleUpdate, list[str]]:
        """Validate and store the bundle in `folder` as `name`; publish the views it changes."""
        update = await registry_call(self.registry.store_bundle, name, folder, replace=replace)
        return update, await self.publisher.publish_changes(update.views)

    async def replace_head(self, bundle: str, head: str, weights: Path) -> tuple[BundleUpdate, list[str]]:
        """The hot-swap: new B matrices for one head (a safetensors file); every view that uses it
        gets a new version, published here before this returns."""
        update = await registry_call(self.registry.replace_head, bundle, head, weights)
        return update, await self.publisher.publish_changes(update.views)

    async def list_bundles(self) -> list[BundleInfo]:
        return await registry_call(self.registry.list_bundles)

    async def remove_bundle(self, name: str) -> None:
        await registry_call(self.registry.remove_bundle, name)

    # ---- views ----------------------------------------------------------------------------------
    async def define_view(self, name: str, bundle: str, *, retain: float = 1.0, forget: dict[str, float],
                          calibrated: bool = False) -> tuple[ViewInfo, str]:
        """Define (or redefine) view `name` on `bundle` and publish it; returns it and its version's
        label. `calibrated`: scale the forget weights by the bundle's calibrated ω(n) for n heads
        (`core.views.calibrated_view`)."""
        try:
            view = View(name=name, retain=retain, forget=forget)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="view") from None
        if calibrated:
            info = await registry_call(self.registry.get_bundle, bundle)
            try:
                view = calibrated_view(view, info.calibration)
            except ValueError as exc:
                raise InvalidRequest(f"bundle {bundle!r}: {exc}", param="calibrated") from None
        change = await registry_call(self.registry.define_view, view, bundle, replace=True)
        labels = await self.publisher.publish_changes([change])
        return change.view, labels[0]

    async def list_views(self) -> list[tuple[ViewInfo, LoadState]]:
        """Every view, with whether this engine serves it (and why not, when its load failed)."""
        views = await registry_call(self.registry.list_views)
        return [(view, self.publisher.load_state(view)) for view in views]

    async def remove_view(self, name: str) -> None:
        """Delete the view and unpublish it (running requests finish on it; then it drains)."""
        await registry_call(self.registry.remove_view, name)
        await self.publisher.unpublish(name)

    # ---- tenants and keys -----------------------------------------------------------------------
    async def create_tenant(self, name: str, *, limits: Limits, views: Sequence[str],
                            default_view: str | None) -> TenantInfo:
        return await registry_call(self.registry.create_tenant, name, limits=limits, views=views,
                                   default_view=default_view)

    async def list_tenants(self) -> list[TenantInfo]:
        return await registry_call(self.registry.list_tenants)

    async def update_tenant(self, name: str, *, grant: Sequence[str] = (), revoke: Sequence[str] = (),
                            default_view: object = UNCHANGED, limits: Limits | None = None,
                            disabled: bool | None = None) -> TenantInfo:
        """`Registry.update_tenant`, all or nothing: grants, then the default view (a view, None to
        clear it, UNCHANGED to keep it), then revokes, then limits and disabled (None: unchanged)."""
        return await registry_call(self.registry.update_tenant, name, grant=grant, revoke=revoke,
                                   default_view=default_view, limits=limits, disabled=disabled)

    async def delete_tenant(self, name: str) -> None:
        await registry_call(self.registry.delete_tenant, name)

    async def create_key(self, tenant: str | None, role: str, expires_at: datetime | None) -> tuple[int, str]:
        """A new key: its id and its secret (shown once)."""
        return await registry_call(self.registry.create_key, tenant, role, expires_at=expires_at)

    async def list_keys(self, tenant: str | None = None) -> list[KeyInfo]:
        return await registry_call(self.registry.list_keys, tenant)

    async def revoke_key(self, key_id: int) -> KeyInfo:
        return await registry_call(self.registry.revoke_key, key_id)

    # ---- experiments ----------------------------------------------------------------------------
    async def create_experiment(self, name: str, *, alias: str, tenants: Sequence[str], arms: list[dict],
                                sticky: str, control_arm: str | None, status: str) -> ExperimentInfo:
        return await registry_call(self.registry.create_experiment, name, alias=alias, tenants=tenants, arms=arms,
                                   sticky=sticky, control_arm=control_arm, status=status)

    async def list_experiments(self) -> list[ExperimentInfo]:
        return await registry_call(self.registry.list_experiments)

    async def get_experiment(self, name: str) -> ExperimentInfo:
        return await registry_call(self.registry.get_experiment, name)

    async def update_experiment(self, name: str, *, arms: list[dict] | None, control_arm: str | None,
                                tenants: list[str] | None, status: str | None) -> ExperimentInfo:
        """`Registry.update_experiment` (None: unchanged)."""
        return await registry_call(self.registry.update_experiment, name, arms=arms, control_arm=control_arm,
                                   tenants=tenants, status=status)

    async def delete_experiment(self, name: str) -> None:
        await registry_call(self.registry.delete_experiment, name)

    async def experiment_report(self, name: str, *, confidence: float) -> ExperimentReport:
        """`Registry.experiment_report`: per-arm statistics and the tests against the control arm."""
        return await registry_call(self.registry.experiment_report, name, confidence=confidence)

    async def record_probe(self, name: str, results: list[dict], *, source: str | None) -> list[ProbeResult]:
        return await registry_call(self.registry.record_probe_results, name, results, source=source)

    async def list_probes(self, name: str, *, limit: int) -> list[ProbeResult]:
        return await registry_call(self.registry.list_probe_results, name, limit=limit)

    # ---- operations -----------------------------------------------------------------------------
    async def collect_garbage(self, *, dry_run: bool = False) -> GarbageReport:
        """`Registry.collect_garbage` with this server's settings, sparing the view versions its
        engine still serves (current and draining)."""
        config = self.config
        return await asyncio.to_thread(
            self.registry.collect_garbage, keep_views=self.adapters.served_hashes(), grace_s=config.gc_grace_s,
            retention_days=config.request_log_retention_days, retention_rows=config.request_log_retention_rows,
            dry_run=dry_run)
