"""ORM tables of the registry (SQLAlchemy 2.0 declarative, portable: SQLite by default, PostgreSQL
for several replicas).

Callers never see these classes: `Registry` turns rows into the frozen records of `records.py`
before its session closes, so no caller holds a session or trips over a lazy load.

Paths in `bundles`, `bundle_versions` and `views` are stored *relative* to the data directory
(`bundles/<sha256>`, `views/<sha256>`): content-addressed names are the same on every replica, so a
moved or shared data directory keeps working.

`feedback` and `request_log` store names, not foreign keys: they are append-only history, written in
bulk on the hot path, and must survive the deletion of the tenant, view or experiment they mention.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAME_LEN = 63
HASH_LEN = 64
INT32_MAX = 2**31 - 1  # an Integer column's range on PostgreSQL (SQLite's is 64-bit)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend. SQLite has no time zones: store naive UTC and
    put the zone back on the way out, so comparisons never mix naive and aware values."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: registry times must be timezone-aware")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    # Stable constraint names, so a later Alembic migration can refer to them on every backend.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class RegistryStateRow(Base):
    """One row (id 1). `views_revision` goes up in every transaction that changes what a view serves
    (a view defined, redefined, recomposed or removed), so a replica learns with one tiny query
    whether it must reload its views (`Registry.views_revision`). A counter rather than
    max(updated_at): replicas' clocks may disagree, and a deletion leaves no timestamp behind."""

    __tablename__ = "registry_state"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    views_revision: Mapped[int] = mapped_column(Integer, default=0)


class BundleRow(Base):
    """A named bundle and the version its name points at now."""

    __tablename__ = "bundles"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    content_hash: Mapped[str] = mapped_column(String(HASH_LEN))
    path: Mapped[str] = mapped_column(String(255))
    base_fingerprint: Mapped[str] = mapped_column(String(255))
    manifest: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BundleVersionRow(Base):
    """Every version a bundle name has pointed at, so old versions can be found until drained.
    `superseded_at` is null for the current one."""

    __tablename__ = "bundle_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id", ondelete="CASCADE"), index=True)
    content_hash: Mapped[str] = mapped_column(String(HASH_LEN))
    path: Mapped[str] = mapped_column(String(255))
    manifest: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    superseded_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ViewRow(Base):
    """A view: a bundle plus head weights, and the composed LoRA folder that realises it now.
    The built-in view "original" has no bundle and no folder (the base model itself)."""

    __tablename__ = "views"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    bundle_id: Mapped[int | None] = mapped_column(ForeignKey("bundles.id", ondelete="RESTRICT"), nullable=True, index=True)
    spec: Mapped[dict] = mapped_column(JSON)
    content_hash: Mapped[str | None] = mapped_column(String(HASH_LEN), nullable=True)
    path: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


grants = Table(
    "grants",
    Base.metadata,
    Column("tenant_id", ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("view_id", ForeignKey("views.id", ondelete="RESTRICT"), primary_key=True, index=True),
    Column("created_at", UTCDateTime, default=utcnow, nullable=False),
)


class TenantRow(Base):
    """A customer. Null limits mean unlimited. `default_view_id` is always one of its grants."""

    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    max_concurrent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_tokens_cap: Mapped[int | None] = mapped_column(Integer, nullable=True)
    default_view_id: Mapped[int | None] = mapped_column(ForeignKey("views.id", ondelete="RESTRICT"), nullable=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKeyRow(Base):
    """An API key. Only the sha256 of the secret is stored; `prefix` is for display."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint(
            "(role = 'admin' AND tenant_id IS NULL) OR (role = 'tenant' AND tenant_id IS NOT NULL)",
            name="role_matches_tenant",
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=True, index=True)
    role: Mapped[str] = mapped_column(String(16))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(HASH_LEN), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # None: never. An expired key fails authentication like a revoked one.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


experiment_tenants = Table(
    "experiment_tenants",
    Base.metadata,
    Column("experiment_id", ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
    Column("tenant_id", ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True, index=True),
)


class ExperimentRow(Base):
    """An A/B test: for its tenants, the model name `alias` is served by one of `arms`
    (JSON list of {name, view, weight}), chosen by `experiments.choose_arm`."""

    __tablename__ = "experiments"
    __table_args__ = (CheckConstraint("status IN ('running', 'paused', 'stopped')", name="status"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    alias: Mapped[str] = mapped_column(String(NAME_LEN), index=True)
    arms: Mapped[list] = mapped_column(JSON)
    sticky: Mapped[str] = mapped_column(String(140))
    salt: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    control_arm: Mapped[str] = mapped_column(String(NAME_LEN))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class FeedbackRow(Base):
    """A tenant's rating of one response: one row per (tenant, response_id), a new rating replacing
    the old (no unique constraint, so a race may leave two; the newest counts). Statistics attribute
    it to an experiment arm by joining `response_id` to `request_log` when they are computed;
    `experiment`, `arm` and `view` only record what the log said when the rating was stored."""

    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    response_id: Mapped[str] = mapped_column(String(128), index=True)
    tenant: Mapped[str] = mapped_column(String(NAME_LEN))
    experiment: Mapped[str | None] = mapped_column(String(NAME_LEN), nullable=True, index=True)
    arm: Mapped[str | None] = mapped_column(String(NAME_LEN), nullable=True)
    view: Mapped[str | None] = mapped_column(String(NAME_LEN), nullable=True)
    rating: Mapped[float] = mapped_column(Float)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RequestLogRow(Base):
    """One served request, for A/B results. Written in batches by `Registry.log_requests`."""

    __tablename__ = "request_log"
    __table_args__ = (Index("ix_request_log_experiment_arm", "experiment", "arm"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    response_id: Mapped[str] = mapped_column(String(128), index=True)
    tenant: Mapped[str] = mapped_column(String(NAME_LEN))
    model: Mapped[str] = mapped_column(String(NAME_LEN))
    view: Mapped[str] = mapped_column(String(NAME_LEN))
    view_version: Mapped[str | None] = mapped_column(String(HASH_LEN), nullable=True)
    experiment: Mapped[str | None] = mapped_column(String(NAME_LEN), nullable=True)
    arm: Mapped[str | None] = mapped_column(String(NAME_LEN), nullable=True)
    status_code: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class ProbeResultRow(Base):
    """Offline evaluation scores of one experiment arm's view, measured through the live server by
    `alter-train probe` (e.g. forget/retain answer probability). Unlike the request log these rows
    belong to their experiment (foreign key, deleted with it): they describe its arms, are written
    rarely by an admin, and a later experiment of the same name must not inherit them."""

    __tablename__ = "probe_results"
    __table_args__ = (Index("ix_probe_results_experiment_arm", "experiment_id", "arm"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    arm: Mapped[str] = mapped_column(String(NAME_LEN))
    view: Mapped[str] = mapped_column(String(NAME_LEN))
    view_version: Mapped[str | None] = mapped_column(String(HASH_LEN), nullable=True)
    metrics: Mapped[dict] = mapped_column(JSON)
    samples: Mapped[int] = mapped_column(Integer, default=0)
    source: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
