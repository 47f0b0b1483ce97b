"""Access: tenants, the views granted to them, their limits, API keys, and the one-statement
lookup that every model request starts with (`request_context`).

Nothing here is cached: every request reads its key, tenant, grants and limits from the database,
so a revoked key, a disabled tenant or a changed grant or limit applies to the next request on
every replica. Keys are stored as hashes only (`keys.py`). A grant that an unstopped experiment of
the tenant serves as an arm, or the tenant's default view, cannot be revoked (`update_tenant`),
and the last active admin key cannot be revoked (`revoke_key`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select
from sqlalchemy.orm import Session

from ..core.views import ComposedView
from . import experiments as exp
from . import keys, rows
from .database import SINGLE_READ_OPTION, Database, insert_ignore
from .errors import Conflict, InvalidInput, NotFound
from .models import INT32_MAX, ApiKeyRow, ExperimentRow, TenantRow, ViewRow, experiment_tenants, grants, utcnow
from .records import ROLES, ExperimentInfo, KeyInfo, Limits, Principal, RequestContext, TenantInfo

_GRANT_SEPARATOR = ","  # view names never contain it (see rows.check_name)


class _Unchanged(enum.Enum):
    UNCHANGED = "unchanged"


# An update argument that leaves its field as it is, where None would clear it (`update_tenant`).
UNCHANGED = _Unchanged.UNCHANGED


# The request path's one statement (`Registry.request_context`), built once: key, tenant, the
# tenant's grants (aggregated into one string), the unstopped experiment whose alias is the model
# name, and the granted view of that name. One row, so one statement: SQLite's driver releases and
# retakes the GIL for every step (row) of a query, and under load each retake can wait for the event
# loop thread, so a per-grant row fetch cost far more than the query itself.
_LIVE_EXPERIMENTS = (
    select(experiment_tenants.c.tenant_id, ExperimentRow.id.label("experiment_id"), ExperimentRow.alias)
    .join(ExperimentRow, ExperimentRow.id == experiment_tenants.c.experiment_id)
    .where(ExperimentRow.alias == bindparam("model"), ExperimentRow.status != exp.STOPPED)
    .subquery()
)
_MODEL_VIEW = (
    select(grants.c.tenant_id, ViewRow.name, ViewRow.content_hash, ViewRow.path)
    .join(ViewRow, ViewRow.id == grants.c.view_id)
    .where(ViewRow.name == bindparam("model"))
    .subquery()
)
_GRANTED_NAMES = (
    select(func.aggregate_strings(ViewRow.name, _GRANT_SEPARATOR))
    .select_from(grants).join(ViewRow, ViewRow.id == grants.c.view_id)
    .where(grants.c.tenant_id == TenantRow.id)
    .scalar_subquery()
)
_DEFAULT_VIEW = select(ViewRow.name).where(ViewRow.id == TenantRow.default_view_id).scalar_subquery()
_REQUEST_CONTEXT = (
    select(ApiKeyRow.id.label("key_id"), ApiKeyRow.role, ApiKeyRow.key_hash, ApiKeyRow.revoked_at, ApiKeyRow.expires_at,
           TenantRow.id.label("tenant_id"), TenantRow.name.label("tenant_name"), TenantRow.disabled,
           TenantRow.max_concurrent, TenantRow.tokens_per_minute, TenantRow.max_tokens_cap,
           _GRANTED_NAMES.label("granted"), _DEFAULT_VIEW.label("default_view"),
           _LIVE_EXPERIMENTS.c.experiment_id, _LIVE_EXPERIMENTS.c.alias,
           _MODEL_VIEW.c.name.label("view_name"), _MODEL_VIEW.c.content_hash.label("view_hash"),
           _MODEL_VIEW.c.path.label("view_path"))
    .select_from(ApiKeyRow)
    .outerjoin(TenantRow, ApiKeyRow.tenant_id == TenantRow.id)
    .outerjoin(_LIVE_EXPERIMENTS, _LIVE_EXPERIMENTS.c.tenant_id == TenantRow.id)
    .outerjoin(_MODEL_VIEW, _MODEL_VIEW.c.tenant_id == TenantRow.id)
    .where(ApiKeyRow.key_hash == bindparam("digest"))
)


def _check_expiry(expires_at: datetime | None) -> None:
    if expires_at is None:
        return
    if expires_at.tzinfo is None:
        raise InvalidInput(f"expires_at {expires_at.isoformat()} has no time zone; give one (e.g. ...Z for UTC)")
    if expires_at <= utcnow():
        raise InvalidInput(f"expires_at {expires_at.isoformat()} is not in the future")


class Access(Database):
    """Tenants, grants, limits and API keys (see the module docstring)."""

    def create_tenant(
        self, name: str, *, limits: Limits | None = None, views: Sequence[str] = (), default_view: str | None = None
    ) -> TenantInfo:
        """A new tenant granted `views`; `default_view`, if given, must be one of them."""
        rows.check_name("tenant", name)
        if default_view is not None and default_view not in views:
            raise InvalidInput(f"default view {default_view!r} of tenant {name!r} is not among its granted views "
                               f"{list(views)}; grant it too")
        limits = limits or Limits()
        with self._writing(f"tenant {name!r}") as s:
            if s.scalar(select(TenantRow.id).where(TenantRow.name == name)) is not None:
                raise Conflict(f"tenant {name!r} already exists; choose another name or update it")
            view_ids = rows.view_ids(s, views)
            row = TenantRow(name=name, **limits.model_dump(), default_view_id=view_ids.get(default_view),
                            disabled=False)
            s.add(row)
            s.flush()
            for view_id in view_ids.values():
                s.execute(insert(grants).values(tenant_id=row.id, view_id=view_id, created_at=utcnow()))
            return self._tenant_info(s, row)

    def get_tenant(self, name: str) -> TenantInfo:
        with self._reading() as s:
            return self._tenant_info(s, rows.tenant_row(s, name))

    def list_tenants(self) -> list[TenantInfo]:
        with self._reading() as s:
            return [self._tenant_info(s, r) for r in s.scalars(select(TenantRow).order_by(TenantRow.name))]

    def update_tenant(
        self,
        name: str,
        *,
        grant: Sequence[str] = (),
        revoke: Sequence[str] = (),
        default_view: str | None | _Unchanged = UNCHANGED,
        limits: Limits | None = None,
        disabled: bool | None = None,
    ) -> TenantInfo:
        """Change tenant `name` in one transaction, all or nothing, in this order: grant the views
        `grant` (idempotent); set `default_view` (a granted view, or None to clear it; UNCHANGED
        leaves it); revoke the views `revoke`; replace its limits (None leaves them); set `disabled`
        (None leaves it; a disabled tenant's keys stop authenticating at once). The order lets one
        call grant a new view, make it the default and revoke the old one.

        Every change applies to the tenant's next request. A revoke is refused (Conflict) for the
        default view and for a view that an unstopped experiment of the tenant serves as an arm
        (the experiment's alias would still serve it); revoking a view not granted is NotFound."""
        new_default = [default_view] if isinstance(default_view, str) else []
        with self._writing(f"tenant {name!r}") as s:
            row = rows.tenant_row(s, name, lock=True)
            view_ids = rows.view_ids(s, [*grant, *new_default, *revoke])
            for view in grant:
                # Idempotent also when two replicas grant the same view at once (PostgreSQL does not
                # serialize writers the way SQLite's database lock does).
                insert_ignore(s, grants, {"tenant_id": row.id, "view_id": view_ids[view], "created_at": utcnow()})
            for view in new_default:
                if not self._granted(s, row.id, view_ids[view]):
                    raise InvalidInput(f"view {view!r} is not granted to tenant {name!r}; grant it before making it "
                                       "the default")
            if default_view is not UNCHANGED:
                row.default_view_id = view_ids[default_view] if default_view is not None else None
            for view in revoke:
                self._revoke(s, row, view, view_ids[view])
            if limits is not None:
                for field, value in limits.model_dump().items():
                    setattr(row, field, value)
            if disabled is not None:
                row.disabled = bool(disabled)
            return self._tenant_info(s, row)

    def _revoke(self, s: Session, row: TenantRow, view: str, view_id: int) -> None:
        if row.default_view_id == view_id:
            raise Conflict(f"view {view!r} is the default view of tenant {row.name!r}; set another default first")
        serving = sorted(e.name for e in rows.live_experiments(s, tenant_id=row.id)
                         if any(a["view"] == view for a in e.arms))
        if serving:
            raise Conflict(f"view {view!r} is an arm of experiment(s) {serving} of tenant {row.name!r}; stop them or "
                           "change their arms first")
        if not s.execute(delete(grants).where(grants.c.tenant_id == row.id, grants.c.view_id == view_id)).rowcount:
            raise NotFound(f"tenant {row.name!r} has no grant for view {view!r}")

    @staticmethod
    def _granted(s: Session, tenant_id: int, view_id: int) -> bool:
        query = select(grants.c.view_id).where(grants.c.tenant_id == tenant_id, grants.c.view_id == view_id)
        return s.scalar(query) is not None

    def set_limits(self, name: str, limits: Limits) -> TenantInfo:
        return self.update_tenant(name, limits=limits)

    def set_disabled(self, name: str, disabled: bool) -> TenantInfo:
        """Disable or re-enable a tenant. A disabled tenant's keys stop authenticating at once."""
        return self.update_tenant(name, disabled=disabled)

    def set_default_view(self, name: str, view: str | None) -> TenantInfo:
        """Make granted view `view` the tenant's default (None: no default)."""
        return self.update_tenant(name, default_view=view)

    def grant_view(self, tenant: str, view: str) -> TenantInfo:
        """Let `tenant` use `view` as a model name (idempotent)."""
        return self.update_tenant(tenant, grant=[view])

    def revoke_view(self, tenant: str, view: str) -> TenantInfo:
        """Take `view` away from `tenant` (see `update_tenant` for when that is refused)."""
        return self.update_tenant(tenant, revoke=[view])

    def delete_tenant(self, name: str) -> None:
        """Delete a tenant with its grants, API keys and experiment memberships (keys fail at once)."""
        with self._writing(f"tenant {name!r}") as s:
            s.delete(rows.tenant_row(s, name))

    def create_key(self, tenant: str | None, role: str = "tenant", *, secret: str | None = None,
                   expires_at: datetime | None = None) -> tuple[int, str]:
        """A new key; returns `(key_id, secret)`. The secret is shown here once and never stored.
        From `expires_at` on (timezone-aware, in the future) the key no longer authenticates.

        `secret` imports an operator-chosen key (e.g. the deployment's ALTER_SERVE_ADMIN_KEY): any
        random secret of 32 to 128 printable characters (`keys.imported_secret_problem`).
        """
        if role not in ROLES:
            raise InvalidInput(f"key role {role!r} must be one of {list(ROLES)}")
        if role == "admin" and tenant is not None:
            raise InvalidInput(f"admin keys belong to no tenant; pass tenant=None, not {tenant!r}")
        if role == "tenant" and tenant is None:
            raise InvalidInput("a tenant key needs a tenant name")
        if secret is None:
            secret = keys.new_secret()
        elif (problem := keys.imported_secret_problem(secret)) is not None:
            raise InvalidInput(f"an imported key must be a random secret; {problem}")
        _check_expiry(expires_at)
        with self._writing("API key") as s:
            tenant_id = None if tenant is None else rows.tenant_row(s, tenant).id
            row = ApiKeyRow(tenant_id=tenant_id, role=role, prefix=keys.display_prefix(secret),
                            key_hash=keys.hash_secret(secret), expires_at=expires_at)
            s.add(row)
            s.flush()
            return row.id, secret

    def revoke_key(self, key_id: int) -> KeyInfo:
        """Revoke a key; the next `authenticate` with it fails. Revoking twice keeps the first time.
        The last active admin key cannot be revoked: nobody could administer the server after it."""
        with self._writing(f"API key {key_id}") as s:
            # An id beyond the column's range names no key (and would overflow the driver's integer).
            row = s.get(ApiKeyRow, key_id) if 0 < key_id <= INT32_MAX else None
            if row is None:
                raise NotFound(f"API key {key_id} not found; see list_keys")
            if row.revoked_at is None:
                if row.role == "admin" and self._active_admin_keys(s) == [row.id]:
                    raise Conflict(f"API key {key_id} is the last active admin key; create another admin key "
                                   "first, so that the server can still be administered")
                row.revoked_at = utcnow()
            return self._key_info(s, row)

    @staticmethod
    def _active_admin_keys(s: Session) -> list[int]:
        """Ids of the admin keys that authenticate now; locked, so two revocations cannot both pass."""
        now = utcnow()
        query = (select(ApiKeyRow.id).where(ApiKeyRow.role == "admin", ApiKeyRow.revoked_at.is_(None))
                 .where((ApiKeyRow.expires_at.is_(None)) | (ApiKeyRow.expires_at > now)).with_for_update())
        return list(s.scalars(query))

    def list_keys(self, tenant: str | None = None) -> list[KeyInfo]:
        """All keys (or one tenant's), oldest first, without secrets or hashes."""
        with self._reading() as s:
            query = select(ApiKeyRow).order_by(ApiKeyRow.id)
            if tenant is not None:
                query = query.where(ApiKeyRow.tenant_id == rows.tenant_row(s, tenant).id)
            return [self._key_info(s, r) for r in s.scalars(query)]

    def find_key(self, secret: str) -> KeyInfo | None:
        """The key whose secret is `secret`, revoked or not and whatever its tenant's state, or None:
        to explain why a known secret does not authenticate (e.g. an operator-configured admin key)."""
        if not keys.looks_like_secret(secret):
            return None
        with self._reading() as s:
            row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.key_hash == keys.hash_secret(secret)))
            return None if row is None or not keys.hashes_match(row.key_hash, secret) else self._key_info(s, row)

    def authenticate(self, secret: str) -> Principal | None:
        """The principal a key secret belongs to, or None (unknown, malformed, revoked, or the
        tenant is disabled). Read from the database on every call — no cache — so revocation,
        grants and limits take effect on the next request on every replica."""
        context = self.request_context(secret)
        return None if context is None else context.principal

    def request_context(self, secret: str, model: str | None = None) -> RequestContext | None:
        """Everything a model request needs from the registry, in one statement (one row): the key's
        principal (as `authenticate`), the unstopped experiment whose alias is `model` for its
        tenant, and `model` as a granted view with its composed LoRA. None when the key does not
        authenticate. Runs for every request, so it stays in SQLAlchemy Core with a statement built
        once (no ORM session, no per-call statement construction). No cache: a revoked key, a
        changed grant or limit applies to the next request on every replica."""
        if not keys.looks_like_secret(secret):
            return None
        name = model if isinstance(model, str) else None
        with self.engine.connect().execution_options(**{SINGLE_READ_OPTION: True}) as conn:
            row = conn.execute(_REQUEST_CONTEXT, {"digest": keys.hash_secret(secret), "model": name}).first()
            if row is None or not keys.hashes_match(row.key_hash, secret) or row.revoked_at is not None:
                return None
            if row.expires_at is not None and row.expires_at <= utcnow():
                return None
            if row.role == "admin":
                return RequestContext(Principal(row.key_id, "admin", None, None, frozenset(), None, Limits()),
                                      name, None, None, None)
            if row.tenant_id is None or row.disabled:
                return None
            experiment = None
            if row.experiment_id is not None and row.alias == name:  # exact, whatever the collation
                experiment = self._experiment_info_core(conn, row.experiment_id)
        granted = frozenset(row.granted.split(_GRANT_SEPARATOR)) if row.granted else frozenset()
        principal = Principal(row.key_id, "tenant", row.tenant_id, row.tenant_name, granted,
                              row.default_view if row.default_view in granted else None, self._limits(row))
        view = composed = None
        if name is not None and row.view_name == name:  # exact: no case folding, no stripping
            view = name
            if row.view_hash is not None:
                composed = ComposedView(name, row.view_hash, self._abs(row.view_path))
        return RequestContext(principal, name, experiment, view, composed)

    @staticmethod
    def _experiment_info_core(conn: Any, experiment_id: int) -> ExperimentInfo | None:
        row = conn.execute(select(ExperimentRow.__table__).where(ExperimentRow.id == experiment_id)).first()
        return None if row is None else rows.experiment_info(conn, row)

    @staticmethod
    def _limits(row: Any) -> Limits:
        """The limits of a tenant row (ORM or Core: same column names). Not validated again: they were
        when written, and a value stored before a bound existed must not make the tenant unreadable."""
        return Limits.model_construct(max_concurrent=row.max_concurrent, tokens_per_minute=row.tokens_per_minute,
                                      max_tokens_cap=row.max_tokens_cap)

    def _tenant_info(self, s: Session, row: TenantRow) -> TenantInfo:
        s.flush()
        granted = s.execute(
            select(ViewRow.id, ViewRow.name).join(grants, grants.c.view_id == ViewRow.id)
            .where(grants.c.tenant_id == row.id).order_by(ViewRow.name)
        ).all()
        default = next((n for i, n in granted if i == row.default_view_id), None)
        return TenantInfo(row.id, row.name, self._limits(row), default, tuple(n for _, n in granted), row.disabled,
                          row.created_at)

    @staticmethod
    def _key_info(s: Session, row: ApiKeyRow) -> KeyInfo:
        tenant = None if row.tenant_id is None else s.scalar(
            select(TenantRow.name).where(TenantRow.id == row.tenant_id))
        return KeyInfo(row.id, tenant, row.role, row.prefix, row.created_at, row.revoked_at, row.expires_at)
