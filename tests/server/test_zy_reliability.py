"""Reliability under load (bounded in time, loopback only): streaming clients on several views while
heads are hot-swapped and keys are created and revoked; a tight tenant is rate-limited.

- 0 failed requests except the intended 401s (revoked keys) and 429s (the tight tenant);
- no lost registry writes (every created key is listed, every revoked key is revoked);
- memory stable: the server's resident memory grows ≤ 10 % after warm-up.
"""

from __future__ import annotations

import threading
import time

import psutil
import pytest

from alter_serve.core.bundle import load_bundle

from .bundle_factory import random_head_file
from .test_hot_swap import swap_head

pytestmark = pytest.mark.vllm
PROMPT = "Question: Where was the author born?\nAnswer:"
VIEWS = ["original", "forget-all", "swap"]


def server_rss(live_server) -> int:
    proc = psutil.Process(live_server.proc.pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def _complete(http, model: str, key: str | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
                     headers=headers)


def test_load_with_hot_swaps_key_churn_and_rate_limits(live_server, tmp_path):
    with live_server.http("admin") as admin:
        created = admin.post("/admin/tenants", json={"name": "tight", "views": ["original"],
                                                     "limits": {"max_concurrent": 1}})
        assert created.status_code == 200, created.text
        tight_key = admin.post("/admin/tenants/tight/keys").json()["key"]

    with live_server.http() as http:  # warm-up: every view loaded, allocator settled
        for _ in range(3):
            for view in VIEWS:
                assert _complete(http, view).status_code == 200
    rss_after_warmup = server_rss(live_server)

    stop = threading.Event()
    unexpected: list[str] = []
    counts = {"ok": 0, "401": 0, "429": 0}
    lock = threading.Lock()

    def record(status: int, expected: set[int], what: str) -> None:
        with lock:
            key = {200: "ok", 401: "401", 429: "429"}.get(status)
            if key:
                counts[key] += 1
            if status not in expected:
                unexpected.append(f"{what}: {status}")

    def steady_client(i: int) -> None:
        with live_server.http() as http:
            while not stop.is_set():
                record(_complete(http, VIEWS[i % len(VIEWS)]).status_code, {200}, f"steady {VIEWS[i % 3]}")

    def tight_client() -> None:
        with live_server.http(None) as http:
            while not stop.is_set():
                record(_complete(http, "original", tight_key).status_code, {200, 429}, "tight tenant")

    def key_churn(created_ids: list[int]) -> None:
        with live_server.http("admin") as admin, live_server.http(None) as http:
            for _ in range(8):
                made = admin.post("/admin/tenants/demo/keys").json()
                created_ids.append(made["id"])
                record(_complete(http, "original", made["key"]).status_code, {200}, "new key")
                assert admin.delete(f"/admin/keys/{made['id']}").status_code == 200
                record(_complete(http, "original", made["key"]).status_code, {401}, "revoked key")

    bundle = load_bundle(live_server.data_dir / "rnd-src")
    heads = [random_head_file(bundle, tmp_path / f"h{i}.safetensors", seed=500 + i) for i in range(2)]
    created_ids: list[int] = []
    threads = [threading.Thread(target=steady_client, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=tight_client) for _ in range(3)]
    churn = threading.Thread(target=key_churn, args=(created_ids,))
    for t in [*threads, churn]:
        t.start()
    try:
        for i in range(6):
            swap_head(live_server, heads[i % 2])
            time.sleep(0.5)
        churn.join(timeout=300)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)

    assert unexpected == []
    assert counts["ok"] > 50 and counts["401"] == 8 and counts["429"] > 0
    with live_server.http("admin") as admin:
        keys = {k["id"]: k for k in admin.get("/admin/keys", params={"tenant": "demo"}).json()["data"]}
    assert all(i in keys and keys[i]["revoked_at"] is not None for i in created_ids)  # no lost writes
    time.sleep(1)
    assert server_rss(live_server) <= 1.10 * rss_after_warmup
