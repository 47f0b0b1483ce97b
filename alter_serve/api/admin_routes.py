"""Admin API (admin keys only): bundles, head hot-swap, views, tenants, keys, experiments, gc.

Each handler validates its input, calls one method of the service's `Administration` (which
changes the registry, then publishes to the engine: `serving.admin`) and shapes the answer.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from ..core.names import MANIFEST_FILE, WEIGHTS_FILE
from ..registry import UNCHANGED, Limits, Principal
from ..registry.experiments import MAX_ARM_WEIGHT
from ..registry.models import INT32_MAX
from ..serving.service import AlterService
from .auth import admin_principal
from .dependencies import ServiceDep
from .errors import invalid
from .uploads import FilePart, receive_form

router = APIRouter(prefix="/admin", dependencies=[Depends(admin_principal)])
MAX_MANIFEST_BYTES = 1 << 20
Admin = Annotated[Principal, Depends(admin_principal)]


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


# ---- bundles ------------------------------------------------------------------------------------
class BundleFromPath(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=63)
    path: str = Field(min_length=1, max_length=4096)
    replace: bool = False


@router.post("/bundles")
async def register_bundle(service: ServiceDep, body: BundleFromPath) -> dict:
    update, versions = await service.admin.register_bundle(body.name, body.path, replace=body.replace)
    return {"bundle": _jsonable(update.bundle), "views": versions}


_BUNDLE_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["name", "manifest", "weights"],
    "properties": {"name": {"type": "string", "maxLength": 63}, "replace": {"type": "boolean", "default": False},
                   "manifest": {"type": "string", "format": "binary", "description": "manifest.json (1 MiB at most)"},
                   "weights": {"type": "string", "format": "binary", "description": "weights.safetensors"}}}}}}}
_HEAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["weights"],
    "properties": {"weights": {"type": "string", "format": "binary",
                               "description": "safetensors: one [out, rank] tensor per module"}}}}}}}


@router.post("/bundles/upload", openapi_extra=_BUNDLE_FORM)
async def upload_bundle(request: Request, service: ServiceDep) -> dict:
    """Upload a bundle as multipart/form-data (name, manifest, weights, replace). The files stream
    to disk as they arrive (`uploads.receive_form`), then are validated and stored."""
    with service.admin.upload_folder() as staging:
        form = await receive_form(request, staging, {
            "manifest": FilePart(MANIFEST_FILE, MAX_MANIFEST_BYTES),
            "weights": FilePart(WEIGHTS_FILE, service.config.max_upload_bytes)}, texts=("name", "replace"))
        name = form.get("name", "")
        if not name or len(name) > 63:
            raise invalid("The form field 'name' must name the bundle (1 to 63 characters).", "name")
        replace = form.get("replace", "false").strip().lower() in ("true", "1", "yes", "on")
        update, versions = await service.admin.store_bundle(name, staging, replace=replace)
    return {"bundle": _jsonable(update.bundle), "views": versions}


@router.put("/bundles/{name}/heads/{head}", openapi_extra=_HEAD_FORM)
async def replace_head(request: Request, service: ServiceDep, name: str, head: str) -> dict:
    """The hot-swap: new B matrices for one head (multipart field `weights`, streamed to disk);
    every view that uses it gets a new version."""
    with service.admin.upload_folder() as staging:
        await receive_form(request, staging, {"weights": FilePart("head.safetensors", service.config.max_upload_bytes)})
        update, versions = await service.admin.replace_head(name, head, staging / "head.safetensors")
    return {"bundle": _jsonable(update.bundle), "previous_hash": update.previous_hash, "views": versions}


@router.get("/bundles")
async def list_bundles(service: ServiceDep) -> dict:
    return {"data": _jsonable(await service.admin.list_bundles())}


@router.delete("/bundles/{name}")
async def delete_bundle(service: ServiceDep, name: str) -> dict:
    await service.admin.remove_bundle(name)
    return {"deleted": name}


# ---- views --------------------------------------------------------------------------------------
class ViewBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bundle: str = Field(min_length=1, max_length=63)
    retain: float = 1.0
    forget: dict[str, float] = Field(default_factory=dict)
    # Scale the forget weights by the bundle's calibrated ω(n) for n heads (core.views.calibrated_view).
    calibrated: bool = False


@router.put("/views/{name}")
async def define_view(service: ServiceDep, name: str, body: ViewBody) -> dict:
    view, version = await service.admin.define_view(name, body.bundle, retain=body.retain, forget=body.forget,
                                                    calibrated=body.calibrated)
    return {"view": _jsonable(view), "version": version}


@router.get("/views")
async def list_views(service: ServiceDep) -> dict:
    """Every view, with whether this server serves it (`loaded`, `loaded_version`) and why not when
    its version failed to load (`load_error`, `load_failed_at`)."""
    return {"data": [{**_jsonable(view), **_jsonable(state)} for view, state in await service.admin.list_views()]}


@router.delete("/views/{name}")
async def delete_view(service: ServiceDep, name: str) -> dict:
    await service.admin.remove_view(name)
    return {"deleted": name}


# ---- tenants and keys -----------------------------------------------------------------------------
class TenantBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=63)
    views: list[str] = Field(default_factory=list, max_length=1000)
    default_view: str | None = None
    limits: Limits = Field(default_factory=Limits)


class TenantPatch(BaseModel):
    """Applied in one transaction, all or nothing (`Registry.update_tenant`): grants, then the
    default view, then revokes, then limits (all of them replaced) and disabled. An absent field
    changes nothing; `"default_view": null` clears the default."""

    model_config = ConfigDict(extra="forbid")
    grant: list[str] = Field(default_factory=list, max_length=1000)
    revoke: list[str] = Field(default_factory=list, max_length=1000)
    default_view: str | None = None
    limits: Limits | None = None
    disabled: bool | None = None


@router.post("/tenants")
async def create_tenant(service: ServiceDep, body: TenantBody) -> dict:
    tenant = await service.admin.create_tenant(body.name, limits=body.limits, views=body.views,
                                               default_view=body.default_view)
    return _jsonable(tenant)


@router.get("/tenants")
async def list_tenants(service: ServiceDep) -> dict:
    return {"data": _jsonable(await service.admin.list_tenants())}


@router.patch("/tenants/{name}")
async def update_tenant(service: ServiceDep, name: str, body: TenantPatch) -> dict:
    default_view = body.default_view if "default_view" in body.model_fields_set else UNCHANGED
    tenant = await service.admin.update_tenant(name, grant=body.grant, revoke=body.revoke, default_view=default_view,
                                               limits=body.limits, disabled=body.disabled)
    return _jsonable(tenant)


@router.delete("/tenants/{name}")
async def delete_tenant(service: ServiceDep, name: str) -> dict:
    await service.admin.delete_tenant(name)
    return {"deleted": name}


class KeyExpiry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expires_at: AwareDatetime | None = Field(default=None, description="when the key stops working (RFC 3339, "
                                             "with a time zone); none: never")


class KeyBody(KeyExpiry):
    role: Literal["tenant", "admin"] = "tenant"
    tenant: str | None = Field(default=None, description="the tenant of a tenant key; none for an admin key")


@router.post("/tenants/{name}/keys")
async def create_tenant_key(service: ServiceDep, name: str, body: KeyExpiry | None = None) -> dict:
    return await _create_key(service, name, "tenant", None if body is None else body.expires_at)


@router.post("/keys")
async def create_key(service: ServiceDep, body: KeyBody) -> dict:
    """A tenant key (`tenant` set) or an admin key (`role: admin`); the secret is in this answer only."""
    return await _create_key(service, body.tenant, body.role, body.expires_at)


async def _create_key(service: AlterService, tenant: str | None, role: str, expires_at: datetime | None) -> dict:
    key_id, secret = await service.admin.create_key(tenant, role, expires_at)
    return {"id": key_id, "tenant": tenant, "role": role, "expires_at": _jsonable(expires_at), "key": secret,
            "note": "Store this key now; it is not shown again."}


@router.get("/keys")
async def list_keys(service: ServiceDep, tenant: str | None = None) -> dict:
    return {"data": _jsonable(await service.admin.list_keys(tenant))}


@router.delete("/keys/{key_id}")
async def revoke_key(service: ServiceDep, key_id: int) -> dict:
    return _jsonable(await service.admin.revoke_key(key_id))


# ---- experiments ----------------------------------------------------------------------------------
class ArmBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    view: str
    weight: float = Field(ge=0, le=MAX_ARM_WEIGHT, allow_inf_nan=False)


class ExperimentBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=63)
    alias: str = Field(min_length=1, max_length=63)
    tenants: list[str] = Field(min_length=1)
    arms: list[ArmBody] = Field(min_length=1, max_length=16)
    sticky: str = "user"
    control_arm: str | None = None
    status: str = "running"


class ExperimentPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arms: list[ArmBody] | None = None
    control_arm: str | None = None
    tenants: list[str] | None = None
    status: str | None = None


@router.post("/experiments")
async def create_experiment(service: ServiceDep, body: ExperimentBody) -> dict:
    info = await service.admin.create_experiment(body.name, alias=body.alias, tenants=body.tenants,
                                                 arms=[a.model_dump() for a in body.arms], sticky=body.sticky,
                                                 control_arm=body.control_arm, status=body.status)
    return _jsonable(info)


@router.get("/experiments")
async def list_experiments(service: ServiceDep) -> dict:
    return {"data": _jsonable(await service.admin.list_experiments())}


@router.patch("/experiments/{name}")
async def update_experiment(service: ServiceDep, name: str, body: ExperimentPatch) -> dict:
    arms = None if body.arms is None else [a.model_dump() for a in body.arms]
    info = await service.admin.update_experiment(name, arms=arms, control_arm=body.control_arm, tenants=body.tenants,
                                                 status=body.status)
    return _jsonable(info)


@router.delete("/experiments/{name}")
async def delete_experiment(service: ServiceDep, name: str) -> dict:
    await service.admin.delete_experiment(name)
    return {"deleted": name}


@router.get("/experiments/{name}")
async def get_experiment(service: ServiceDep, name: str) -> dict:
    return _jsonable(await service.admin.get_experiment(name))


@router.get("/experiments/{name}/results")
async def experiment_results(service: ServiceDep, name: str,
                             confidence: Annotated[float, Query(ge=0.5, lt=1.0)] = 0.95) -> dict:
    """Per arm: requests, errors (rate + Wilson interval), latency/TTFT mean-p50-p95, tokens, feedback
    mean + t interval, the latest offline probe, and Welch / chi-square tests against the control arm."""
    return _jsonable(await service.admin.experiment_report(name, confidence=confidence))


class ProbeArmBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arm: str = Field(min_length=1, max_length=63)
    view: str = Field(min_length=1, max_length=63)
    view_version: str | None = Field(default=None, max_length=64)
    metrics: dict[str, float | None] = Field(min_length=1, max_length=64)
    samples: int = Field(default=0, ge=0, le=INT32_MAX)


class ProbeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str | None = Field(default=None, max_length=2000)
    results: list[ProbeArmBody] = Field(min_length=1, max_length=16)


@router.post("/experiments/{name}/probes")
async def record_probe(service: ServiceDep, name: str, body: ProbeBody) -> dict:
    """Store one offline probe run (per-arm evaluation scores from `alter-train probe`)."""
    stored = await service.admin.record_probe(name, [r.model_dump() for r in body.results], source=body.source)
    return {"experiment": name, "data": _jsonable(stored)}


@router.get("/experiments/{name}/probes")
async def list_probes(service: ServiceDep, name: str, limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> dict:
    return {"experiment": name, "data": _jsonable(await service.admin.list_probes(name, limit=limit))}


# ---- operations -----------------------------------------------------------------------------------
class GcBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dry_run: bool = Field(default=False, description="list what would be removed, remove nothing")


@router.post("/gc")
async def collect_garbage(service: ServiceDep, body: GcBody | None = None) -> dict:
    """Remove superseded bundle versions, unreferenced bundle and composed-view folders, upload debris
    and request-log rows outside the configured retention (`registry.garbage`); never anything a
    bundle, view or this engine still uses."""
    report = await service.admin.collect_garbage(dry_run=body is not None and body.dry_run)
    return _jsonable(report)
