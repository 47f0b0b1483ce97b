"""Hot-swap under load: heads replaced while clients stream; no failure, no mixed versions."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from alter_serve.core.bundle import load_bundle

from .bundle_factory import random_head_file

pytestmark = pytest.mark.vllm
PROMPT = "Question: What genre does the author write?\nAnswer:"
CLIENTS = 8
SWAPS = 10


def swap_head(live_server, path: Path) -> str:
    """PUT new weights for head "y" of bundle "rnd"; return the new label of view "swap"."""
    with live_server.http("admin") as http, path.open("rb") as fh:
        response = http.put("/admin/bundles/rnd/heads/y", files={"weights": ("head.safetensors", fh)})
    assert response.status_code == 200, response.text
    labels = [label for label in response.json()["views"] if label.startswith("swap@")]
    assert len(labels) == 1
    return labels[0]


def stream_once(http) -> tuple[str, set[str], str]:
    """One greedy streamed completion on "swap": (header view label, chunk fingerprints, text)."""
    body = {"model": "swap", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        label = response.headers["x-alter-view"]
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    return label, {c["system_fingerprint"] for c in chunks}, "".join(c["choices"][0]["text"] for c in chunks)


def test_swaps_under_streaming_load(live_server, tmp_path):
    bundle = load_bundle(live_server.data_dir / "rnd-src")
    heads = [random_head_file(bundle, tmp_path / f"head-{i}.safetensors", seed=100 + i) for i in range(2)]
    expected: dict[str, str] = {}
    with live_server.http() as http:
        for path in heads:
            label = swap_head(live_server, path)
            got, _, text = stream_once(http)
            assert got == label  # accepted after the admin call returned → the new version
            expected[label] = text
    assert len(set(expected.values())) == 2, "the two head versions must produce different text"

    results, failures, stop = [], [], threading.Event()

    def client() -> None:
        with live_server.http() as http:
            while not stop.is_set():
                try:
                    results.append(stream_once(http))
                except Exception as exc:  # noqa: BLE001 - every failure is collected and asserted on
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        for i in range(SWAPS):
            time.sleep(0.4)
            label = swap_head(live_server, heads[i % 2])
            with live_server.http() as http:
                assert stream_once(http)[0] == label
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert failures == []
    assert len(results) >= CLIENTS * 2
    for label, fingerprints, text in results:
        assert fingerprints == {f"alter:{label}"}
        assert text == expected[label], f"{label} produced text of another version"
    assert {label for label, _, _ in results} == set(expected)
