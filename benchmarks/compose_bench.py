"""Benchmark 4 — view compose time (`alter_serve.core.views.compose`).

    python -m benchmarks.compose_bench [--bundle DIR] [--repeats 5] [--dtype float32|bfloat16] [--skip-7b]

Two bundles are composed:

- "demo": the demo model's shapes (hidden 128, intermediate 512, 2 layers, 7 target modules, rank 8,
  2 forget heads), built in memory; or a real bundle folder given with `--bundle`.
- "7b": Llama-2-7B shapes, built in memory: 32 layers × 7 modules, rank 8, 8 forget heads;
  q/k/v/o_proj 4096×4096, gate/up_proj 11008×4096, down_proj 4096×11008 (out × in).
  Target: compose ≤ 2 s.

The B heads and A are random (compose cost does not depend on the values). They are stored in
`--dtype` (float32 by default: the trainer exports fp32 adapters). The composed view is fp32 either
way, as `compose` writes it.

For each bundle two views are timed: one forget head (the common case) and every forget head (the
worst case for the weighted sum). Each view is broken into the phases `compose` runs:

    weighted_sum   compose_b: B_V = w_r·B_r + Σ_d w_d·B_d for every module (fp32)
    peft_tensors   weighted_sum + the PEFT state dict (A and B_V cast to fp32, contiguous)
    content_hash   sha256 over the config and every tensor (the view's identity)
    write          safetensors + adapter_config.json into an empty folder (page cache, no fsync)
    compose_cold   `compose()` into an empty store: everything above, then the atomic rename
    compose_cached `compose()` when the folder already exists: the hash is computed, nothing written

Each number is the median of `--repeats` runs after `--warmup` untimed runs. Results go to
`benchmarks/results/compose.json` (with the machine block) and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from alter_serve.core.bundle import AlterBundle, load_bundle, validate_contents
from alter_serve.core.manifest import BaseModelRef, Heads, Manifest
from alter_serve.core.views import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    View,
    compose,
    compose_b,
    content_hash,
    peft_config,
    peft_tensors,
)

from .common import load_average, machine_info, markdown_table, print_header, summarize, time_call, write_results

TARGET_7B_S = 2.0
LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHASES = ("weighted_sum", "peft_tensors", "content_hash", "write", "compose_cold", "compose_cached")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def llama_shapes(hidden: int, intermediate: int, layers: int) -> dict[str, tuple[int, int]]:
    """(out, in) of every adapted linear layer of a Llama with multi-head attention (k/v = hidden)."""
    per_layer = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    return {f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in per_layer.items()}


def synthetic_bundle(shapes: dict[str, tuple[int, int]], forget_heads: int, rank: int = 8,
                     dtype: torch.dtype = torch.float32, seed: int = 0) -> AlterBundle:
    """A valid bundle with random A and heads for the given module shapes (no base model needed)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(rows: int, cols: int, scale: float) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen) * scale).to(dtype)

    heads = [f"h{i}" for i in range(forget_heads)]
    lora_a = {m: rand(rank, i, i**-0.5) for m, (o, i) in shapes.items()}
    retain = {m: rand(o, rank, 0.01) for m, (o, i) in shapes.items()}
    forget = {h: {m: rand(o, rank, 0.01) for m, (o, i) in shapes.items()} for h in heads}
    manifest = Manifest(
        base_model=BaseModelRef(name_or_path="synthetic", fingerprint="0" * 64),
        rank=rank, alpha=2.0 * rank, target_modules=list(LLAMA_MODULES), heads=Heads(forget=heads),
        training={"method": "synthetic-benchmark-bundle"},
    )
    return AlterBundle(manifest, lora_a, retain, forget)


def bundle_bytes(bundle: AlterBundle) -> int:
    return sum(t.numel() * t.element_size() for t in bundle.to_tensors().values())


def time_view(bundle: AlterBundle, view: View, scratch: Path, repeats: int, warmup: int) -> dict[str, Any]:
    """Every phase of composing `view`, each as a summary of `repeats` timed runs."""
    scratch = Path(tempfile.mkdtemp(prefix=f"{view.name}-", dir=scratch))
    config = peft_config(bundle)
    tensors = peft_tensors(bundle, view)
    runs = itertools.count()  # fresh folder names, so every cold run writes into an empty store

    def write() -> None:
        folder = scratch / f"write-{next(runs)}"
        folder.mkdir()
        save_file(tensors, str(folder / ADAPTER_WEIGHTS))
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    def compose_cold() -> None:
        compose(bundle, view, scratch / f"store-{next(runs)}")

    cached_store = scratch / "store-cached"
    compose(bundle, view, cached_store)
    timings = {
        "weighted_sum": time_call(lambda: compose_b(bundle, view), repeats, warmup),
        "peft_tensors": time_call(lambda: peft_tensors(bundle, view), repeats, warmup),
        "content_hash": time_call(lambda: content_hash(config, tensors), repeats, warmup),
        "write": time_call(write, repeats, warmup),
        "compose_cold": time_call(compose_cold, repeats, warmup),
        "compose_cached": time_call(lambda: compose(bundle, view, cached_store), repeats, warmup),
    }
    composed = compose(bundle, view, cached_store)
    return {
        "view": view.name,
        "forget_heads_in_view": len(view.forget),
        "view_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "file_bytes": (composed.path / ADAPTER_WEIGHTS).stat().st_size,
        "phases": {phase: summarize(samples) for phase, samples in timings.items()},
    }


def views_for(bundle: AlterBundle) -> list[View]:
    """One forget head (the common view) and all of them (the most work for the weighted sum)."""
    heads = bundle.forget_heads
    if not heads:
        return [View(name="retain-only")]
    views = [View(name="forget-one", forget={heads[0]: 1.0})]
    if len(heads) > 1:
        views.append(View(name="forget-all", forget={h: 1.0 for h in heads}))
    return views


def describe(bundle: AlterBundle) -> dict[str, Any]:
    shapes = sorted({(bundle.retain[m].shape[0], bundle.lora_a[m].shape[1]) for m in bundle.modules})
    return {
        "modules": len(bundle.modules),
        "rank": bundle.manifest.rank,
        "forget_heads": len(bundle.forget_heads),
        "dtype": str(next(iter(bundle.retain.values())).dtype).replace("torch.", ""),
        "module_shapes_out_in": [list(s) for s in shapes],
        "bundle_bytes": bundle_bytes(bundle),
    }


def _ms(seconds: float) -> str:
    """Milliseconds with the precision that matters at that size (0.48, 12.3, 850)."""
    ms = seconds * 1000
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def _filesystem(path: Path) -> str:
    """The filesystem type under `path` (write timings on tmpfs and on a disk are not comparable)."""
    best, fstype = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, kind, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, fstype = mount, kind
    except OSError:
        pass
    return fstype


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compose_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="a bundle folder to time instead of the synthetic demo-scale one")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the synthetic bundles' A and B")
    p.add_argument("--skip-7b", action="store_true", help="only the demo scale (a quick check)")
    p.add_argument("--tmp-dir", type=Path, default=None, help="where views are written (default: the system temp dir)")
    p.add_argument("--out-dir", type=Path, default=None, help="results folder (default: benchmarks/results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    machine = machine_info()
    print_header("compose", machine)

    bundles: list[tuple[str, AlterBundle]] = []
    if args.bundle is not None:
        bundles.append((f"bundle:{args.bundle.name}", load_bundle(args.bundle)))
    else:
        bundles.append(("demo", synthetic_bundle(llama_shapes(128, 512, 2), forget_heads=2, dtype=dtype)))
    if not args.skip_7b:
        bundles.append(("7b", synthetic_bundle(llama_shapes(4096, 11008, 32), forget_heads=8, dtype=dtype)))

    results, rows = [], []
    scratch = Path(tempfile.mkdtemp(prefix="compose-bench-", dir=args.tmp_dir))
    try:
        for scale, bundle in bundles:
            problems = validate_contents(bundle)
            if problems:
                raise SystemExit(f"{scale}: the benchmark bundle is invalid: {problems}")
            for view in views_for(bundle):
                timed = time_view(bundle, view, scratch, args.repeats, args.warmup)
                cold = timed["phases"]["compose_cold"]["median_s"]
                target = TARGET_7B_S if scale == "7b" else None
                results.append({"scale": scale, "bundle": describe(bundle), **timed, "target_s": target,
                                "meets_target": None if target is None else cold <= target})
                medians = [_ms(timed["phases"][p]["median_s"]) for p in PHASES]
                rows.append([scale, view.name, len(view.forget), f"{timed['file_bytes'] / 2**20:.1f}", *medians,
                             "-" if target is None else ("yes" if cold <= target else "NO")])
        filesystem = _filesystem(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    headers = ["scale", "view", "heads", "file MiB", *(f"{p} ms" for p in PHASES), f"cold ≤ {TARGET_7B_S:g} s"]
    table = markdown_table(headers, rows)
    settings = {"repeats": args.repeats, "warmup": args.warmup, "statistic": "median",
                "bundle_dtype": args.dtype if args.bundle is None else "as stored", "view_dtype": "float32",
                "write_filesystem": filesystem, "fsync": False, "target_7b_s": TARGET_7B_S,
                "load_average_at_end": load_average()}
    path = write_results("compose", settings, results, table, machine=machine, out_dir=args.out_dir)
    print(table)
    print(f"\n(median of {args.repeats} runs after {args.warmup} warm-up; views written to {filesystem}; "
          f"results in {path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
