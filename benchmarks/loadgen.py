"""A bounded streaming load generator for OpenAI-compatible servers (loopback only).

Each request is a streamed /v1/completions call; time to first token (TTFT) is measured at the
first SSE chunk that carries text, output tokens come from the final usage chunk.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class RequestResult:
    model: str
    ok: bool
    status: int
    ttft_s: float | None
    latency_s: float
    output_tokens: int
    view_label: str | None = None
    error: str | None = None


@dataclass
class LoadReport:
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    def summary(self) -> dict:
        ok = self.ok
        ttfts = np.array([r.ttft_s for r in ok if r.ttft_s is not None]) if ok else np.array([0.0])
        tokens = sum(r.output_tokens for r in ok)
        return {
            "requests": len(self.results), "failed": len(self.results) - len(ok), "output_tokens": tokens,
            "wall_s": self.wall_s, "output_tok_per_s": tokens / self.wall_s if self.wall_s else 0.0,
            "ttft_p50_s": float(np.percentile(ttfts, 50)), "ttft_p95_s": float(np.percentile(ttfts, 95)),
            "latency_p50_s": float(np.percentile([r.latency_s for r in ok] or [0.0], 50)),
        }


async def stream_completion(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                            extra: dict | None = None) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, **(extra or {})}
    started = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            label = response.headers.get("x-alter-view")
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return RequestResult(model, False, response.status_code, None, time.perf_counter() - started, 0,
                                     label, text[:300])
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(model, False, 200, ttft, time.perf_counter() - started, tokens, label,
                                         chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    ttft = time.perf_counter() - started
        return RequestResult(model, True, 200, ttft, time.perf_counter() - started, tokens, label)
    except httpx.HTTPError as exc:
        return RequestResult(model, False, 0, ttft, time.perf_counter() - started, tokens, None, repr(exc))


async def run_load(base_url: str, api_key: str, models: Callable[[int], str], prompts: list[str], *,
                   concurrency: int, requests: int, max_tokens: int, timeout_s: float = 600) -> LoadReport:
    """`requests` streamed completions, `concurrency` at a time; request i goes to `models(i)`."""
    report = LoadReport()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=timeout_s) as client:
        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                report.results.append(await stream_completion(client, models(i), prompts[i % len(prompts)], max_tokens))

        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout_s)
        report.wall_s = time.perf_counter() - started
    return report
