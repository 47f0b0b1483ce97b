"""Device, precision, threads and resource accounting shared by the training loops.

The same code runs on CPU and CUDA. On CUDA the frozen base weights are bf16 and the forward
runs under bf16 autocast (adapters keep fp32 master weights); on CPU everything is fp32, because
CPU bf16 autocast is slower than fp32 on most hosts and the tests compare numbers in fp32.

Peak memory is measured per phase: `reset_peak_memory` at the phase start, `peak_memory_bytes` at
its end. CUDA: `torch.cuda.max_memory_allocated` (tensors allocated by PyTorch). CPU: the
process's resident-set high-water mark (VmHWM), which Linux resets when "5" is written to
/proc/self/clear_refs. Two limits on CPU: the RSS counts memory the allocator freed but kept
(an earlier phase can raise a later phase's floor), and where the reset is not possible
(non-Linux, a locked-down /proc) the peak is the process's peak since it started —
`peak_memory_scope` says which of the three a report holds.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

# The devices this package supports (autocast, peak memory and placement are written for these two).
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


def check_device_name(name: str) -> str:
    """`name` if it is a supported device setting (DEVICE_PATTERN), else ValueError."""
    if not re.match(DEVICE_PATTERN, name):
        raise ValueError(f"runtime.device {name!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return name


def resolve_device(name: str) -> torch.device:
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device is {name!r} but CUDA is not available; use 'auto' or 'cpu'")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"runtime.device is {name!r} but this machine has {torch.cuda.device_count()} "
                           "CUDA device(s), numbered from 0")
    return device


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`, host → CUDA without a host sync.

    A plain host→CUDA copy from pageable memory waits for the GPU queue to drain; a copy from
    pinned memory with non_blocking=True is queued behind the running kernels instead (PyTorch's
    pinned-memory cache keeps the source alive until the copy has run)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def weight_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "float32":
        return torch.float32
    if setting == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device, enabled: bool, cpu: bool = False) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when `enabled`, and on CPU too when `cpu` is also set; else a no-op.

    CPU bf16 is opt-in: it is 2.5–3.5× faster on the CPUs measured here (AMD EPYC, Intel Xeon with
    AMX), but its logits differ from fp32 by ~1e-2 nats, too much for the tests that compare
    scores across backends."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and cpu and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
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


_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; False where the platform cannot (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")  # Linux ≥ 4.0: reset the RSS high-water mark to the current RSS
        return True
    except OSError:
        return False


def peak_memory_scope(device: torch.device) -> str:
    """What `peak_memory_bytes` measures on `device`, in words (for reports)."""
    if device.type == "cuda":
        return "cuda max_memory_allocated, reset at each phase start"
    if os.access(_CLEAR_REFS, os.W_OK) and os.path.exists(_STATUS):
        return "process RSS high-water mark (VmHWM), reset at each phase start"
    return "process peak RSS since start (this platform cannot reset it)"


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak allocated bytes since the last reset. CPU: the RSS high-water mark since the last
    reset (VmHWM), or the process's peak RSS where /proc is unavailable."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open(_STATUS) as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PhaseMeter:
    """Wall time, token throughput and peak memory of one phase (or stage) of a run.

    Each `with meter:` block adds its wall time and starts a new peak-memory window, so the peak
    is that of the work inside the blocks only (not of evaluation or checkpointing between them);
    over several blocks (epochs) the meter keeps the largest.
    """

    name: str
    device: torch.device
    tokens: int = 0
    steps: int = 0
    wall_s: float = 0.0
    peak_memory_bytes: int = 0
    _start: float | None = field(default=None, repr=False)

    def __enter__(self) -> PhaseMeter:
        synchronize(self.device)
        reset_peak_memory(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.wall_s += time.perf_counter() - (self._start or time.perf_counter())
        self.peak_memory_bytes = max(self.peak_memory_bytes, peak_memory_bytes(self.device))

    def summary(self) -> dict:
        return {"steps": self.steps, "tokens": self.tokens, "wall_s": round(self.wall_s, 3),
                "tokens_per_s": round(self.tokens / self.wall_s, 1) if self.wall_s > 0 else None,
                "peak_memory_bytes": self.peak_memory_bytes}


def count_trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
