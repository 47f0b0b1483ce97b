"""The small immutable values the registry hands out (never ORM rows, so no caller holds a session).

Times are timezone-aware UTC. Paths are absolute (resolved against the registry's data directory).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core.manifest import Calibration
from ..core.views import ComposedView, View
from . import experiments
from .experiments import Arm
from .models import INT32_MAX

Role = Literal["tenant", "admin"]
ROLES: tuple[str, ...] = ("tenant", "admin")


# A limit is stored in an Integer column: 32-bit on PostgreSQL, so a larger value could not be written.
LimitValue = Annotated[int, Field(gt=0, le=INT32_MAX)]


class Limits(BaseModel):
    """Per-tenant limits; None means unlimited. Enforced by the API layer, stored here.
    Each is a positive integer of at most 2**31 - 1 (far above any meaningful limit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_concurrent: LimitValue | None = Field(default=None, description="sequences in flight at once; a request "
                                              "runs n × prompts of them")
    tokens_per_minute: LimitValue | None = Field(default=None, description="prompt + completion tokens over a "
                                                 "sliding minute")
    max_tokens_cap: LimitValue | None = Field(default=None, description="the most completion tokens one "
                                              "sequence may ask for")


@dataclass(frozen=True, slots=True)
class BundleInfo:
    """A bundle name and the version it points at now."""

    name: str
    content_hash: str
    path: Path
    base_fingerprint: str
    manifest: Mapping
    created_at: datetime
    updated_at: datetime

    @property
    def version(self) -> str:
        return self.content_hash[:12]

    @property
    def forget_heads(self) -> list[str]:
        return list(self.manifest.get("heads", {}).get("forget", []))

    @property
    def calibration(self) -> Calibration | None:
        """The bundle's view calibration (train.calibration), if it was trained with one."""
        raw = self.manifest.get("calibration")
        return None if raw is None else Calibration.model_validate(raw)


@dataclass(frozen=True, slots=True)
class BundleVersion:
    """One entry of a bundle's history. The current one has `superseded_at` None."""

    bundle: str
    content_hash: str
    path: Path
    created_at: datetime
    superseded_at: datetime | None

    @property
    def current(self) -> bool:
        return self.superseded_at is None


@dataclass(frozen=True, slots=True)
class ViewInfo:
    """A view and the composed LoRA folder that realises it now ("original": no bundle, no folder)."""

    name: str
    bundle: str | None
    spec: View
    content_hash: str | None
    path: Path | None
    created_at: datetime
    updated_at: datetime

    @property
    def is_original(self) -> bool:
        return self.bundle is None

    @property
    def composed(self) -> ComposedView | None:
        """What the engine loads: `lora_name` = `name@hash[:12]`. None for "original"."""
        if self.content_hash is None or self.path is None:
            return None
        return ComposedView(self.name, self.content_hash, self.path)

    @property
    def version(self) -> str | None:
        return None if self.content_hash is None else self.content_hash[:12]


@dataclass(frozen=True, slots=True)
class ViewChange:
    """A view whose composed LoRA changed. The engine adds `view.composed` and removes `previous`
    (None for a new view) once the requests that started on it have drained."""

    view: ViewInfo
    previous: ComposedView | None

    @property
    def name(self) -> str:
        return self.view.name


@dataclass(frozen=True, slots=True)
class BundleUpdate:
    """Result of storing or changing a bundle: its new state and every view that was recomposed.
    Views whose composed weights came out identical (they do not use the changed head) are not listed."""

    bundle: BundleInfo
    previous_hash: str | None
    views: tuple[ViewChange, ...] = ()

    @property
    def changed(self) -> bool:
        return self.previous_hash != self.bundle.content_hash


@dataclass(frozen=True, slots=True)
class TenantInfo:
    id: int
    name: str
    limits: Limits
    default_view: str | None
    views: tuple[str, ...]
    disabled: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """An API key as listed to an admin: never the secret or its hash."""

    id: int
    tenant: str | None
    role: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None = None

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= datetime.now(timezone.utc)

    @property
    def active(self) -> bool:
        """Whether the key authenticates (its tenant's `disabled` flag aside)."""
        return self.revoked_at is None and not self.expired


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is, as read from the database at authentication time (no cache)."""

    key_id: int
    role: str
    tenant_id: int | None
    tenant_name: str | None
    views: frozenset[str]
    default_view: str | None
    limits: Limits

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What one model request needs from the registry, read in one transaction by
    `Registry.request_context`: who the key is, and what the requested model name means for it."""

    principal: Principal
    model: str | None
    experiment: "ExperimentInfo | None"  # the unstopped experiment whose alias is `model` for this tenant
    view: str | None  # `model` when it names a view granted to the tenant (exact match), else None
    composed: ComposedView | None  # that view's composed LoRA now; None for "original" (or no view)


@dataclass(frozen=True, slots=True)
class ExperimentInfo:
    id: int
    name: str
    alias: str
    tenants: tuple[str, ...]
    arms: tuple[Arm, ...]
    sticky: str
    salt: str
    status: str
    control_arm: str
    created_at: datetime
    updated_at: datetime

    def choose_arm(self, sticky_value: str | None) -> Arm:
        """See `experiments.choose_arm`."""
        return experiments.choose_arm(self, sticky_value)


@dataclass(frozen=True, slots=True)
class RequestLogEntry:
    """One served request. `view_version` is the composed content hash (None for "original")."""

    response_id: str
    tenant: str
    model: str
    view: str
    status_code: int
    latency_ms: float
    view_version: str | None = None
    experiment: str | None = None
    arm: str | None = None
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    created_at: datetime | None = None  # None: the time it is written


@dataclass(frozen=True, slots=True)
class FeedbackInfo:
    """A rating of one response (the latest one: rating a response again replaces its rating).
    `experiment`, `arm` and `view` are those the request log has for the response; `attributed`
    says whether the response is logged (for this tenant) at all. A rating of a response not logged
    yet — served by a replica that has not flushed its log, or never served — is kept and counts in
    the experiment statistics once its response is logged, since those join ratings to the request
    log when they are computed."""

    id: int
    response_id: str
    tenant: str
    experiment: str | None
    arm: str | None
    view: str | None
    rating: float
    comment: str | None
    created_at: datetime
    attributed: bool


@dataclass(frozen=True, slots=True)
class ArmResult:
    """Per-arm totals of an experiment, from `request_log` and `feedback` (see
    `Registry.experiment_results` for which rows count). `errors` counts responses with status
    ≥ 400; means are None when there is nothing to average."""

    arm: str
    view: str | None
    requests: int
    errors: int
    mean_latency_ms: float | None
    mean_ttft_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    feedback_count: int
    mean_rating: float | None


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Offline scores of one arm's view, measured through the live server (`alter-train probe`).
    `metrics` maps a metric name (e.g. "forget_probability") to its value; `view_version` is the
    view's composed content hash when it was measured (None for "original"); `samples` is the number
    of evaluation records per set."""

    id: int
    experiment: str
    arm: str
    view: str
    view_version: str | None
    metrics: Mapping[str, float | None]
    samples: int
    source: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ArmSamples:
    """The raw observations of one experiment arm, for `stats`: exact totals from the request log
    and feedback, plus the individual latencies, times to first token and ratings (the newest
    `Registry.MAX_STAT_SAMPLES` of each) for percentiles, intervals and tests. `view`/`weight` are
    None for an arm that only appears in the logs (it was removed from the experiment later)."""

    arm: str
    view: str | None
    weight: float | None
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    feedback_count: int
    latency_ms: tuple[float, ...]
    ttft_ms: tuple[float, ...]
    ratings: tuple[float, ...]
