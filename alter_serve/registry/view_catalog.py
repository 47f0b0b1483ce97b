"""The view half of the catalog: views defined on bundles, composed into the content-addressed view
store (`<data_dir>/views/<sha256>/`, `core.views.compose`), read, and removed.

Files first, row second: a view's folder is composed completely (atomically, fsynced) before the
transaction that points the view at it; if that transaction fails, a folder this call created is
removed again. So no row points at a missing folder. A view is composed from its bundle's current
version, validated against the served base model (`_validated`); the transaction re-checks that
the bundle did not move meanwhile and raises `Conflict` ("retry") if it did. Every transaction that
changes what a view serves bumps the views revision that replicas poll (`Database`).

`bundle_catalog.BundleCatalog` builds on this: a changed bundle recomposes its views here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..core.bundle import AlterBundle, BundleError, load_bundle
from ..core.views import ADAPTER_WEIGHTS, ORIGINAL_VIEW, ComposedView, View, check_view_fits, compose
from . import files, rows
from .database import Database
from .errors import Conflict, InvalidInput, NotFound
from .models import BundleRow, TenantRow, ViewRow, grants, utcnow
from .records import ViewChange, ViewInfo


class ViewCatalog(Database):
    """Views: define, read, remove, and keep their composed folders (see the module docstring)."""

    def _validated(self, source: str | Path) -> AlterBundle:
        """The bundle folder `source`, loaded and validated against the served base model and the
        engine's largest LoRA rank; `InvalidInput` listing every problem otherwise."""
        try:
            bundle = load_bundle(source, self.base_shapes, self.base_fingerprint)
        except BundleError as exc:
            raise InvalidInput(f"bundle at {source} is invalid; fix it and upload it again:", exc.problems) from exc
        if self.max_rank is not None and bundle.manifest.rank > self.max_rank:
            raise InvalidInput(f"bundle at {source} has rank {bundle.manifest.rank} but the server's engine serves "
                               f"LoRAs up to rank {self.max_rank}; restart it with a larger engine.max_lora_rank")
        return bundle

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
            raise InvalidInput("'original' is the built-in base-model view and cannot be (re)defined; "
                               "choose another name")
        if bundle_name is None:
            raise InvalidInput(f"view {view.name!r} needs a bundle; only the built-in 'original' view has none")
        with self._reading() as s:
            brow = rows.bundle_row(s, bundle_name)
            bundle_hash, bundle_path = brow.content_hash, self._abs(brow.path)
            if not replace and s.scalar(select(ViewRow.id).where(ViewRow.name == view.name)) is not None:
                raise Conflict(f"view {view.name!r} already exists; pass replace=True to redefine it, "
                               "or choose another name")
        bundle = self._validated(bundle_path)
        try:
            check_view_fits(bundle, view)
        except ValueError as exc:
            raise InvalidInput(f"{exc}; define the view with heads of bundle {bundle_name!r}") from exc
        composed, created = self._compose(bundle, view)
        try:
            with self._writing(f"view {view.name!r}") as s:
                brow = rows.bundle_row(s, bundle_name, lock=True)
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
            bundle_path = None if row.bundle_id is None else self._abs(rows.bundle_row(s, bundle_name).path)
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
            users = [e.name for e in rows.live_experiments(s) if any(a["view"] == name for a in e.arms)]
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

    def _point_views(
        self, s: Session, bundle_row: BundleRow, specs: dict[str, dict], composed: dict[str, ComposedView], now: Any
    ) -> list[ViewChange]:
        """Point each view of `bundle_row` at its newly composed folder, in the caller's transaction;
        `Conflict` when its views changed since `specs` was read. Returns the views that changed."""
        current = {v.name: v for v in s.scalars(select(ViewRow).where(ViewRow.bundle_id == bundle_row.id))}
        if {n: r.spec for n, r in current.items()} != specs:
            raise Conflict(f"the views of bundle {bundle_row.name!r} changed while they were being recomposed; retry")
        changes = []
        for view_name in sorted(current):
            row, new = current[view_name], composed[view_name]
            if row.content_hash == new.content_hash:
                continue
            previous = self._composed_of(row)
            row.content_hash, row.path, row.updated_at = new.content_hash, f"{files.VIEWS_DIR}/{new.content_hash}", now
            changes.append(ViewChange(self._view_info(row, bundle_row.name), previous))
        if changes:
            self._bump_views_revision(s)
        return changes

    @staticmethod
    def _view_query():
        return select(ViewRow, BundleRow.name).outerjoin(BundleRow, ViewRow.bundle_id == BundleRow.id)

    def _composed_of(self, row: ViewRow) -> ComposedView | None:
        if row.content_hash is None:
            return None
        return ComposedView(row.name, row.content_hash, self._abs(row.path))

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
