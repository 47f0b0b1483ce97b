"""The content-addressed file store under the data directory.

    <data_dir>/bundles/<sha256>/   manifest.json + weights.safetensors   (AlterBundle.content_hash)
    <data_dir>/views/<sha256>/     adapter_config.json + adapter_model.safetensors   (views.compose)
    <data_dir>/uploads/            uploads while they stream in (removed when done; `gc` takes leftovers)

A folder appears in one `os.replace` of a fully written and fsynced staging folder (bundles here,
composed views in `views.compose`; `core.durable`), and its parent is fsynced after, so a reader
never sees half a bundle and a crash leaves at most a `.staging-*` or `.compose-*` folder (ignored, never referenced).
Identical content lands in the same folder, so writing it twice is a no-op (bar a touch: a reused
folder gets a fresh mtime, so `gc`, which spares young unreferenced folders, does not take it before
its row is written).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..core.bundle import AlterBundle
from ..core.durable import fsync_path, fsync_tree
from ..core.names import MANIFEST_FILE, WEIGHTS_FILE

BUNDLES_DIR = "bundles"
VIEWS_DIR = "views"
UPLOADS_DIR = "uploads"
STAGING_PREFIX = ".staging-"


def bundle_complete(folder: Path) -> bool:
    return (folder / MANIFEST_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def write_bundle(bundle: AlterBundle, root: Path, digest: str) -> tuple[Path, bool]:
    """Write `bundle` to `root/<digest>` atomically. Returns (folder, created): created is False when
    the same content was already stored (by us earlier, or by a concurrent writer)."""
    final = root / digest
    if bundle_complete(final):
        touch(final)
        return final, False
    root.mkdir(parents=True, exist_ok=True)
    if final.exists() and not bundle_complete(final):
        # Folders written here appear whole (one rename) and a whole folder never becomes partial,
        # so a partial one is debris from outside; checked again just now so a folder that a
        # concurrent writer completed in the meantime is never the one removed.
        shutil.rmtree(final)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    try:
        bundle.save(staging)
        fsync_tree(staging)  # the DB row never outlives its files
        try:
            os.replace(staging, final)
        except OSError:
            if bundle_complete(final):  # a concurrent writer stored the same content first
                return final, False
            raise
        fsync_path(root)
        return final, True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def touch(folder: Path) -> None:
    """Mark a reused folder as in use now (see the module docstring); one that vanished is fine."""
    try:
        os.utime(folder)
    except FileNotFoundError:
        pass


def remove_folder(folder: Path) -> None:
    """Delete a store folder; a missing one is fine (idempotent clean-up)."""
    shutil.rmtree(folder, ignore_errors=True)


def stored_hashes(root: Path) -> set[str]:
    """Names of the finished content folders under `root` (staging folders excluded)."""
    if not root.is_dir():
        return set()
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
