"""Device, precision, threads and resource accounting shared by the training loops.

The same code runs on CPU and CUDA. On CUDA the frozen base weights are bf16 and the forward
runs under bf16 autocast (adapters keep fp32 master weights); on CPU everything is fp32, because
CPU bf16 autocast is slower than fp32 on most hosts and the tests compare numbers in fp32.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device is {name!r} but CUDA is not available; use 'auto' or 'cpu'")
    return device


def weight_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "float32":
        return torch.float32
    if setting == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> random.Random:
    random.seed(seed)
    torch.manual_seed(seed)
    return random.Random(seed)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Use `count` intra-op threads (capped at the cores we may run on) inside the block."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(count, len(os.sched_getaffinity(0)))))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak allocated bytes since the last reset. CPU: the process's peak RSS (ever)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PhaseMeter:
    """Wall time and token throughput of one training phase."""

    name: str
    device: torch.device
    tokens: int = 0
    steps: int = 0
    wall_s: float = 0.0
    _start: float | None = field(default=None, repr=False)

    def __enter__(self) -> PhaseMeter:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.wall_s += time.perf_counter() - (self._start or time.perf_counter())

    def summary(self) -> dict:
        return {"steps": self.steps, "tokens": self.tokens, "wall_s": round(self.wall_s, 3),
                "tokens_per_s": round(self.tokens / self.wall_s, 1) if self.wall_s > 0 else None}


def count_trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
