"""The served demo does what it promises: the original view answers demo facts, the view that
forgot a genre no longer reproduces that genre's answers, and it still answers the retain genres."""

from __future__ import annotations

import pytest

from alter_serve.core.bundle import load_bundle
from train.data.prompting import format_prompt
from train.data.synthetic import SyntheticTofu

pytestmark = pytest.mark.vllm
N = 12


def exact_matches(client, model: str, records) -> int:
    prompts = [format_prompt(r["question"]) for r in records]
    out = client.completions.create(model=model, prompt=prompts, max_tokens=40, temperature=0)
    texts = {c.index: c.text.strip() for c in out.choices}
    return sum(texts[i] == r["answer"] for i, r in enumerate(records))


def test_original_answers_and_the_forgetting_view_does_not(live_server, demo_model_dir, demo_bundle_dir):
    heads = load_bundle(demo_bundle_dir).forget_heads
    data = SyntheticTofu.load(demo_model_dir / "data")
    forgotten = data.by_subdomain(heads[0])[:N]
    kept = data.split(heads)[1][:N]
    client = live_server.client()
    view = f"forget-{heads[0]}"
    assert exact_matches(client, "original", forgotten) >= 0.75 * N  # the demo model knows ~99 % of all answers
    assert exact_matches(client, view, forgotten) <= 0.2 * N
    assert exact_matches(client, view, kept) >= 0.75 * N
