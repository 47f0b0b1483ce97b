"""The bundle half of the catalog: bundles stored content-addressed (`<data_dir>/bundles/<sha256>/`,
`files.write_bundle`), their versions, head hot-swaps, and the views they carry along.

Consistency rules:
- Files first, row second. A bundle folder is written completely (atomically, fsynced) before the
  transaction that refers to it; if that transaction fails, folders this call created are removed
  again. So no row ever points at a missing folder, and a failed call leaves nothing half-registered.
- A bundle name and the views composed from it move together: changing a bundle (a new upload or a
  replaced head) recomposes its views first (`view_catalog`) and then, in one transaction, points
  the bundle at the new version and each changed view at its new folder. A change that would break
  a view (it names a head the new version lacks) is refused before anything is written.
- Optimistic concurrency: that transaction re-checks that the bundle and its views are still what
  was composed against, and raises `Conflict` ("retry") otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from ..core.bundle import AlterBundle, validate_contents
from ..core.names import head_label
from ..core.safe_read import read_safetensors
from ..core.views import View, check_view_fits
from . import files, garbage, rows
from .errors import Conflict, InvalidInput, NotFound
from .models import BundleRow, BundleVersionRow, ViewRow, utcnow
from .records import BundleInfo, BundleUpdate, BundleVersion, ViewChange
from .view_catalog import ViewCatalog


class BundleCatalog(ViewCatalog):
    """Bundles and their versions; a bundle change recomposes its views (see the module docstring)."""

    def store_bundle(self, name: str, src_dir: str | Path, *, replace: bool = False) -> BundleUpdate:
        """Validate the bundle folder `src_dir` against the base model, store it content-addressed
        under `<data_dir>/bundles/<sha256>/` and register it as `name`.

        Nothing is written before validation passes, and a failure leaves no row and no folder.
        The validated in-memory bundle is what gets written (not a second read of `src_dir`), so the
        stored bytes are exactly the validated ones. With `replace=True` an existing name gets this
        upload as its new version and its views are recomposed (see `BundleUpdate.views`).
        """
        rows.check_name("bundle", name)
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
            return self._bundle_info(rows.bundle_row(s, name))

    def list_bundles(self) -> list[BundleInfo]:
        with self._reading() as s:
            return [self._bundle_info(r) for r in s.scalars(select(BundleRow).order_by(BundleRow.name))]

    def open_bundle(self, name: str) -> AlterBundle:
        """The current version of bundle `name`, loaded and validated against the base model."""
        return self._validated(self.get_bundle(name).path)

    def list_bundle_versions(self, name: str) -> list[BundleVersion]:
        """Every version `name` has pointed at, newest first; the first is current."""
        with self._reading() as s:
            row = rows.bundle_row(s, name)
            versions = s.scalars(
                select(BundleVersionRow).where(BundleVersionRow.bundle_id == row.id)
                .order_by(BundleVersionRow.id.desc())
            )
            return [
                BundleVersion(name, v.content_hash, self._abs(v.path), v.created_at, v.superseded_at) for v in versions
            ]

    def drop_bundle_version(self, name: str, content_hash: str) -> None:
        """Forget an old (drained) version of `name` and delete its folder if nothing else uses it."""
        with self._writing(f"bundle {name!r}") as s:
            row = rows.bundle_row(s, name)
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
            row = rows.bundle_row(s, name)
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
            row = rows.bundle_row(s, bundle_name)
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
        label = head_label(head)
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
            bundle_id = rows.bundle_row(s, name).id
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
                row = rows.bundle_row(s, name, lock=True)
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

    def recompose_views_for_bundle(self, bundle_name: str) -> list[ViewChange]:
        """Recompose every view of `bundle_name` from its current version; return the views whose
        composed LoRA changed (empty when all were up to date, e.g. after a repeated call)."""
        with self._reading() as s:
            row = rows.bundle_row(s, bundle_name)
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

    def collect_garbage(self, *, keep_views: Iterable[str] = (), grace_s: float = 3600,
                        retention_days: float | None = None, retention_rows: int | None = None,
                        dry_run: bool = False) -> garbage.GarbageReport:
        """Remove superseded bundle versions, unreferenced bundle and view folders (except the view
        hashes in `keep_views`), upload debris and request-log rows outside the retention; nothing
        younger than `grace_s` and nothing referenced. See `registry.garbage`."""
        return garbage.collect_garbage(self, keep_views=frozenset(keep_views), grace_s=grace_s,
                                       retention_days=retention_days, retention_rows=retention_rows, dry_run=dry_run)

    def _bundle_info(self, row: BundleRow) -> BundleInfo:
        return BundleInfo(row.name, row.content_hash, self._abs(row.path), row.base_fingerprint, dict(row.manifest),
                          row.created_at, row.updated_at)
