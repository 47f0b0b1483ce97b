"""The registry's database and sessions: one SQLAlchemy engine, short sessions, schema creation, and
the change marker that replicas poll. `Database` is the base every part of `Registry` builds on.

One engine (SQLite by default; any SQLAlchemy URL, e.g. PostgreSQL when several replicas share one
database) plus a data directory holding the content-addressed file store (`files.py`). Every
public method of the registry opens its own short session through `_reading` / `_writing` and
returns frozen records (`records.py`), so callers never hold a session.

- SQLite: WAL (readers never block the writer), foreign keys on, and writes open with
  `BEGIN IMMEDIATE` so two writers queue on the busy timeout instead of failing mid-transaction.
- PostgreSQL (several replicas): read-check-write paths lock the rows they re-check (`FOR UPDATE`),
  idempotent inserts are `ON CONFLICT DO NOTHING` (`insert_ignore`), and `create_all` holds an
  advisory lock so replicas starting together do not race to create the tables.
- Every transaction that changes what a view serves bumps `registry_state.views_revision`
  (`_bump_views_revision`); replicas poll that one number (`views_revision`) to learn that they
  must reload their views.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Table, create_engine, event, func, insert, inspect, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.pool import StaticPool

from ..core.views import ORIGINAL_VIEW
from . import files
from .errors import Conflict
from .models import Base, RegistryStateRow, ViewRow

_WRITE_OPTION = "alter_serve_write"
SINGLE_READ_OPTION = "alter_serve_single_read"  # one SELECT: no BEGIN/ROLLBACK round trip (SQLite)
_CREATE_LOCK_ID = 0x616C7465  # PostgreSQL advisory lock key held while creating tables ("alte")


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


def make_engine(url: str) -> Engine:
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
        if options.get(SINGLE_READ_OPTION, False):
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


def insert_ignore(s: Session, table: Table, values: Mapping[str, Any]) -> None:
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


class Database:
    """The state every part of the registry shares: the engine and its sessions, the data
    directory, and the served base model that stored bundles are bound to.

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
        self.engine = make_engine(url)
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
                insert_ignore(s, RegistryStateRow.__table__, {"id": 1, "views_revision": 0})
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
            insert_ignore(s, RegistryStateRow.__table__, {"id": 1, "views_revision": 1})

    def _abs(self, relative: str) -> Path:
        return self.data_dir / relative
