"""The persistent registry: bundles, views, tenants, grants, API keys, experiments, feedback and the
request log (SQLAlchemy 2.0; SQLite by default). No web code and no vLLM here.

`Registry` (store.py) is a facade over parts by concern, mixins over `database.Database`:
view_catalog, bundle_catalog, access, experiment_catalog and history; row lookups they share are
in rows.py. Beside them: models (tables), records (what callers get), errors, files (the
content-addressed store), garbage (gc), keys (secrets), experiments (arm assignment), stats.

    registry = Registry("sqlite:///var/registry.db", "var/data", base_fingerprint=fp, base_shapes=shapes)
    registry.create_all()
"""

from .access import UNCHANGED
from .errors import Conflict, InvalidInput, NotFound, RegistryError
from .experiments import Arm, choose_arm
from .records import (
    ArmResult,
    ArmSamples,
    BundleInfo,
    BundleUpdate,
    BundleVersion,
    ExperimentInfo,
    FeedbackInfo,
    KeyInfo,
    Limits,
    Principal,
    ProbeResult,
    RequestContext,
    RequestLogEntry,
    TenantInfo,
    ViewChange,
    ViewInfo,
)
from .store import Registry

__all__ = [
    "Arm",
    "ArmResult",
    "ArmSamples",
    "BundleInfo",
    "BundleUpdate",
    "BundleVersion",
    "Conflict",
    "ExperimentInfo",
    "FeedbackInfo",
    "InvalidInput",
    "KeyInfo",
    "Limits",
    "NotFound",
    "Principal",
    "ProbeResult",
    "Registry",
    "RegistryError",
    "RequestContext",
    "RequestLogEntry",
    "TenantInfo",
    "UNCHANGED",
    "ViewChange",
    "ViewInfo",
    "choose_arm",
]
