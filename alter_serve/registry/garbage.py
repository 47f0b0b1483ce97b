"""Garbage collection of the data directory and the request log (`alter-serve gc`, `POST /admin/gc`).

What goes:
- superseded bundle versions: a bundle's history entries other than its current version, with
  their folders (views are composed from a bundle's current version only, so nothing serves from an
  older one; `BundleVersion` rows of the current version stay);
- bundle folders that no bundle and no version names (left by a crash between writing a folder and
  registering it, or by a failed clean-up);
- composed view folders that no view points at, except the content hashes in `keep_views` (versions
  the engine still serves while their requests drain). Experiments name views, not folders, so a
  folder a view of a live experiment uses is kept by that view;
- upload debris: everything under `<data_dir>/uploads/`, the `.staging-*` / `.compose-*` folders of
  interrupted writes in the stores, and temp folders older servers left in `data_dir` itself;
- request-log rows older than `retention_days`, and all but the newest `retention_rows`.

What never goes: anything a row refers to, and anything younger than `grace_s`. The stores write a
folder *before* the transaction that registers it (`files.py`), and uploads stream into `uploads/`
while they run, so a folder unreferenced a moment ago may be referenced by the time it is removed;
the grace keeps those alone. Folders are listed first and the rows read after, and a store that
reuses an existing folder touches it (a fresh mtime), so a folder registered after the rows were
read is younger than the grace. Each folder's age is looked at again right before it is removed.

`dry_run` reports what would go and changes nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, or_, select

from . import files
from .models import BundleRow, BundleVersionRow, RequestLogRow, ViewRow, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .database import Database

# Temp folders the admin API made directly in data_dir before uploads had their own folder.
_LEGACY_UPLOAD_PREFIXES = ("upload-", "head-")
_STORE_DEBRIS_PREFIXES = (files.STAGING_PREFIX, ".compose-")


@dataclass(frozen=True, slots=True)
class GarbageReport:
    """What a collection removed (or, with `dry_run`, would remove)."""

    dry_run: bool
    bundle_versions: tuple[str, ...]  # "name@content_hash" of superseded versions dropped
    bundle_folders: tuple[str, ...]  # content hashes under bundles/
    view_folders: tuple[str, ...]  # content hashes under views/
    debris: tuple[str, ...]  # paths relative to data_dir
    request_log_rows: int


def collect_garbage(registry: Database, *, keep_views: set[str] | frozenset[str] = frozenset(), grace_s: float = 3600,
                    retention_days: float | None = None, retention_rows: int | None = None,
                    dry_run: bool = False) -> GarbageReport:
    """Remove what nothing refers to (see the module docstring); return what went."""
    data = registry.data_dir
    cutoff = time.time() - grace_s
    bundles_root, views_root = data / files.BUNDLES_DIR, data / files.VIEWS_DIR
    # Files first, rows second: see the module docstring.
    old_bundles = {p.name: p for p in _old_entries(bundles_root, cutoff) if not p.name.startswith(".")}
    old_views = {p.name: p for p in _old_entries(views_root, cutoff) if not p.name.startswith(".")}
    debris = _debris(data, cutoff)
    transaction = registry._reading() if dry_run else registry._writing("garbage collection")
    with transaction as s:
        dropped = _drop_superseded_versions(s, utcnow() - timedelta(seconds=grace_s), dry_run)
        dropped_ids = {row_id for row_id, _, _ in dropped}
        used_bundles = set(s.scalars(select(BundleRow.content_hash)))
        used_bundles |= {h for i, h in s.execute(select(BundleVersionRow.id, BundleVersionRow.content_hash))
                         if i not in dropped_ids}
        used_views = set(s.scalars(select(ViewRow.content_hash).where(ViewRow.content_hash.is_not(None))))
        log_rows = _trim_request_log(s, retention_days, retention_rows, dry_run)
    # A dropped version's folder may be younger than the grace (the version was superseded later).
    dropped_folders = {h: bundles_root / h for _, _, h in dropped if h not in used_bundles}
    bundle_folders = {**{h: p for h, p in old_bundles.items() if h not in used_bundles}, **dropped_folders}
    view_folders = {h: p for h, p in old_views.items() if h not in used_views and h not in keep_views}
    if not dry_run:
        bundle_folders = {h: p for h, p in bundle_folders.items() if h in dropped_folders or _remove(p, cutoff)}
        for digest in dropped_folders:
            files.remove_folder(bundles_root / digest)
        view_folders = {h: p for h, p in view_folders.items() if _remove(p, cutoff)}
        debris = [p for p in debris if _remove(p, cutoff)]
    return GarbageReport(
        dry_run=dry_run,
        bundle_versions=tuple(sorted(f"{name}@{digest}" for _, name, digest in dropped)),
        bundle_folders=tuple(sorted(bundle_folders)),
        view_folders=tuple(sorted(view_folders)),
        debris=tuple(sorted(str(p.relative_to(data)) for p in debris)),
        request_log_rows=log_rows,
    )


def _old_entries(root: Path, cutoff: float) -> list[Path]:
    """Entries of `root` last modified before `cutoff` (a missing root has none)."""
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if _mtime(p) < cutoff]


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return float("inf")  # gone already: never "old"


def _debris(data: Path, cutoff: float) -> list[Path]:
    found = _old_entries(data / files.UPLOADS_DIR, cutoff)
    for root in (data / files.BUNDLES_DIR, data / files.VIEWS_DIR):
        found += [p for p in _old_entries(root, cutoff) if p.name.startswith(_STORE_DEBRIS_PREFIXES)]
    found += [p for p in _old_entries(data, cutoff) if p.is_dir() and p.name.startswith(_LEGACY_UPLOAD_PREFIXES)]
    return found


def _remove(path: Path, cutoff: float) -> bool:
    """Delete `path` if it is still older than `cutoff`; whether it went."""
    if _mtime(path) >= cutoff:
        return False
    if path.is_dir() and not path.is_symlink():
        files.remove_folder(path)
    else:
        path.unlink(missing_ok=True)
    return not os.path.lexists(path)


def _drop_superseded_versions(s: Session, superseded_before, dry_run: bool) -> list[tuple[int, str, str]]:
    """(row id, bundle name, content hash) of the versions superseded before `superseded_before`,
    deleted unless `dry_run`."""
    rows = s.execute(
        select(BundleVersionRow.id, BundleRow.name, BundleVersionRow.content_hash)
        .join(BundleRow, BundleRow.id == BundleVersionRow.bundle_id)
        .where(BundleVersionRow.superseded_at.is_not(None), BundleVersionRow.superseded_at < superseded_before,
               BundleVersionRow.content_hash != BundleRow.content_hash)
    ).all()
    dropped = [(row_id, name, digest) for row_id, name, digest in rows]
    if dropped and not dry_run:
        s.execute(delete(BundleVersionRow).where(BundleVersionRow.id.in_([d[0] for d in dropped])))
    return dropped


def _trim_request_log(s: Session, retention_days: float | None, retention_rows: int | None, dry_run: bool) -> int:
    """Delete (or, `dry_run`, count) the request-log rows outside the retention; how many."""
    conditions = []
    if retention_days is not None:
        conditions.append(RequestLogRow.created_at < utcnow() - timedelta(days=retention_days))
    if retention_rows is not None:
        # The id of the oldest row kept; ids grow with insertion, so older rows have smaller ones.
        oldest_kept = s.scalar(select(RequestLogRow.id).order_by(RequestLogRow.id.desc())
                               .offset(retention_rows - 1).limit(1))
        if oldest_kept is not None:
            conditions.append(RequestLogRow.id < oldest_kept)
    if not conditions:
        return 0
    outside = or_(*conditions)
    if dry_run:
        return s.scalar(select(func.count()).select_from(RequestLogRow).where(outside)) or 0
    return s.execute(delete(RequestLogRow).where(outside)).rowcount or 0
