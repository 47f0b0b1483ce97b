"""`Registry`: the persistent state of alter-serve — bundles, views, tenants, grants, API keys,
experiments, feedback and the request log.

One SQLAlchemy engine (SQLite by default; any SQLAlchemy URL, e.g. PostgreSQL when several
replicas share one database) plus a data directory holding the content-addressed file store
(`files.py`). Every public method opens its own short session and returns frozen records
(`records.py`), so callers — the FastAPI layer's thread pool, the engine — never hold a session.

Consistency rules kept here:
- Files first, row second. A bundle or composed view folder is written completely (atomically,
  content-addressed) before the transaction that refers to it; if that transaction fails, folders
  this call created are removed again. So no row ever points at a missing folder, and a failed call
  leaves nothing half-registered.
- A bundle name and the views composed from it move together: changing a bundle (a new upload or a
  replaced head) recomposes its views first and then, in one transaction, points the bundle at the
  new version and each changed view at its new folder. A change that would break a view (it names a
  head the new version lacks) is refused before anything is written.
- Optimistic concurrency: that transaction re-checks that the bundle and its views are still what
  was composed against, and raises `Conflict` ("retry") otherwise.
- SQLite: WAL (readers never block the writer), foreign keys on, and writes open with
  `BEGIN IMMEDIATE` so two writers queue on the busy timeout instead of failing mid-transaction.
- PostgreSQL (several replicas): read-check-write paths lock the rows they re-check (`FOR UPDATE`),
  idempotent inserts are `ON CONFLICT DO NOTHING`, and `create_all` holds an advisory lock so
  replicas starting together do not race to create the tables.
- Every transaction that changes what a view serves bumps `registry_state.views_revision`; replicas
  poll that one number (`views_revision`) to learn that they must reload their views.
"""

from __future__ import annotations

import enum
import math
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Table, and_, bindparam, case, create_engine, delete, event, func, insert, inspect, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql import ColumnElement, Subquery

from ..core.bundle import AlterBundle, BundleError, load_bundle, validate_contents
from ..core.names import HEAD_NAME_PATTERN, is_valid_head_name
from ..core.safe_read import read_safetensors
from ..core.views import ADAPTER_WEIGHTS, ORIGINAL_VIEW, ComposedView, View, check_view_fits, compose
from . import experiments as exp
from . import files, garbage, keys, stats
from .errors import Conflict, InvalidInput, NotFound
from .experiments import Arm
from .models import (
    INT32_MAX,
    ApiKeyRow,
    Base,
    BundleRow,
    BundleVersionRow,
    ExperimentRow,
    FeedbackRow,
    ProbeResultRow,
    RegistryStateRow,
    RequestLogRow,
    TenantRow,
    ViewRow,
    experiment_tenants,
    grants,
    utcnow,
)
from .records import (
    ROLES,
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

_NAME_HELP = f"must match {HEAD_NAME_PATTERN} (lowercase letters, digits, '_' and '-'; at most 63 characters)"
_WRITE_OPTION = "alter_serve_write"
_SINGLE_READ_OPTION = "alter_serve_single_read"  # one SELECT: no BEGIN/ROLLBACK round trip (SQLite)
_GRANT_SEPARATOR = ","  # view names never contain it (see _check_name)
MAX_COMMENT_CHARS = 10_000
MAX_RESPONSE_ID_CHARS = 128
MAX_PROBE_METRICS = 64
MAX_PROBE_SOURCE_CHARS = 2000
_METRIC_NAME_RE = re.compile(r"[a-z][a-z0-9_./-]{0,63}\Z")
_CREATE_LOCK_ID = 0x616C7465  # PostgreSQL advisory lock key held while creating tables ("alte")


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

def _add_missing_columns(conn: Any) -> None:
    """Add the nullable columns a newer version defined to tables an older one created (e.g.
    `api_keys.expires_at`): `create_all` only creates missing tables. A new column that is NOT NULL
    would need a real migration, and is refused here rather than guessed."""
    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise RuntimeError(f"table {table.name} lacks NOT NULL column {column.name}: migrate the registry")
            ddl = column.type.compile(dialect=conn.dialect)
            conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN {column.name} {ddl}'))


def _check_expiry(expires_at: datetime | None) -> None:
    if expires_at is None:
        return
    if expires_at.tzinfo is None:
        raise InvalidInput(f"expires_at {expires_at.isoformat()} has no time zone; give one (e.g. ...Z for UTC)")
    if expires_at <= utcnow():
        raise InvalidInput(f"expires_at {expires_at.isoformat()} is not in the future")


def _check_name(kind: str, name: object) -> str:
    if not is_valid_head_name(name):  # the same pattern as head names: URL-, label- and filename-safe
        raise InvalidInput(f"{kind} name {name!r} {_NAME_HELP}")
    return name  # type: ignore[return-value]


def _make_engine(url: str) -> Engine:
    """An engine with SQLite tuned for a threaded server: WAL, foreign keys, immediate write locks."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)
    memory = parsed.database in (None, "", ":memory:")
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30.0}}
    if memory:
        kwargs["poolclass"] = StaticPool  # one shared connection; for tests, not for a threaded server
    else:
        Path(parsed.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module (its legacy mode starts transactions lazily and
        # never for SELECT) so that `_on_begin` decides how each transaction starts.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        if not memory:
            _enable_wal(cursor)
            cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe with WAL
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A write transaction takes the write lock up front: a deferred one that reads, then writes,
        # fails with SQLITE_BUSY if another writer committed in between (busy_timeout cannot help).
        options = conn.get_execution_options()
        if options.get(_SINGLE_READ_OPTION, False):
            return  # a single SELECT is its own consistent snapshot; SQLite runs it in autocommit
        conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get(_WRITE_OPTION, False) else "BEGIN")

    return engine


def _enable_wal(cursor: Any, timeout_s: float = 30.0) -> None:
    """PRAGMA journal_mode=WAL, retried while the file is locked. Switching a fresh file to WAL
    needs an exclusive lock, and SQLite may answer "database is locked" at once instead of calling
    the busy handler (it does so where waiting could deadlock), so replicas that open a new
    registry at the same moment would otherwise fail at start-up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Registry:
    """The registry. Construct, call `create_all()` once, then use from any thread.

    `base_fingerprint` / `base_shapes` (from `core.fingerprint`) bind stored bundles to the served
    base model: every bundle is validated against them on upload and on every recomposition. Leave
    them None only where no base model is at hand (offline tools, tests of the bookkeeping).
    """

    def __init__(
        self,
        url: str,
        data_dir: str | Path,
        *,
        base_fingerprint: str | None = None,
        base_shapes: Mapping[str, tuple[int, int]] | None = None,
        max_rank: int | None = None,
    ):
        self.url = url
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.base_fingerprint = base_fingerprint
        self.base_shapes = dict(base_shapes) if base_shapes is not None else None
        self.max_rank = max_rank  # the serving engine's max_lora_rank: a larger bundle could never load
        self.engine = _make_engine(url)
        self._read_sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(
            self.engine.execution_options(**{_WRITE_OPTION: True}), expire_on_commit=False
        )

    # ---- lifecycle ------------------------------------------------------------------------------

    def create_all(self) -> None:
        """Create missing tables and folders, and the built-in view "original" (the base model)."""
        # Replicas starting together: one creates the tables, the others wait and then find them.
        # SQLite: a write transaction from the start (a deferred one that inspects, then creates,
        # fails at once with "database is locked"); PostgreSQL: an advisory lock (its CREATE TABLE
        # is not race-free: a duplicate type or table error).
        with self.engine.execution_options(**{_WRITE_OPTION: True}).begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(_CREATE_LOCK_ID)))
            Base.metadata.create_all(conn)
            _add_missing_columns(conn)
        (self.data_dir / files.BUNDLES_DIR).mkdir(parents=True, exist_ok=True)
        (self.data_dir / files.VIEWS_DIR).mkdir(parents=True, exist_ok=True)
        (self.data_dir / files.UPLOADS_DIR).mkdir(parents=True, exist_ok=True)
        try:
            with self._writing("the built-in view 'original'") as s:
                if s.scalar(select(ViewRow.id).where(ViewRow.name == ORIGINAL_VIEW)) is None:
                    s.add(ViewRow(name=ORIGINAL_VIEW, bundle_id=None, spec={}))
                _insert_ignore(s, RegistryStateRow.__table__, {"id": 1, "views_revision": 0})
        except Conflict:
            pass  # another replica created it at the same moment

    def close(self) -> None:
        """Close pooled connections (tests, shutdown)."""
        self.engine.dispose()

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with self._read_sessions() as session, session.begin():
            yield session

    @contextmanager
    def _writing(self, subject: str) -> Iterator[Session]:
        """A write transaction; a constraint violation (a concurrent duplicate) becomes `Conflict`."""
        try:
            with self._write_sessions() as session, session.begin():
                yield session
        except IntegrityError as exc:
            raise Conflict(f"{subject}: clashes with a concurrent change ({exc.orig}); reload and retry") from exc
        except StaleDataError as exc:  # PostgreSQL: a row read here was deleted by another replica since
            raise Conflict(f"{subject}: changed concurrently ({exc}); reload and retry") from exc

    # ---- change marker for replicas -------------------------------------------------------------

    def views_revision(self) -> int:
        """A number that goes up whenever a view is defined, redefined, recomposed or removed (on any
        replica). Replicas poll it, one indexed single-row read, and reload their views on a change."""
        with self._reading() as s:
            return s.scalar(select(RegistryStateRow.views_revision).where(RegistryStateRow.id == 1)) or 0

    @staticmethod
    def _bump_views_revision(s: Session) -> None:
        # Taken last in its transaction (after any bundle/view row locks), so the row lock it holds
        # until commit never waits on anything: no lock-order cycle with other writers.
        bumped = s.execute(update(RegistryStateRow).where(RegistryStateRow.id == 1)
                           .values(views_revision=RegistryStateRow.views_revision + 1)).rowcount
        if not bumped:  # a database from before the table existed, not yet through create_all
            _insert_ignore(s, RegistryStateRow.__table__, {"id": 1, "views_revision": 1})

    def _abs(self, relative: str) -> Path:
        return self.data_dir / relative

    # ---- bundles --------------------------------------------------------------------------------

    def _validated(self, source: str | Path) -> AlterBundle:
        try:
            bundle = load_bundle(source, self.base_shapes, self.base_fingerprint)
        except BundleError as exc:
            raise InvalidInput(f"bundle at {source} is invalid; fix it and upload it again:", exc.problems) from exc
        if self.max_rank is not None and bundle.manifest.rank > self.max_rank:
            raise InvalidInput(f"bundle at {source} has rank {bundle.manifest.rank} but the server's engine serves "
                               f"LoRAs up to rank {self.max_rank}; restart it with a larger engine.max_lora_rank")
        return bundle

    def store_bundle(self, name: str, src_dir: str | Path, *, replace: bool = False) -> BundleUpdate:
        """Validate the bundle folder `src_dir` against the base model, store it content-addressed
        under `<data_dir>/bundles/<sha256>/` and register it as `name`.

        Nothing is written before validation passes, and a failure leaves no row and no folder.
        The validated in-memory bundle is what gets written (not a second read of `src_dir`), so the
        stored bytes are exactly the validated ones. With `replace=True` an existing name gets this
        upload as its new version and its views are recomposed (see `BundleUpdate.views`).
        """
        _check_name("bundle", name)
        bundle = self._validated(src_dir)
        with self._reading() as s:
            current = s.scalar(select(BundleRow.content_hash).where(BundleRow.name == name))
        if current is not None:
            if not replace:
                raise Conflict(
                    f"bundle {name!r} already exists (version {current[:12]}); pass replace=True to make this "
                    "upload its new version, or choose another name"
                )
            return self._apply_bundle(name, bundle, expect_hash=current)
        digest = bundle.content_hash()
        folder, created = files.write_bundle(bundle, self.data_dir / files.BUNDLES_DIR, digest)
        try:
            with self._writing(f"bundle {name!r}") as s:
                row = self._insert_bundle(s, name, bundle, digest)
                info = self._bundle_info(row)
        except BaseException:
            if created:
                self._discard_bundle_folder(digest)
            raise
        return BundleUpdate(info, None, ())

    def _insert_bundle(self, s: Session, name: str, bundle: AlterBundle, digest: str) -> BundleRow:
        manifest = bundle.manifest.model_dump(mode="json")
        path = f"{files.BUNDLES_DIR}/{digest}"
        row = BundleRow(
            name=name,
            content_hash=digest,
            path=path,
            base_fingerprint=bundle.manifest.base_model.fingerprint,
            manifest=manifest,
        )
        s.add(row)
        s.flush()
        s.add(BundleVersionRow(bundle_id=row.id, content_hash=digest, path=path, manifest=manifest))
        return row

    def get_bundle(self, name: str) -> BundleInfo:
        with self._reading() as s:
            return self._bundle_info(self._bundle_row(s, name))

    def list_bundles(self) -> list[BundleInfo]:
        with self._reading() as s:
            return [self._bundle_info(r) for r in s.scalars(select(BundleRow).order_by(BundleRow.name))]

    def open_bundle(self, name: str) -> AlterBundle:
        """The current version of bundle `name`, loaded and validated against the base model."""
        return self._validated(self.get_bundle(name).path)

    def list_bundle_versions(self, name: str) -> list[BundleVersion]:
        """Every version `name` has pointed at, newest first; the first is current."""
        with self._reading() as s:
            row = self._bundle_row(s, name)
            versions = s.scalars(
                select(BundleVersionRow).where(BundleVersionRow.bundle_id == row.id).order_by(BundleVersionRow.id.desc())
            )
            return [
                BundleVersion(name, v.content_hash, self._abs(v.path), v.created_at, v.superseded_at) for v in versions
            ]

    def drop_bundle_version(self, name: str, content_hash: str) -> None:
        """Forget an old (drained) version of `name` and delete its folder if nothing else uses it."""
        with self._writing(f"bundle {name!r}") as s:
            row = self._bundle_row(s, name)
            if row.content_hash == content_hash:
                raise Conflict(f"version {content_hash[:12]} is the current version of bundle {name!r}; "
                               "replace it before dropping it, or remove the bundle")
            gone = s.execute(
                delete(BundleVersionRow).where(
                    BundleVersionRow.bundle_id == row.id, BundleVersionRow.content_hash == content_hash
                )
            ).rowcount
            if not gone:
                raise NotFound(f"bundle {name!r} has no version {content_hash!r}; see list_bundle_versions")
        self._discard_bundle_folder(content_hash)

    def remove_bundle(self, name: str) -> None:
        """Delete bundle `name`, its history and its now unreferenced folders. Refused while views use it."""
        with self._writing(f"bundle {name!r}") as s:
            row = self._bundle_row(s, name)
            users = s.scalars(select(ViewRow.name).where(ViewRow.bundle_id == row.id).order_by(ViewRow.name)).all()
            if users:
                raise Conflict(f"bundle {name!r} is used by view(s) {list(users)}; remove those views first")
            hashes = set(s.scalars(select(BundleVersionRow.content_hash).where(BundleVersionRow.bundle_id == row.id)))
            hashes.add(row.content_hash)
            s.delete(row)
        for digest in hashes:
            self._discard_bundle_folder(digest)

    def replace_head(self, bundle_name: str, head: str, weights_safetensors_path: str | Path) -> BundleUpdate:
        """Swap one head's B matrices (the hot-swap). The file holds one `[out, rank]` tensor per
        adapted module, named `<module>` or as in the bundle (`<module>.B.retain`,
        `<module>.B.forget.<head>`). The result is a new bundle version (new content hash); every
        view of the bundle is recomposed, and `BundleUpdate.views` lists those whose weights changed
        (views that give the head weight 0 or do not name it keep their version)."""
        with self._reading() as s:
            row = self._bundle_row(s, bundle_name)
            current_hash, current_path = row.content_hash, self._abs(row.path)
        bundle = self._validated(current_path)
        heads = [bundle.manifest.heads.retain, *bundle.forget_heads]
        if head not in heads:
            raise NotFound(f"bundle {bundle_name!r} has no head {head!r}; its heads are {heads}. "
                           "Upload a new bundle version (store_bundle with replace=True) to add heads")
        weights = self._read_head_weights(Path(weights_safetensors_path), head, bundle.modules)
        updated = bundle.replace_head(head, weights)
        problems = validate_contents(updated, self.base_shapes, self.base_fingerprint)
        if problems:
            raise InvalidInput(f"new weights for head {head!r} of bundle {bundle_name!r} are invalid:", problems)
        return self._apply_bundle(bundle_name, updated, expect_hash=current_hash)

    @staticmethod
    def _read_head_weights(path: Path, head: str, modules: list[str]) -> dict[str, Any]:
        """`{module: B}` from a safetensors file (bounded, pickle-free read); every problem listed."""
        if not path.is_file():
            raise InvalidInput(f"head weights file {path} does not exist; upload a .safetensors file")
        problems: list[str] = []
        tensors = read_safetensors(path, problems)
        if tensors is None:
            raise InvalidInput(f"head weights file {path} could not be read:", problems)
        label = "B.retain" if head == "retain" else f"B.forget.{head}"
        weights = {}
        for key, tensor in sorted(tensors.items()):
            module = key[: -len(label) - 1] if key.endswith("." + label) else key
            if module not in modules:
                problems.append(f"tensor {key!r}: not an adapted module of this bundle (expected '<module>' or "
                                f"'<module>.{label}' for modules like {modules[:3]})")
            elif module in weights:
                problems.append(f"tensor {key!r}: module {module!r} given twice")
            else:
                weights[module] = tensor
        if problems:
            raise InvalidInput(f"head weights file {path} does not fit head {head!r}:", problems)
        return weights

    def _apply_bundle(self, name: str, bundle: AlterBundle, *, expect_hash: str) -> BundleUpdate:
        """Make `bundle` the content of bundle `name` (a new version when its hash differs from
        `expect_hash`) and recompose every view of it, atomically: files first, then one transaction
        that re-checks nothing moved since `expect_hash` was read."""
        digest = bundle.content_hash()
        with self._reading() as s:
            bundle_id = self._bundle_row(s, name).id
            specs = {v.name: v.spec for v in s.scalars(select(ViewRow).where(ViewRow.bundle_id == bundle_id))}
        problems = []
        for view_name, spec in sorted(specs.items()):
            try:
                check_view_fits(bundle, View(name=view_name, **spec))
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise InvalidInput(f"the new version of bundle {name!r} would break {len(problems)} view(s); "
                               "redefine or remove them first:", problems)
        created_bundle = False
        created_views: list[str] = []
        try:
            if digest != expect_hash:
                _, created_bundle = files.write_bundle(bundle, self.data_dir / files.BUNDLES_DIR, digest)
            composed = {}
            for view_name, spec in specs.items():
                composed[view_name], created = self._compose(bundle, View(name=view_name, **spec))
                if created:
                    created_views.append(composed[view_name].content_hash)
            with self._writing(f"bundle {name!r}") as s:
                row = self._bundle_row(s, name, lock=True)
                if row.content_hash != expect_hash:
                    raise Conflict(f"bundle {name!r} changed to version {row.content_hash[:12]} while this update was "
                                   "prepared; retry")
                now = utcnow()
                if digest != expect_hash:
                    self._advance_bundle(s, row, bundle, digest, now)
                changes = self._point_views(s, row, specs, composed, now)
                info = self._bundle_info(row)
        except BaseException:
            if created_bundle:
                self._discard_bundle_folder(digest)
            for view_hash in created_views:
                self._discard_view_folder(view_hash)
            raise
        return BundleUpdate(info, expect_hash, tuple(changes))

    def _advance_bundle(self, s: Session, row: BundleRow, bundle: AlterBundle, digest: str, now: Any) -> None:
        manifest = bundle.manifest.model_dump(mode="json")
        path = f"{files.BUNDLES_DIR}/{digest}"
        s.execute(
            BundleVersionRow.__table__.update()
            .where(BundleVersionRow.bundle_id == row.id, BundleVersionRow.superseded_at.is_(None))
            .values(superseded_at=now)
        )
        s.add(BundleVersionRow(bundle_id=row.id, content_hash=digest, path=path, manifest=manifest, created_at=now))
        row.content_hash, row.path, row.manifest, row.updated_at = digest, path, manifest, now
        row.base_fingerprint = bundle.manifest.base_model.fingerprint

    def _point_views(
        self, s: Session, bundle_row: BundleRow, specs: dict[str, dict], composed: dict[str, ComposedView], now: Any
    ) -> list[ViewChange]:
        rows = {v.name: v for v in s.scalars(select(ViewRow).where(ViewRow.bundle_id == bundle_row.id))}
        if {n: r.spec for n, r in rows.items()} != specs:
            raise Conflict(f"the views of bundle {bundle_row.name!r} changed while they were being recomposed; retry")
        changes = []
        for view_name in sorted(rows):
            row, new = rows[view_name], composed[view_name]
            if row.content_hash == new.content_hash:
                continue
            previous = self._composed_of(row)
            row.content_hash, row.path, row.updated_at = new.content_hash, f"{files.VIEWS_DIR}/{new.content_hash}", now
            changes.append(ViewChange(self._view_info(row, bundle_row.name), previous))
        if changes:
            self._bump_views_revision(s)
        return changes

    def recompose_views_for_bundle(self, bundle_name: str) -> list[ViewChange]:
        """Recompose every view of `bundle_name` from its current version; return the views whose
        composed LoRA changed (empty when all were up to date, e.g. after a repeated call)."""
        with self._reading() as s:
            row = self._bundle_row(s, bundle_name)
            current_hash, path = row.content_hash, self._abs(row.path)
        return list(self._apply_bundle(bundle_name, self._validated(path), expect_hash=current_hash).views)

    def _discard_bundle_folder(self, digest: str) -> None:
        """Remove `bundles/<digest>` unless a bundle or a kept version still refers to it."""
        with self._reading() as s:
            used = s.scalar(select(BundleRow.id).where(BundleRow.content_hash == digest).limit(1)) or s.scalar(
                select(BundleVersionRow.id).where(BundleVersionRow.content_hash == digest).limit(1)
            )
        if not used:
            files.remove_folder(self.data_dir / files.BUNDLES_DIR / digest)

    # ---- views ----------------------------------------------------------------------------------

    def _compose(self, bundle: AlterBundle, view: View) -> tuple[ComposedView, bool]:
        """Compose into the view store; also report whether this call created the folder."""
        root = self.data_dir / files.VIEWS_DIR
        before = files.stored_hashes(root)
        composed = compose(bundle, view, root)
        return composed, composed.content_hash not in before

    def _discard_view_folder(self, digest: str) -> None:
        with self._reading() as s:
            used = s.scalar(select(ViewRow.id).where(ViewRow.content_hash == digest).limit(1))
        if not used:
            files.remove_folder(self.data_dir / files.VIEWS_DIR / digest)

    def define_view(self, view: View, bundle_name: str | None, *, replace: bool = False) -> ViewChange:
        """Create view `view.name` on bundle `bundle_name` and compose it into `<data_dir>/views/`.

        With `replace=True` an existing view is redefined; `ViewChange.previous` is then its old
        composed folder (equal to the new one when the weights did not change). The built-in view
        "original" cannot be defined or redefined."""
        if view.is_original:
            raise InvalidInput("'original' is the built-in base-model view and cannot be (re)defined; choose another name")
        if bundle_name is None:
            raise InvalidInput(f"view {view.name!r} needs a bundle; only the built-in 'original' view has none")
        with self._reading() as s:
            brow = self._bundle_row(s, bundle_name)
            bundle_hash, bundle_path = brow.content_hash, self._abs(brow.path)
            if not replace and s.scalar(select(ViewRow.id).where(ViewRow.name == view.name)) is not None:
                raise Conflict(f"view {view.name!r} already exists; pass replace=True to redefine it, or choose another name")
        bundle = self._validated(bundle_path)
        try:
            check_view_fits(bundle, view)
        except ValueError as exc:
            raise InvalidInput(f"{exc}; define the view with heads of bundle {bundle_name!r}") from exc
        composed, created = self._compose(bundle, view)
        try:
            with self._writing(f"view {view.name!r}") as s:
                brow = self._bundle_row(s, bundle_name, lock=True)
                if brow.content_hash != bundle_hash:
                    raise Conflict(f"bundle {bundle_name!r} changed while view {view.name!r} was composed; retry")
                row = s.scalar(select(ViewRow).where(ViewRow.name == view.name))
                previous = None
                now = utcnow()
                if row is None:
                    row = ViewRow(name=view.name, created_at=now)
                    s.add(row)
                elif not replace:
                    raise Conflict(f"view {view.name!r} already exists; pass replace=True to redefine it")
                else:
                    previous = self._composed_of(row)
                row.bundle_id, row.spec = brow.id, view.spec_dict()
                row.content_hash, row.path = composed.content_hash, f"{files.VIEWS_DIR}/{composed.content_hash}"
                row.updated_at = now
                s.flush()
                self._bump_views_revision(s)
                info = self._view_info(row, bundle_name)
        except BaseException:
            if created:
                self._discard_view_folder(composed.content_hash)
            raise
        return ViewChange(info, previous)

    def get_view(self, name: str) -> ViewInfo:
        with self._reading() as s:
            row = s.execute(self._view_query().where(ViewRow.name == name)).first()
            if row is None:
                raise NotFound(f"view {name!r} not found; see list_views")
            return self._view_info(*row)

    def ensure_composed(self, name: str) -> ComposedView | None:
        """The composed LoRA folder of view `name` as the registry records it now, composed into this
        data directory first when the folder is missing there. A replica whose view store lacks a
        folder another replica composed (storage not shared, or pruned) recomposes it from the
        bundle: composition is deterministic, so it gets the same content hash. None for "original".
        """
        with self._reading() as s:
            found = s.execute(self._view_query().where(ViewRow.name == name)).first()
            if found is None:
                raise NotFound(f"view {name!r} not found; see list_views")
            row, bundle_name = found
            composed = self._composed_of(row)
            spec = View(name=row.name, **row.spec)
            bundle_path = None if row.bundle_id is None else self._abs(self._bundle_row(s, bundle_name).path)
        if composed is None or (composed.path / ADAPTER_WEIGHTS).is_file():
            return composed
        if bundle_path is None or not bundle_path.is_dir():
            raise NotFound(f"view {name!r}: neither its composed folder {composed.path} nor its bundle folder "
                           f"{bundle_path} is in this data directory; every replica must share data_dir's storage")
        rebuilt, _ = self._compose(self._validated(bundle_path), spec)
        if rebuilt.content_hash != composed.content_hash:
            raise Conflict(f"view {name!r} changed while its missing folder was recomposed; retry")
        return rebuilt

    def list_views(self) -> list[ViewInfo]:
        with self._reading() as s:
            return [self._view_info(*r) for r in s.execute(self._view_query().order_by(ViewRow.name))]

    def remove_view(self, name: str) -> ViewInfo:
        """Delete a view; returns it so the engine can unload its LoRA once drained. Refused for
        "original", for a view granted to a tenant and for a view an unstopped experiment serves.
        The composed folder stays until `prune_view_store` (requests may still be running on it)."""
        if name == ORIGINAL_VIEW:
            raise Conflict("'original' is the built-in base-model view and cannot be removed")
        with self._writing(f"view {name!r}") as s:
            found = s.execute(self._view_query().where(ViewRow.name == name)).first()
            if found is None:
                raise NotFound(f"view {name!r} not found; see list_views")
            row, bundle_name = found
            tenants = s.scalars(
                select(TenantRow.name).join(grants, grants.c.tenant_id == TenantRow.id)
                .where(grants.c.view_id == row.id).order_by(TenantRow.name)
            ).all()
            if tenants:
                raise Conflict(f"view {name!r} is granted to tenant(s) {list(tenants)}; revoke those grants first")
            users = [e.name for e in self._live_experiments(s) if any(a["view"] == name for a in e.arms)]
            if users:
                raise Conflict(f"view {name!r} is an arm of experiment(s) {sorted(users)}; stop or change them first")
            info = self._view_info(row, bundle_name)
            s.delete(row)
            s.flush()
            self._bump_views_revision(s)
        return info

    def prune_view_store(self, keep: Iterable[str] = ()) -> list[str]:
        """Delete composed folders no view points at, except the content hashes in `keep` (versions
        the engine still serves while they drain). Returns the deleted hashes."""
        root = self.data_dir / files.VIEWS_DIR
        with self._reading() as s:
            used = set(s.scalars(select(ViewRow.content_hash).where(ViewRow.content_hash.is_not(None))))
        removed = sorted(files.stored_hashes(root) - used - set(keep))
        for digest in removed:
            files.remove_folder(root / digest)
        return removed

    def collect_garbage(self, *, keep_views: Iterable[str] = (), grace_s: float = 3600,
                        retention_days: float | None = None, retention_rows: int | None = None,
                        dry_run: bool = False) -> garbage.GarbageReport:
        """Remove superseded bundle versions, unreferenced bundle and view folders (except the view
        hashes in `keep_views`), upload debris and request-log rows outside the retention; nothing
        younger than `grace_s` and nothing referenced. See `registry.garbage`."""
        return garbage.collect_garbage(self, keep_views=frozenset(keep_views), grace_s=grace_s,
                                       retention_days=retention_days, retention_rows=retention_rows, dry_run=dry_run)

    # ---- tenants and grants ---------------------------------------------------------------------

    def create_tenant(
        self, name: str, *, limits: Limits | None = None, views: Sequence[str] = (), default_view: str | None = None
    ) -> TenantInfo:
        """A new tenant granted `views`; `default_view`, if given, must be one of them."""
        _check_name("tenant", name)
        if default_view is not None and default_view not in views:
            raise InvalidInput(f"default view {default_view!r} of tenant {name!r} is not among its granted views "
                               f"{list(views)}; grant it too")
        limits = limits or Limits()
        with self._writing(f"tenant {name!r}") as s:
            if s.scalar(select(TenantRow.id).where(TenantRow.name == name)) is not None:
                raise Conflict(f"tenant {name!r} already exists; choose another name or update it")
            view_ids = self._view_ids(s, views)
            row = TenantRow(name=name, **limits.model_dump(), default_view_id=view_ids.get(default_view), disabled=False)
            s.add(row)
            s.flush()
            for view_id in view_ids.values():
                s.execute(insert(grants).values(tenant_id=row.id, view_id=view_id, created_at=utcnow()))
            return self._tenant_info(s, row)

    def get_tenant(self, name: str) -> TenantInfo:
        with self._reading() as s:
            return self._tenant_info(s, self._tenant_row(s, name))

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
            row = self._tenant_row(s, name, lock=True)
            view_ids = self._view_ids(s, [*grant, *new_default, *revoke])
            for view in grant:
                # Idempotent also when two replicas grant the same view at once (PostgreSQL does not
                # serialize writers the way SQLite's database lock does).
                _insert_ignore(s, grants, {"tenant_id": row.id, "view_id": view_ids[view], "created_at": utcnow()})
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
        serving = sorted(e.name for e in self._live_experiments(s, tenant_id=row.id)
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
            s.delete(self._tenant_row(s, name))

    # ---- API keys -------------------------------------------------------------------------------

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
            tenant_id = None if tenant is None else self._tenant_row(s, tenant).id
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
                query = query.where(ApiKeyRow.tenant_id == self._tenant_row(s, tenant).id)
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
        with self.engine.connect().execution_options(**{_SINGLE_READ_OPTION: True}) as conn:
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
        return None if row is None else _as_experiment_info(conn, row)

    # ---- experiments ----------------------------------------------------------------------------

    def create_experiment(
        self,
        name: str,
        *,
        alias: str,
        tenants: Sequence[str],
        arms: Sequence[Arm | Mapping[str, Any]],
        sticky: str = exp.STICKY_USER,
        control_arm: str | None = None,
        salt: str | None = None,
        status: str = exp.RUNNING,
    ) -> ExperimentInfo:
        """An A/B test: for `tenants`, model name `alias` is served by one of `arms`.
        `control_arm` defaults to the first arm; `salt` to a fresh random one. Unless it is created
        stopped, every arm's view must be granted to every tenant (see `_check_can_run`)."""
        _check_name("experiment", name)
        _check_name("experiment alias", alias)
        parsed = self._parse_arms(name, arms, control_arm)
        control_name = control_arm if control_arm is not None else parsed[0].name
        try:
            sticky = exp.normalize_sticky(sticky)
        except ValueError as exc:
            raise InvalidInput(f"experiment {name!r}: {exc}") from exc
        self._check_status(name, status)
        if not tenants:
            raise InvalidInput(f"experiment {name!r} needs at least one tenant")
        with self._writing(f"experiment {name!r}") as s:
            if s.scalar(select(ExperimentRow.id).where(ExperimentRow.name == name)) is not None:
                raise Conflict(f"experiment {name!r} already exists; choose another name or update it")
            self._view_ids(s, sorted({a.view for a in parsed}))
            tenant_ids = self._tenant_ids(s, tenants)
            row = ExperimentRow(name=name, alias=alias, arms=[a.model_dump() for a in parsed], sticky=sticky,
                                salt=salt if salt is not None else exp.new_salt(), status=status, control_arm=control_name)
            if status != exp.STOPPED:
                self._check_can_run(s, row, tenant_ids)
            s.add(row)
            s.flush()
            self._add_tenants(s, row, tenant_ids)
            return _as_experiment_info(s, row)

    def update_experiment(
        self,
        name: str,
        *,
        arms: Sequence[Arm | Mapping[str, Any]] | None = None,
        control_arm: str | None = None,
        tenants: Sequence[str] | None = None,
        status: str | None = None,
    ) -> ExperimentInfo:
        """Change arms (weights), control arm, tenants or status; None leaves a field as it is.
        The salt never changes, so users stay put except those a weight change must move. The
        result, unless stopped, must be able to run as `create_experiment` requires: this is checked
        on every change (new arms, new tenants, or a stopped experiment started again)."""
        with self._writing(f"experiment {name!r}") as s:
            row = self._experiment_row(s, name)
            if arms is not None or control_arm is not None:
                new_arms = arms if arms is not None else row.arms
                control_name = control_arm if control_arm is not None else row.control_arm
                parsed = self._parse_arms(name, new_arms, control_name)
                self._view_ids(s, sorted({a.view for a in parsed}))
                row.arms, row.control_arm = [a.model_dump() for a in parsed], control_name
            if status is not None:
                self._check_status(name, status)
                row.status = status
            if tenants is not None:
                if not tenants:
                    raise InvalidInput(f"experiment {name!r} needs at least one tenant")
                tenant_ids = self._tenant_ids(s, tenants)
                s.execute(delete(experiment_tenants).where(experiment_tenants.c.experiment_id == row.id))
                self._add_tenants(s, row, tenant_ids)
            else:
                tenant_ids = list(s.scalars(select(experiment_tenants.c.tenant_id).where(experiment_tenants.c.experiment_id == row.id)))
            if row.status != exp.STOPPED:
                self._view_ids(s, sorted({a["view"] for a in row.arms}))  # its views may be gone since it stopped
                self._check_can_run(s, row, tenant_ids)
            row.updated_at = utcnow()
            s.flush()
            return _as_experiment_info(s, row)

    def get_experiment(self, name: str) -> ExperimentInfo:
        with self._reading() as s:
            return _as_experiment_info(s, self._experiment_row(s, name))

    def list_experiments(self, *, tenant: str | None = None, status: str | None = None) -> list[ExperimentInfo]:
        with self._reading() as s:
            query = select(ExperimentRow).order_by(ExperimentRow.name)
            if tenant is not None:
                tenant_id = self._tenant_row(s, tenant).id
                query = query.join(experiment_tenants, experiment_tenants.c.experiment_id == ExperimentRow.id).where(
                    experiment_tenants.c.tenant_id == tenant_id
                )
            if status is not None:
                query = query.where(ExperimentRow.status == status)
            return [_as_experiment_info(s, r) for r in s.scalars(query)]

    def delete_experiment(self, name: str) -> None:
        """Delete an experiment. Its request log and feedback rows stay (history, keyed by name); a
        later experiment of the same name does not count them (see `experiment_results`)."""
        with self._writing(f"experiment {name!r}") as s:
            s.delete(self._experiment_row(s, name))

    @staticmethod
    def choose_arm(experiment: ExperimentInfo, sticky_value: str | None) -> Arm:
        """The arm for one request (stable hash of salt and sticky value; see `experiments`)."""
        return exp.choose_arm(experiment, sticky_value)

    def _parse_arms(self, name: str, arms: Sequence[Arm | Mapping[str, Any]], control_arm: str | None) -> list[Arm]:
        problems, parsed = [], []
        for index, arm in enumerate(arms):
            try:
                parsed.append(arm if isinstance(arm, Arm) else Arm.model_validate(arm))
            except ValidationError as err:
                problems += [f"arm {index}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        if not problems:
            problems = exp.arm_problems(parsed, control_arm)
        if problems:
            raise InvalidInput(f"experiment {name!r} has invalid arms:", problems)
        return parsed

    @staticmethod
    def _check_status(name: str, status: str) -> None:
        if status not in exp.STATUSES:
            raise InvalidInput(f"experiment {name!r}: status {status!r} must be one of {list(exp.STATUSES)}")

    def _tenant_ids(self, s: Session, names: Sequence[str]) -> list[int]:
        """The ids of tenants `names` (each once, in order); NotFound for a missing one."""
        return [self._tenant_row(s, name).id for name in dict.fromkeys(names)]

    @staticmethod
    def _add_tenants(s: Session, row: ExperimentRow, tenant_ids: Iterable[int]) -> None:
        for tenant_id in tenant_ids:
            s.execute(insert(experiment_tenants).values(experiment_id=row.id, tenant_id=tenant_id))

    def _check_can_run(self, s: Session, row: ExperimentRow, tenant_ids: Sequence[int]) -> None:
        """What an unstopped experiment needs: its alias free for each of its tenants, and each arm's
        view granted to each of them (the alias must not serve a view the tenant may not name)."""
        self._check_alias_free(s, row, tenant_ids)
        self._check_arms_granted(s, row, tenant_ids)

    @staticmethod
    def _check_arms_granted(s: Session, row: ExperimentRow, tenant_ids: Sequence[int]) -> None:
        # The tenant rows are locked (PostgreSQL) as a grant change locks them (`update_tenant`), so a
        # revoke cannot slip in between this check and the commit.
        tenants = dict(s.execute(select(TenantRow.id, TenantRow.name).where(TenantRow.id.in_(tenant_ids))
                                 .order_by(TenantRow.id).with_for_update()).all())
        views = sorted({a["view"] for a in row.arms})
        granted = set(s.execute(
            select(grants.c.tenant_id, ViewRow.name).join(ViewRow, ViewRow.id == grants.c.view_id)
            .where(grants.c.tenant_id.in_(tenant_ids), ViewRow.name.in_(views))
        ).all())
        missing = [f"tenant {tenants[t]!r} is not granted view {v!r}"
                   for t in sorted(tenants, key=tenants.__getitem__) for v in views if (t, v) not in granted]
        if missing:
            raise InvalidInput(f"experiment {row.name!r} would serve its tenants views they are not granted; grant "
                               "them first (or leave the experiment stopped):", missing)

    def _check_alias_free(self, s: Session, row: ExperimentRow, tenant_ids: Iterable[int]) -> None:
        """One unstopped experiment per (tenant, alias): otherwise a request could match two."""
        clash = s.execute(
            select(ExperimentRow.name, TenantRow.name)
            .join(experiment_tenants, experiment_tenants.c.experiment_id == ExperimentRow.id)
            .join(TenantRow, TenantRow.id == experiment_tenants.c.tenant_id)
            .where(ExperimentRow.alias == row.alias, ExperimentRow.status != exp.STOPPED,
                   TenantRow.id.in_(list(tenant_ids)), ExperimentRow.name != row.name)
        ).first()
        if clash is not None:
            raise Conflict(f"experiment {clash[0]!r} already takes over model name {row.alias!r} for tenant "
                           f"{clash[1]!r}; stop it first")

    @staticmethod
    def _live_experiments(s: Session, *, tenant_id: int | None = None) -> list[ExperimentRow]:
        """The unstopped experiments (of one tenant, if given)."""
        query = select(ExperimentRow).where(ExperimentRow.status != exp.STOPPED)
        if tenant_id is not None:
            query = query.join(experiment_tenants, experiment_tenants.c.experiment_id == ExperimentRow.id).where(
                experiment_tenants.c.tenant_id == tenant_id)
        return list(s.scalars(query))

    # ---- feedback, request log, results ---------------------------------------------------------

    def record_feedback(self, tenant: str, response_id: str, rating: float, *, comment: str | None = None,
                        require_logged: bool = False) -> FeedbackInfo:
        """Store `tenant`'s rating of one response. Rating a response again replaces its rating (one
        response is one sample; a race that leaves two rows is settled when counting: the newest
        wins). A response the request log has for another tenant is not found (a tenant cannot rate,
        or learn of, another tenant's responses); one it has not (yet) is stored all the same and
        counts once it is logged, because statistics attribute ratings through the request log when
        they are computed (see `FeedbackInfo`) — unless `require_logged` (the API's choice: a rating
        of an id nobody was served is refused, so a client cannot fill the table with made-up ids)."""
        if not isinstance(response_id, str) or not 0 < len(response_id) <= MAX_RESPONSE_ID_CHARS:
            raise InvalidInput(f"response id must be 1 to {MAX_RESPONSE_ID_CHARS} characters")
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
            raise InvalidInput(f"rating {rating!r} of response {response_id!r} must be a finite number")
        if comment is not None and len(comment) > MAX_COMMENT_CHARS:
            raise InvalidInput(f"comment on response {response_id!r} is {len(comment)} characters; the limit is {MAX_COMMENT_CHARS}")
        log, fb = RequestLogRow, FeedbackRow
        with self._writing(f"feedback on response {response_id!r}") as s:
            logged = s.execute(select(log.tenant, log.experiment, log.arm, log.view)
                               .where(log.response_id == response_id).limit(1)).first()
            if (logged is None and require_logged) or (logged is not None and logged.tenant != tenant):
                raise NotFound(f"response {response_id!r} not found for tenant {tenant!r}")
            row = s.scalar(select(fb).where(fb.tenant == tenant, fb.response_id == response_id)
                           .order_by(fb.id.desc()).limit(1).with_for_update())
            if row is None:
                row = FeedbackRow(response_id=response_id, tenant=tenant)
                s.add(row)
            row.rating, row.comment, row.created_at = float(rating), comment, utcnow()
            s.flush()
            info = self._feedback_info(row, logged)
            # What the log says now, for the record; statistics and listings join the log again.
            row.experiment, row.arm, row.view = info.experiment, info.arm, info.view
            return info

    def list_feedback(self, *, experiment: str | None = None, tenant: str | None = None, limit: int = 1000) -> list[FeedbackInfo]:
        """Feedback, newest first, optionally for one experiment and/or tenant, each attributed
        through the request log as it is now."""
        log, fb = RequestLogRow, FeedbackRow
        with self._reading() as s:
            query = (select(fb, log.id.label("log_id"), log.experiment, log.arm, log.view)
                     .outerjoin(log, and_(log.tenant == fb.tenant, log.response_id == fb.response_id))
                     .order_by(fb.id.desc()).limit(limit))
            if experiment is not None:
                query = query.where(log.experiment == experiment)
            if tenant is not None:
                query = query.where(fb.tenant == tenant)
            return [self._feedback_info(r.FeedbackRow, r if r.log_id is not None else None) for r in s.execute(query)]

    def log_requests(self, rows: Iterable[RequestLogEntry | Mapping[str, Any]]) -> int:
        """Append a batch of request records in one transaction and one executemany. Blocking: the
        server calls it from a worker thread with the batch it has buffered. Returns the count."""
        now = utcnow()
        values = []
        for index, row in enumerate(rows):
            try:
                entry = row if isinstance(row, RequestLogEntry) else RequestLogEntry(**row)
            except TypeError as exc:
                raise InvalidInput(f"request log entry {index}: {exc}; use the fields of RequestLogEntry") from exc
            record = asdict(entry)
            record["created_at"] = record["created_at"] or now
            values.append(record)
        if not values:
            return 0
        with self._writing("request log") as s:
            s.execute(insert(RequestLogRow.__table__), values)  # a list of params: DBAPI executemany
        return len(values)

    @staticmethod
    def _samples_of(row: ExperimentRow) -> tuple[ColumnElement[bool], ...]:
        """Which request-log rows are samples of experiment `row`: logged under its name, on an arm
        (paused traffic is logged without one: it was not randomized, see `experiments`), and not
        older than the experiment (the log keys experiments by name, so an earlier experiment of the
        same name, deleted since, left rows under it too)."""
        log = RequestLogRow
        return log.experiment == row.name, log.arm.is_not(None), log.created_at >= row.created_at

    def _ratings_of(self, row: ExperimentRow) -> Subquery:
        """`(id, arm, rating)` of each rated sample of experiment `row`. A rating is attributed here,
        by joining it to its response's request-log row (same tenant and response id), so it counts
        whichever replica served the response and whenever that replica wrote its log; and only the
        newest rating of each (tenant, response) counts, so one response is one sample for the
        t-test however often it was rated."""
        log, fb = RequestLogRow, FeedbackRow
        samples = select(log.tenant, log.response_id, log.arm).where(*self._samples_of(row)).distinct().subquery()
        same_response = and_(fb.tenant == samples.c.tenant, fb.response_id == samples.c.response_id)
        newest = select(func.max(fb.id)).select_from(fb).join(samples, same_response).group_by(fb.tenant, fb.response_id)
        return (select(fb.id, samples.c.arm, fb.rating).select_from(fb).join(samples, same_response)
                .where(fb.id.in_(newest)).subquery())

    def experiment_results(self, name: str) -> list[ArmResult]:
        """Per-arm totals of an experiment from the request log and feedback (the rows of
        `_samples_of` and `_ratings_of`); the current arms first (in their order), then any arm that
        only appears in the logs (it was removed later)."""
        log = RequestLogRow
        with self._reading() as s:
            row = self._experiment_row(s, name)
            arms = [Arm.model_validate(a) for a in row.arms]
            requests = {
                r.arm: r
                for r in s.execute(
                    select(
                        log.arm,
                        func.count().label("requests"),
                        func.sum(case((log.status_code >= 400, 1), else_=0)).label("errors"),
                        func.avg(log.latency_ms).label("latency"),
                        func.avg(log.ttft_ms).label("ttft"),
                        func.coalesce(func.sum(log.prompt_tokens), 0).label("prompt"),
                        func.coalesce(func.sum(log.completion_tokens), 0).label("completion"),
                    ).where(*self._samples_of(row)).group_by(log.arm)
                )
            }
            rated = self._ratings_of(row)
            ratings = {
                r.arm: r
                for r in s.execute(
                    select(rated.c.arm, func.count().label("n"), func.avg(rated.c.rating).label("mean"))
                    .group_by(rated.c.arm)
                )
            }
        views = {a.name: a.view for a in arms}
        order = [a.name for a in arms] + sorted((set(requests) | set(ratings)) - set(views))
        results = []
        for arm in order:
            req, rat = requests.get(arm), ratings.get(arm)
            results.append(ArmResult(
                arm=arm,
                view=views.get(arm),
                requests=int(req.requests) if req else 0,
                errors=int(req.errors or 0) if req else 0,
                mean_latency_ms=float(req.latency) if req and req.latency is not None else None,
                mean_ttft_ms=float(req.ttft) if req and req.ttft is not None else None,
                prompt_tokens=int(req.prompt) if req else 0,
                completion_tokens=int(req.completion) if req else 0,
                feedback_count=int(rat.n) if rat else 0,
                mean_rating=float(rat.mean) if rat and rat.mean is not None else None,
            ))
        return results

    # ---- statistics report and offline probes ---------------------------------------------------

    MAX_STAT_SAMPLES = 100_000  # newest latencies / ratings per arm that percentiles and tests use

    def experiment_samples(self, name: str) -> list[ArmSamples]:
        """Per-arm raw observations of experiment `name` (see `ArmSamples`), in the order of
        `experiment_results`: exact totals, plus the newest `MAX_STAT_SAMPLES` latencies, times to
        first token and ratings of each arm."""
        totals = self.experiment_results(name)
        with self._reading() as s:
            row = self._experiment_row(s, name)
            weights = {a.name: a.weight for a in map(Arm.model_validate, row.arms)}
            rated = self._ratings_of(row)
            samples = []
            for total in totals:
                latency, ttft = self._arm_timings(s, row, total.arm)
                ratings = tuple(s.scalars(select(rated.c.rating).where(rated.c.arm == total.arm)
                                          .order_by(rated.c.id.desc()).limit(self.MAX_STAT_SAMPLES)))
                samples.append(ArmSamples(
                    arm=total.arm, view=total.view, weight=weights.get(total.arm), requests=total.requests,
                    errors=total.errors, prompt_tokens=total.prompt_tokens, completion_tokens=total.completion_tokens,
                    feedback_count=total.feedback_count, latency_ms=latency, ttft_ms=ttft, ratings=ratings))
        return samples

    def _arm_timings(self, s: Session, row: ExperimentRow, arm: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        rows = s.execute(
            select(RequestLogRow.latency_ms, RequestLogRow.ttft_ms)
            .where(*self._samples_of(row), RequestLogRow.arm == arm)
            .order_by(RequestLogRow.id.desc()).limit(self.MAX_STAT_SAMPLES)
        ).all()
        return tuple(r.latency_ms for r in rows), tuple(r.ttft_ms for r in rows if r.ttft_ms is not None)

    def experiment_report(self, name: str, *, confidence: float = stats.DEFAULT_CONFIDENCE) -> stats.ExperimentReport:
        """Per-arm statistics of experiment `name` — requests, errors (rate with interval), latency
        and TTFT percentiles, tokens, feedback mean with interval, the latest offline probe — and each
        arm's significance tests against the control arm. See `registry.stats` for the methods."""
        experiment = self.get_experiment(name)
        samples = self.experiment_samples(name)
        views = {v.name: v.content_hash for v in self.list_views()}
        try:
            return stats.experiment_report(experiment, samples, self.list_probe_results(name), views, confidence)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc

    def record_probe_results(self, experiment: str, results: Sequence[Mapping[str, Any]], *,
                             source: str | None = None) -> list[ProbeResult]:
        """Store one probe run: per arm `{"arm", "view", "view_version"?, "metrics", "samples"?}`.
        Each arm must be a current arm of the experiment and `view` the view it serves now (a probe
        of a view the arm no longer serves is refused); metrics are finite numbers or None."""
        if source is not None and len(source) > MAX_PROBE_SOURCE_CHARS:
            raise InvalidInput(f"probe source is {len(source)} characters; the limit is {MAX_PROBE_SOURCE_CHARS}")
        if not results:
            raise InvalidInput(f"probe of experiment {experiment!r} has no results; send one entry per arm")
        with self._writing(f"probe results of experiment {experiment!r}") as s:
            row = self._experiment_row(s, experiment)
            views = {a.name: a.view for a in map(Arm.model_validate, row.arms)}
            rows = [self._probe_row(row.id, views, index, r, source) for index, r in enumerate(results)]
            s.add_all(rows)
            s.flush()
            return [self._probe_info(experiment, r) for r in rows]

    @staticmethod
    def _probe_row(experiment_id: int, views: Mapping[str, str], index: int, result: Mapping[str, Any],
                   source: str | None) -> ProbeResultRow:
        arm, view = result.get("arm"), result.get("view")
        if arm not in views:
            raise InvalidInput(f"probe result {index}: arm {arm!r} is not an arm of the experiment; its arms are {sorted(views)}")
        if view != views[arm]:
            raise InvalidInput(f"probe result {index}: arm {arm!r} serves view {views[arm]!r} now, not {view!r}; probe again")
        samples = result.get("samples", 0)
        if isinstance(samples, bool) or not isinstance(samples, int) or not 0 <= samples <= INT32_MAX:
            raise InvalidInput(f"probe result {index}: samples {samples!r} must be an integer from 0 to {INT32_MAX}")
        version = result.get("view_version")
        if version is not None and (not isinstance(version, str) or len(version) > 64):
            raise InvalidInput(f"probe result {index}: view_version must be a content hash (at most 64 characters)")
        return ProbeResultRow(experiment_id=experiment_id, arm=arm, view=view, view_version=version,
                              metrics=_probe_metrics(index, result.get("metrics")), samples=samples, source=source)

    def list_probe_results(self, experiment: str, *, limit: int = 1000) -> list[ProbeResult]:
        """Probe results of `experiment`, newest first."""
        with self._reading() as s:
            row = self._experiment_row(s, experiment)
            rows = s.scalars(select(ProbeResultRow).where(ProbeResultRow.experiment_id == row.id)
                             .order_by(ProbeResultRow.id.desc()).limit(limit))
            return [self._probe_info(experiment, r) for r in rows]

    @staticmethod
    def _probe_info(experiment: str, row: ProbeResultRow) -> ProbeResult:
        return ProbeResult(row.id, experiment, row.arm, row.view, row.view_version, dict(row.metrics), row.samples,
                           row.source, row.created_at)

    # ---- row lookups and conversions ------------------------------------------------------------

    @staticmethod
    def _bundle_row(s: Session, name: str, *, lock: bool = False) -> BundleRow:
        """The row of bundle `name`; `lock` takes a row lock (PostgreSQL) for a read-check-write
        (SQLite ignores it: its write transactions already hold the database lock)."""
        query = select(BundleRow).where(BundleRow.name == name)
        row = s.scalar(query.with_for_update() if lock else query)
        if row is None:
            raise NotFound(f"bundle {name!r} not found; store it first (see list_bundles)")
        return row

    @staticmethod
    def _tenant_row(s: Session, name: str, *, lock: bool = False) -> TenantRow:
        """The row of tenant `name`; `lock` as in `_bundle_row`. Changes of a tenant's grants lock it,
        and so does an experiment check of its grants, so the two never interleave (PostgreSQL)."""
        query = select(TenantRow).where(TenantRow.name == name)
        row = s.scalar(query.with_for_update() if lock else query)
        if row is None:
            raise NotFound(f"tenant {name!r} not found; see list_tenants")
        return row

    @staticmethod
    def _experiment_row(s: Session, name: str) -> ExperimentRow:
        row = s.scalar(select(ExperimentRow).where(ExperimentRow.name == name))
        if row is None:
            raise NotFound(f"experiment {name!r} not found; see list_experiments")
        return row

    @staticmethod
    def _view_ids(s: Session, names: Iterable[str]) -> dict[str, int]:
        """`{name: id}` for views that must all exist; a NotFound names every missing one."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}
        found = {n: i for n, i in s.execute(select(ViewRow.name, ViewRow.id).where(ViewRow.name.in_(wanted)))}
        missing = [n for n in wanted if n not in found]
        if missing:
            raise NotFound(f"view(s) {missing} not found; define them first (see list_views)")
        return {n: found[n] for n in wanted}

    @staticmethod
    def _view_query():
        return select(ViewRow, BundleRow.name).outerjoin(BundleRow, ViewRow.bundle_id == BundleRow.id)

    def _composed_of(self, row: ViewRow) -> ComposedView | None:
        if row.content_hash is None:
            return None
        return ComposedView(row.name, row.content_hash, self._abs(row.path))

    def _bundle_info(self, row: BundleRow) -> BundleInfo:
        return BundleInfo(row.name, row.content_hash, self._abs(row.path), row.base_fingerprint, dict(row.manifest),
                          row.created_at, row.updated_at)

    def _view_info(self, row: ViewRow, bundle_name: str | None) -> ViewInfo:
        return ViewInfo(
            name=row.name,
            bundle=bundle_name,
            spec=View(name=row.name, **row.spec),
            content_hash=row.content_hash,
            path=None if row.path is None else self._abs(row.path),
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

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
        tenant = None if row.tenant_id is None else s.scalar(select(TenantRow.name).where(TenantRow.id == row.tenant_id))
        return KeyInfo(row.id, tenant, row.role, row.prefix, row.created_at, row.revoked_at, row.expires_at)

    @staticmethod
    def _feedback_info(row: FeedbackRow, logged: Any | None) -> FeedbackInfo:
        """A rating with the attribution of `logged` (its response's request-log row, or None)."""
        experiment, arm, view = (logged.experiment, logged.arm, logged.view) if logged is not None else (None,) * 3
        return FeedbackInfo(row.id, row.response_id, row.tenant, experiment, arm, view, row.rating, row.comment,
                            row.created_at, logged is not None)


def _as_experiment_info(executor: Any, row: Any) -> ExperimentInfo:
    """ExperimentInfo of an experiment row (an ORM row or a Core row: same column names), with its
    tenants read through `executor` (a Session or a Connection)."""
    tenants = executor.execute(
        select(TenantRow.name).join(experiment_tenants, experiment_tenants.c.tenant_id == TenantRow.id)
        .where(experiment_tenants.c.experiment_id == row.id).order_by(TenantRow.name)
    ).scalars().all()
    return ExperimentInfo(row.id, row.name, row.alias, tuple(tenants), tuple(Arm.model_validate(a) for a in row.arms),
                          row.sticky, row.salt, row.status, row.control_arm, row.created_at, row.updated_at)


def _probe_metrics(index: int, metrics: Any) -> dict[str, float | None]:
    """Check a probe's `{metric name: finite number or None}` mapping; return it with floats."""
    if not isinstance(metrics, Mapping) or not metrics:
        raise InvalidInput(f"probe result {index}: metrics must be a non-empty object of metric name → number")
    if len(metrics) > MAX_PROBE_METRICS:
        raise InvalidInput(f"probe result {index}: {len(metrics)} metrics; the limit is {MAX_PROBE_METRICS}")
    problems, clean = [], {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not _METRIC_NAME_RE.match(key):
            problems.append(f"metric name {key!r} must match {_METRIC_NAME_RE.pattern}")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                    or not math.isfinite(value)):
            problems.append(f"metric {key!r} = {value!r} must be a finite number or null")
        else:
            clean[key] = None if value is None else float(value)
    if problems:
        raise InvalidInput(f"probe result {index} has invalid metrics:", problems)
    return clean


def _insert_ignore(s: Session, table: Table, values: Mapping[str, Any]) -> None:
    """INSERT that does nothing when the row exists (a unique or primary key clash), race-free on
    both backends: `ON CONFLICT DO NOTHING` (SQLite 3.24+, PostgreSQL 9.5+)."""
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        s.execute(postgresql.insert(table).values(**values).on_conflict_do_nothing())
    elif dialect == "sqlite":
        s.execute(sqlite.insert(table).values(**values).on_conflict_do_nothing())
    else:  # another backend: check, then insert (a concurrent duplicate becomes Conflict)
        key = [c == values[c.name] for c in table.primary_key.columns]
        if s.scalar(select(func.count()).select_from(table).where(*key)) == 0:
            s.execute(insert(table).values(**values))
