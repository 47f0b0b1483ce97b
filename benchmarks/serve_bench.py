"""Serving benchmarks (issue 7, items 1–3), measured in one run on one machine:

1. Overhead: alter-serve vs vLLM's stock OpenAI server, same model, same composed view LoRA, same
   engine settings, same client load (streams × requests × output tokens). Ratios: throughput, TTFT
   p50. Both servers are up together (an idle server costs no CPU: that is measured and reported)
   and are loaded in turns, `--rounds` times, alternating which goes first; the ratio is the median
   of the per-round ratios. On a shared machine the background load drifts over minutes, so one
   stock run followed by one alter-serve run minutes later compared the drift as much as the
   servers. The CPU seconds of each server's API process and engine processes per round are
   recorded too: unlike wall-clock throughput they barely depend on the neighbours.
2. View scaling: alter-serve throughput with 1, 4, 16 and 64 distinct views under the same load.
3. Hot-swap: under streaming load, time from an admin head replacement returning to the first token
   served by the new version, over N swaps; and failed requests during them.

    python -m benchmarks.serve_bench [--requests 256 --concurrency 32 --max-tokens 64 --rounds 5 --swaps 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from alter_serve.core.bundle import load_bundle
from alter_serve.core.views import View
from tests.server.bundle_factory import random_bundle, random_head_file
from tests.server.conftest import make_registry
from tests.server.live import LiveServer, free_port

from .common import machine_info, markdown_table, write_results
from .loadgen import run_load, stream_completion

PROMPTS = [f"Question: What genre does author number {i} write in?\nAnswer:" for i in range(32)]
HEADS = [f"h{i}" for i in range(8)]
SCALES = (1, 4, 16, 64)
MAX_LORAS = 16  # same for both servers: up to 16 distinct views share one batch


def bench_views(n: int) -> list[View]:
    """n distinct views: each mixes two heads with its own weights, so every LoRA differs."""
    return [View(name=f"v{i}", retain=1.0, forget={HEADS[i % 8]: 0.5 + i / 128, HEADS[(i + 3) % 8]: 0.25})
            for i in range(n)]


def prepare(model_dir: Path, work: Path) -> tuple[dict[str, str], Path]:
    """Registry with bundle "bench" (8 heads), 64 views + "swap", tenant "bench"; returns keys, view-0 folder."""
    registry = make_registry(model_dir, work)
    random_bundle(model_dir, HEADS, seed=0, scale=0.2).save(work / "bundle-src")
    registry.store_bundle("bench", work / "bundle-src")
    names = ["original"]
    for view in bench_views(max(SCALES)) + [View(name="swap", forget={"h0": 1.0})]:
        registry.define_view(view, "bench")
        names.append(view.name)
    registry.create_tenant("bench", views=names)
    _, tenant = registry.create_key("bench")
    _, admin = registry.create_key(None, "admin")
    view0 = registry.get_view("v0").path
    registry.close()
    return {"tenant": tenant, "admin": admin}, view0


class StockVllm:
    """vLLM's own OpenAI server with the same engine settings and the view as a --lora-modules entry."""

    def __init__(self, model_dir: Path, lora_dir: Path, log: Path, max_loras: int):
        self.port = free_port()
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                    "--dtype", "float32", "--enable-lora", "--max-lora-rank", "32", "--max-loras", str(max_loras),
                    "--max-num-seqs", "64", "--enforce-eager", "--gpu-memory-utilization", "0.2",
                    "--lora-modules", f"v0={lora_dir}", "--port", str(self.port)]
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "StockVllm":
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        self.proc = subprocess.Popen(self.cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stock vLLM exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("stock vLLM server did not start")

    def __exit__(self, *exc) -> None:
        os.killpg(self.proc.pid, 15)
        self.proc.wait(timeout=60)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU seconds so far of process `pid` (the API server) and of its descendants
    (vLLM's engine core and worker)."""
    def used(process: psutil.Process) -> float:
        try:
            times = process.cpu_times()
        except psutil.Error:
            return 0.0
        return times.user + times.system

    root = psutil.Process(pid)
    return used(root), sum(used(child) for child in root.children(recursive=True))


def warm_up(base_url: str, key: str, models, args) -> None:
    """One short pass (adapter loads, allocator growth) before measured passes."""
    asyncio.run(run_load(base_url, key, models, PROMPTS, concurrency=args.concurrency,
                         requests=args.concurrency, max_tokens=8))


def measure(base_url: str, key: str, models, args, pids: dict[str, int] | None = None) -> dict:
    """One measured pass; with `pids` ({"self": pid, "idle": pid of the other server}), the CPU
    seconds this server's processes and the idle server's processes used during it."""
    before = {name: cpu_seconds(pid) for name, pid in (pids or {}).items()}
    started_load = os.getloadavg()[0]
    report = asyncio.run(run_load(base_url, key, models, PROMPTS, concurrency=args.concurrency,
                                  requests=args.requests, max_tokens=args.max_tokens))
    summary = {**report.summary(), "loadavg_1m_start": started_load, "loadavg_1m_end": os.getloadavg()[0]}
    for name, (api0, engine0) in before.items():
        api1, engine1 = cpu_seconds(pids[name])
        if name == "self":
            summary.update(api_cpu_s=api1 - api0, engine_cpu_s=engine1 - engine0)
        else:
            summary["idle_server_cpu_s"] = (api1 - api0) + (engine1 - engine0)
    return summary


def load(base_url: str, key: str, models, args) -> dict:
    warm_up(base_url, key, models, args)
    return measure(base_url, key, models, args)


def overhead(stock: "StockVllm", server: LiveServer, tenant_key: str, args) -> tuple[list[dict], list[dict]]:
    """Both servers up; `args.rounds` measured passes each, in turns (alternating who goes first)."""
    one_view = lambda i: "v0"  # noqa: E731
    sides = {"vllm-stock": (stock.base_url, "unused", stock.proc.pid),
             "alter-serve": (server.base_url, tenant_key, server.proc.pid)}
    for url, key, _ in sides.values():
        warm_up(url, key, one_view, args)
    runs: dict[str, list[dict]] = {"vllm-stock": [], "alter-serve": []}
    for round_ in range(args.rounds):
        order = ["vllm-stock", "alter-serve"] if round_ % 2 == 0 else ["alter-serve", "vllm-stock"]
        for name in order:
            url, key, pid = sides[name]
            other = next(p for n, (_, _, p) in sides.items() if n != name)
            runs[name].append({"round": round_, **measure(url, key, one_view, args, {"self": pid, "idle": other})})
            print(f"overhead round {round_} {name}: {runs[name][-1]['output_tok_per_s']:.0f} tok/s, "
                  f"TTFT p50 {runs[name][-1]['ttft_p50_s']:.3f} s", flush=True)
    return runs["vllm-stock"], runs["alter-serve"]


def median_run(runs: list[dict]) -> dict:
    """Per-measure medians over rounds (the table's row for one server)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and k != "round"]
    out: dict = {k: float(np.median([r[k] for r in runs])) for k in keys}
    out.update(requests=runs[0]["requests"], failed=sum(r["failed"] for r in runs))  # failed: over all rounds
    return out


async def hot_swap(server: LiveServer, bundle_src: Path, scratch: Path, swaps: int, concurrency: int) -> dict:
    """Swap head h0 `swaps` times under load; after each admin call returns, stream on "swap" and time
    until the first token of the new version."""
    bundle = load_bundle(bundle_src)
    files = [random_head_file(bundle, scratch / f"h0-{i}.safetensors", seed=1000 + i, scale=0.2) for i in range(2)]
    headers = {"Authorization": f"Bearer {server.keys['tenant']}"}
    stop, background = asyncio.Event(), []

    async def pressure(client: httpx.AsyncClient, i: int) -> None:
        while not stop.is_set():
            background.append(await stream_completion(client, f"v{i % 16}", PROMPTS[i % len(PROMPTS)], 32))

    latencies, mismatched = [], 0
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=600) as client, \
            httpx.AsyncClient(base_url=server.base_url, timeout=600,
                              headers={"Authorization": f"Bearer {server.keys['admin']}"}) as admin:
        tasks = [asyncio.create_task(pressure(client, i)) for i in range(concurrency)]
        await asyncio.sleep(2)
        for i in range(swaps):
            with files[i % 2].open("rb") as fh:
                response = await admin.put("/admin/bundles/bench/heads/h0", files={"weights": ("h.safetensors", fh)})
            response.raise_for_status()
            label = next(v for v in response.json()["views"] if v.startswith("swap@"))
            returned = time.perf_counter()
            first = await stream_completion(client, "swap", PROMPTS[0], 4)
            latencies.append(time.perf_counter() - returned - (first.latency_s - (first.ttft_s or first.latency_s)))
            mismatched += first.view_label != label or not first.ok
        stop.set()
        await asyncio.gather(*tasks)
    failed = sum(not r.ok for r in background)
    return {"swaps": swaps, "swap_to_first_token_p50_s": float(np.percentile(latencies, 50)),
            "swap_to_first_token_p95_s": float(np.percentile(latencies, 95)),
            "requests_during_swaps": len(background), "failed_requests": failed, "wrong_version": mismatched}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF model folder (default: the demo model)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5, help="overhead: measured passes per server, in turns")
    args = parser.parse_args(argv)
    if args.model is None:
        from train.demo.demo_model import build_demo_model
        args.model = build_demo_model()
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="serve-bench-", dir=Path("var").resolve() if Path("var").exists() else None))
    keys, view0 = prepare(args.model, work)
    results = []

    server = LiveServer(args.model, work, keys, extra_args=["--max-loras", str(MAX_LORAS)]).start()
    try:
        with StockVllm(args.model, view0, work / "stock.log", max_loras=MAX_LORAS) as stock:
            server.wait_ready()
            stock_runs, alter_runs = overhead(stock, server, keys["tenant"], args)
        per_round = [{"round": s["round"],
                      "throughput_ratio": a["output_tok_per_s"] / s["output_tok_per_s"],
                      "ttft_p50_ratio": a["ttft_p50_s"] / s["ttft_p50_s"]}
                     for s, a in zip(stock_runs, alter_runs)]
        stock_summary = median_run(stock_runs)
        results.append({"benchmark": "overhead", "server": "vllm-stock", "views": 1, **stock_summary,
                        "rounds": stock_runs})
        results.append({"benchmark": "overhead", "server": "alter-serve", "views": 1, **median_run(alter_runs),
                        "rounds": alter_runs})
        for n in SCALES:
            summary = load(server.base_url, keys["tenant"], lambda i, n=n: f"v{i % n}", args)
            results.append({"benchmark": "views", "server": "alter-serve", "views": n, **summary})
        swap = asyncio.run(hot_swap(server, work / "bundle-src", work, args.swaps, concurrency=8))
    finally:
        server.stop()

    alter1 = next(r for r in results if r["benchmark"] == "overhead" and r["server"] == "alter-serve")
    per_view = {r["views"]: r for r in results if r["benchmark"] == "views"}
    ratios = {
        "throughput_ratio_vs_stock": float(np.median([r["throughput_ratio"] for r in per_round])),
        "ttft_p50_ratio_vs_stock": float(np.median([r["ttft_p50_ratio"] for r in per_round])),
        "throughput_ratio_per_round": [r["throughput_ratio"] for r in per_round],
        "ttft_p50_ratio_per_round": [r["ttft_p50_ratio"] for r in per_round],
        "api_cpu_ratio_vs_stock": alter1["api_cpu_s"] / stock_summary["api_cpu_s"],
        "views16_vs_views1_throughput": per_view[16]["output_tok_per_s"] / per_view[1]["output_tok_per_s"],
        "views64_vs_views1_throughput": per_view[64]["output_tok_per_s"] / per_view[1]["output_tok_per_s"],
    }
    rows = [[r["benchmark"], r["server"], r["views"], r["requests"], r["failed"], r["output_tok_per_s"],
             r["ttft_p50_s"], r["ttft_p95_s"], r.get("api_cpu_s", "-"), r.get("engine_cpu_s", "-")] for r in results]
    table = markdown_table(["benchmark", "server", "views", "requests", "failed", "output tok/s", "TTFT p50 s",
                            "TTFT p95 s", "API process CPU s", "engine CPU s"], rows)
    table += (f"\n\nOverhead rows: medians over {args.rounds} rounds per server, servers loaded in turns; the idle "
              f"server used {max(r['idle_server_cpu_s'] for r in stock_runs + alter_runs):.2f} CPU s at most "
              "during the other's pass.")
    round_text = lambda key: ", ".join(f"{r[key]:.3f}" for r in per_round)  # noqa: E731
    table += "\n\n" + markdown_table(["ratio", "value", "target"], [
        ["alter-serve / stock vLLM throughput (median of rounds)", ratios["throughput_ratio_vs_stock"], "≥ 0.95"],
        ["  per round", round_text("throughput_ratio"), ""],
        ["alter-serve / stock vLLM TTFT p50 (median of rounds)", ratios["ttft_p50_ratio_vs_stock"], "≤ 1.10"],
        ["  per round", round_text("ttft_p50_ratio"), ""],
        ["alter-serve / stock vLLM API-process CPU s", ratios["api_cpu_ratio_vs_stock"], "-"],
        ["16 views / 1 view throughput", ratios["views16_vs_views1_throughput"], "≥ 0.8"],
        ["64 views / 1 view throughput", ratios["views64_vs_views1_throughput"], "-"],
    ])
    table += "\n\n" + markdown_table(["hot-swap", "value", "target"], [
        ["swaps", swap["swaps"], "20"],
        ["swap → first new token p50 s", swap["swap_to_first_token_p50_s"], "-"],
        ["swap → first new token p95 s", swap["swap_to_first_token_p95_s"], "≤ 1 s"],
        ["requests during swaps", swap["requests_during_swaps"], "-"],
        ["failed requests", swap["failed_requests"], "0"],
        ["first request on wrong version", swap["wrong_version"], "0"],
    ])
    settings = {"model": str(args.model), "requests": args.requests, "concurrency": args.concurrency,
                "max_tokens": args.max_tokens, "rounds": args.rounds, "dtype": "float32", "max_loras": MAX_LORAS,
                "enforce_eager": True}
    write_results("serve", settings, results + [{"ratios": ratios}, {"hot_swap": swap}], table, machine)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
