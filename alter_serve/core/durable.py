"""Durable folder writes: flush what was written to disk before a rename publishes it.

The stores (`registry.files`, `views.compose`) write a folder under a staging name and publish it
with one `os.replace`. A rename is atomic but not durable by itself: after a power loss the
renamed folder could be there with empty or missing files, and vLLM would load half a LoRA, or
the registry row that names it would outlive its bytes. So every file and the staging folder are
fsynced before the rename (`fsync_tree`), and the parent folder after it (`fsync_path`), which
makes the new directory entry durable.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush one file or folder (for a folder: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file of `folder` (not recursive: the stores write flat folders) and the folder."""
    for child in folder.iterdir():
        if child.is_file():
            fsync_path(child)
    fsync_path(folder)
