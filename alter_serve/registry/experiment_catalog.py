"""The experiment catalog: A/B experiments created, changed, listed and deleted, and the rules an
unstopped experiment must meet. How a request is assigned an arm is `experiments.py`.

An unstopped (running or paused) experiment needs its alias free for each of its tenants (one
unstopped experiment per tenant and model name, so a request never matches two) and every arm's
view granted to every tenant (an alias never serves a view its tenant could not name directly).
Both are checked on every change that could break them: creation, new arms, new tenants, and a
stopped experiment started again; the tenants' rows are locked meanwhile (PostgreSQL) as a grant
change locks them, so a revoke cannot slip in between.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from . import experiments as exp
from . import rows
from .database import Database
from .errors import Conflict, InvalidInput
from .experiments import Arm
from .models import ExperimentRow, TenantRow, ViewRow, experiment_tenants, grants, utcnow
from .records import ExperimentInfo


class ExperimentCatalog(Database):
    """A/B experiments (see the module docstring)."""

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
        rows.check_name("experiment", name)
        rows.check_name("experiment alias", alias)
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
            rows.view_ids(s, sorted({a.view for a in parsed}))
            tenant_ids = self._tenant_ids(s, tenants)
            row = ExperimentRow(name=name, alias=alias, arms=[a.model_dump() for a in parsed], sticky=sticky,
                                salt=salt if salt is not None else exp.new_salt(), status=status,
                                control_arm=control_name)
            if status != exp.STOPPED:
                self._check_can_run(s, row, tenant_ids)
            s.add(row)
            s.flush()
            self._add_tenants(s, row, tenant_ids)
            return rows.experiment_info(s, row)

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
            row = rows.experiment_row(s, name)
            if arms is not None or control_arm is not None:
                new_arms = arms if arms is not None else row.arms
                control_name = control_arm if control_arm is not None else row.control_arm
                parsed = self._parse_arms(name, new_arms, control_name)
                rows.view_ids(s, sorted({a.view for a in parsed}))
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
                tenant_ids = list(s.scalars(select(experiment_tenants.c.tenant_id)
                                            .where(experiment_tenants.c.experiment_id == row.id)))
            if row.status != exp.STOPPED:
                rows.view_ids(s, sorted({a["view"] for a in row.arms}))  # its views may be gone since it stopped
                self._check_can_run(s, row, tenant_ids)
            row.updated_at = utcnow()
            s.flush()
            return rows.experiment_info(s, row)

    def get_experiment(self, name: str) -> ExperimentInfo:
        with self._reading() as s:
            return rows.experiment_info(s, rows.experiment_row(s, name))

    def list_experiments(self, *, tenant: str | None = None, status: str | None = None) -> list[ExperimentInfo]:
        with self._reading() as s:
            query = select(ExperimentRow).order_by(ExperimentRow.name)
            if tenant is not None:
                tenant_id = rows.tenant_row(s, tenant).id
                query = query.join(experiment_tenants, experiment_tenants.c.experiment_id == ExperimentRow.id).where(
                    experiment_tenants.c.tenant_id == tenant_id
                )
            if status is not None:
                query = query.where(ExperimentRow.status == status)
            return [rows.experiment_info(s, r) for r in s.scalars(query)]

    def delete_experiment(self, name: str) -> None:
        """Delete an experiment. Its request log and feedback rows stay (history, keyed by name); a
        later experiment of the same name does not count them (see `experiment_results`)."""
        with self._writing(f"experiment {name!r}") as s:
            s.delete(rows.experiment_row(s, name))

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
        return [rows.tenant_row(s, name).id for name in dict.fromkeys(names)]

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
