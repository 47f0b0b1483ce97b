"""What is served is what is evaluated: vLLM (through the live server) vs the PyTorch reference.

For the same view, vLLM's greedy tokens equal the reference model's in view mode, and answer
log-probabilities agree within 1e-3 (fp32). The same check is the evaluation issue's "local scorer
and endpoint scorer give the same answer probabilities (relative difference ≤ 1e-3)".
"""

from __future__ import annotations

import math

import pytest

from alter_serve.core.bundle import load_bundle
from train.data.prompting import format_prompt
from train.evaluation.bundle_views import local_view_scorers
from train.evaluation.eval_sets import load_eval_sets
from train.evaluation.scorers import EndpointScorer

pytestmark = pytest.mark.vllm
N_PROMPTS = 10


@pytest.fixture(scope="module")
def qa(demo_model_dir):
    sets, _ = load_eval_sets("synthetic", model=str(demo_model_dir))
    records = sets["forget"][: N_PROMPTS // 2] + sets["retain"][: N_PROMPTS - N_PROMPTS // 2]
    return [format_prompt(r["question"]) for r in records], [r["answer"] for r in records]


@pytest.fixture(scope="module")
def served_views(demo_bundle_dir):
    heads = load_bundle(demo_bundle_dir).forget_heads
    # served model name → the reference's view name (train.evaluation.bundle_views.bundle_view); the demo's views
    # use the bundle's calibrated head weights (alter_serve.demo_setup)
    return {"original": "original", f"forget-{heads[0]}": f"calibrated:{heads[0]}",
            "forget-all": "calibrated:" + "+".join(heads)}


def test_greedy_tokens_and_answer_logprobs_match_reference(live_server, demo_model_dir, demo_bundle_dir, qa,
                                                           served_views):
    prompts, answers = qa
    local = local_view_scorers(str(demo_model_dir), str(demo_bundle_dir), list(served_views.values()),
                               device="cpu", progress=False)
    for served, reference in served_views.items():
        remote = EndpointScorer(live_server.base_url, served, api_key=live_server.keys["tenant"], concurrency=4,
                                progress=False)
        ref_lp = local[reference].answer_logprobs(prompts, answers)
        srv_lp = remote.answer_logprobs(prompts, answers)
        for ref, srv in zip(ref_lp, srv_lp):
            assert len(ref) == len(srv)
            assert srv == pytest.approx(ref, abs=1e-3), served
            p_ref, p_srv = math.exp(sum(ref) / len(ref)), math.exp(sum(srv) / len(srv))
            assert abs(p_srv - p_ref) / p_ref <= 1e-3, served
        assert remote.generate(prompts, 24) == local[reference].generate(prompts, 24), served
