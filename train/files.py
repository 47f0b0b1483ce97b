"""Results on disk that a reader never sees half-written: JSON files and whole folders.

A JSON file is written to a temporary file in the same folder and renamed over the target
(atomic on one file system). A folder (a model, an imported checkpoint) is built in a scratch
folder beside its target and renamed into place when complete, so a crash leaves no partial
cache entry; `exclusive_lock` makes concurrent builders of one entry wait for the first.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_json(path: Path, payload: Any, *, strict: bool = False) -> Path:
    """Write `payload` as indented JSON, atomically; return `path`.

    Paths are written as strings and tensor or NumPy scalars as numbers (`jsonable`). `strict`
    refuses NaN and infinity, for reports where one is a bug upstream that should fail here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, default=jsonable, allow_nan=not strict) + "\n"
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def jsonable(value: Any) -> Any:
    """`json.dumps(default=...)`: a Path as its string, a tensor or NumPy scalar as its number."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def publish_folder(scratch: Path, target: Path) -> None:
    """Move a finished build into place as `target`, readable by other users (servers,
    containers); an incomplete folder left at `target` by an earlier crash is replaced."""
    # mkdtemp and safetensors create private files.
    for path in [scratch, *scratch.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)


@contextmanager
def building_folder(target: Path, prefix: str) -> Iterator[Path]:
    """A scratch folder beside `target` to build in: published as `target` (`publish_folder`)
    when the block ends normally, removed when it raises."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield scratch
        publish_folder(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if missing) for the block."""
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
