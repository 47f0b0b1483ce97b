"""Safe reading of files a client sent: bounded, link-refusing, pickle-free.

A file is opened once without following a symbolic link and read from the opened descriptor up to
a size limit, so nothing can swap it between a check and the read, point it elsewhere on the
server, or make us read without end. Weights are parsed by safetensors only, after its header
length was bounded. Every failure is added to a `problems` list, never raised.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from .names import WEIGHTS_FILE

# Size limits, checked before anything is parsed. A safetensors header is JSON describing tensors;
# ours are small. The weights limit is far above a 70B model's rank-64 bundle with a few heads.
MAX_HEADER_BYTES = 16 << 20
MAX_WEIGHTS_BYTES = 8 << 30


def read_regular_file(path: Path, limit: int, problems: list[str]) -> bytes | None:
    """The bytes of regular file `path`, read once from the opened file (no stat-then-read gap) and
    at most `limit` bytes. A symbolic link is refused, not followed: an admin registers a folder,
    and a link in it could point anywhere on the server (or at /dev/zero)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    name = path.name
    if not hasattr(os, "O_NOFOLLOW") and path.is_symlink():
        problems.append(f"{name}: is a symbolic link; copy the file into the bundle folder")
        return None
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: opening a FIFO must not hang; regular files ignore it
    except FileNotFoundError:
        hint = " (only safetensors weights are accepted)" if name == WEIGHTS_FILE else ""
        problems.append(f"{name}: missing{hint}")
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            problems.append(f"{name}: is a symbolic link; copy the file into the bundle folder")
        else:
            problems.append(f"{name}: cannot be opened ({exc.strerror})")
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"{name}: not a regular file")
            return None
        if info.st_size > limit:
            problems.append(f"{name}: {info.st_size} bytes, larger than the {limit}-byte limit")
            return None
        data = handle.read(info.st_size + 1)
    if len(data) != info.st_size:
        problems.append(f"{name}: changed while it was read; upload it again")
        return None
    return data


def read_safetensors(path: Path, problems: list[str]) -> dict[str, torch.Tensor] | None:
    """Bounded, pickle-free read of a safetensors file (a regular file, not a link). Adds to
    `problems` and returns None on failure. Tensor names and values are the caller's to check."""
    data = read_regular_file(Path(path), MAX_WEIGHTS_BYTES, problems)
    return _parse_safetensors(data, Path(path).name, problems) if data is not None else None


def _parse_safetensors(data: bytes, name: str, problems: list[str]) -> dict[str, torch.Tensor] | None:
    """Pickle-free parse of safetensors bytes, header bounded first. None (and problems) on failure."""
    if len(data) < 8:
        problems.append(f"{name}: truncated ({len(data)} bytes), not a safetensors file")
        return None
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        problems.append(f"{name}: not a valid safetensors file (its header length {header_len} exceeds the "
                        f"{MAX_HEADER_BYTES}-byte limit); only safetensors weights are accepted")
        return None
    if 8 + header_len > len(data):
        problems.append(f"{name}: not a valid safetensors file (header says {header_len} bytes but the file "
                        f"has {len(data)}); truncated or another format")
        return None
    try:
        return load_safetensors(data)
    except Exception as exc:  # safetensors raises several types for corrupt input
        problems.append(f"{name}: not a valid safetensors file ({type(exc).__name__}: {exc})")
        return None
