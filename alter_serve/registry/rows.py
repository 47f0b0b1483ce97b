"""Row lookups that several parts of the registry share, and the rule every name they look up follows.

Functions of an open session (or, for `experiment_info`, a Core connection). The parts (`catalog`,
`access`, `experiment_catalog`, `history`) import this module and never each other, so their
imports stay a tree. A missing row raises `NotFound` saying where to look; `lock=True` takes a
row lock (PostgreSQL) for a read-check-write, which SQLite ignores: its write transactions already
hold the database lock.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..core.names import HEAD_NAME_PATTERN, is_valid_head_name
from . import experiments as exp
from .errors import InvalidInput, NotFound
from .experiments import Arm
from .models import BundleRow, ExperimentRow, TenantRow, ViewRow, experiment_tenants
from .records import ExperimentInfo

NAME_HELP = f"must match {HEAD_NAME_PATTERN} (lowercase letters, digits, '_' and '-'; at most 63 characters)"


def check_name(kind: str, name: object) -> str:
    """`name` when it may name a bundle, view, tenant or experiment; `InvalidInput` otherwise."""
    if not is_valid_head_name(name):  # the same pattern as head names: URL-, label- and filename-safe
        raise InvalidInput(f"{kind} name {name!r} {NAME_HELP}")
    return name  # type: ignore[return-value]


def bundle_row(s: Session, name: str, *, lock: bool = False) -> BundleRow:
    query = select(BundleRow).where(BundleRow.name == name)
    row = s.scalar(query.with_for_update() if lock else query)
    if row is None:
        raise NotFound(f"bundle {name!r} not found; store it first (see list_bundles)")
    return row


def tenant_row(s: Session, name: str, *, lock: bool = False) -> TenantRow:
    """Changes of a tenant's grants lock its row, and so does an experiment check of its grants, so
    the two never interleave (PostgreSQL)."""
    query = select(TenantRow).where(TenantRow.name == name)
    row = s.scalar(query.with_for_update() if lock else query)
    if row is None:
        raise NotFound(f"tenant {name!r} not found; see list_tenants")
    return row


def experiment_row(s: Session, name: str) -> ExperimentRow:
    row = s.scalar(select(ExperimentRow).where(ExperimentRow.name == name))
    if row is None:
        raise NotFound(f"experiment {name!r} not found; see list_experiments")
    return row


def view_ids(s: Session, names: Iterable[str]) -> dict[str, int]:
    """`{name: id}` for views that must all exist; a NotFound names every missing one."""
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return {}
    found = {n: i for n, i in s.execute(select(ViewRow.name, ViewRow.id).where(ViewRow.name.in_(wanted)))}
    missing = [n for n in wanted if n not in found]
    if missing:
        raise NotFound(f"view(s) {missing} not found; define them first (see list_views)")
    return {n: found[n] for n in wanted}


def live_experiments(s: Session, *, tenant_id: int | None = None) -> list[ExperimentRow]:
    """The unstopped experiments (of one tenant, if given)."""
    query = select(ExperimentRow).where(ExperimentRow.status != exp.STOPPED)
    if tenant_id is not None:
        query = query.join(experiment_tenants, experiment_tenants.c.experiment_id == ExperimentRow.id).where(
            experiment_tenants.c.tenant_id == tenant_id)
    return list(s.scalars(query))


def experiment_info(executor: Any, row: Any) -> ExperimentInfo:
    """ExperimentInfo of an experiment row (an ORM row or a Core row: same column names), with its
    tenants read through `executor` (a Session or a Connection)."""
    tenants = executor.execute(
        select(TenantRow.name).join(experiment_tenants, experiment_tenants.c.tenant_id == TenantRow.id)
        .where(experiment_tenants.c.experiment_id == row.id).order_by(TenantRow.name)
    ).scalars().all()
    return ExperimentInfo(row.id, row.name, row.alias, tuple(tenants), tuple(Arm.model_validate(a) for a in row.arms),
                          row.sticky, row.salt, row.status, row.control_arm, row.created_at, row.updated_at)
