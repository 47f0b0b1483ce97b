"""End to end on the demo: the trained demo bundle forgets in the served (static view) mode.

Scored independently of the training report: the bundle is loaded from disk, validated against
the base model, injected, and each view is scored on the synthetic data.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alter_serve.core.bundle import BundleError, load_bundle
from alter_serve.core.fingerprint import fingerprint, module_shapes
from alter_serve.core.views import View, calibrated_view, compose
from train.data.synthetic import SyntheticTofu
from train.examples import encode_records
from train.alter.modeling import from_bundle
from train.answer_probability import mean_answer_probability, model_forward

MIN_FORGET_DROP = 5.0   # forget-set answer probability falls at least 5x
MIN_RETAIN_RATIO = 0.9  # retain-set answer probability stays within 10 % of the base model's


@pytest.fixture(scope="module")
def served(demo_model_dir, demo_bundle_dir):
    bundle = load_bundle(demo_bundle_dir, module_shapes(demo_model_dir), fingerprint(demo_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    alter = from_bundle(AutoModelForCausalLM.from_pretrained(demo_model_dir).eval(), bundle)
    data = SyntheticTofu.load(demo_model_dir / "data")
    _, retain = data.split(bundle.forget_heads)
    forget = {head: encode_records(tokenizer, data.by_subdomain(head)) for head in bundle.forget_heads}
    return alter, bundle, tokenizer, forget, encode_records(tokenizer, retain)


def probability(alter, tokenizer, examples, **view) -> float:
    with alter.mixing(**view):
        return mean_answer_probability(model_forward(alter), examples, tokenizer.pad_token_id, batch_size=64)


def test_the_demo_bundle_has_two_forget_heads_bound_to_the_base_model(served, demo_model_dir) -> None:
    _, bundle, _, forget, retain = served
    assert len(bundle.forget_heads) >= 2
    assert bundle.manifest.base_model.fingerprint == fingerprint(demo_model_dir)
    assert bundle.manifest.training["method"] == "alter"
    assert bundle.router and bundle.manifest.router.params["tau_high"] == 0.8
    assert all(len(examples) > 0 for examples in forget.values()) and len(retain) > 0


def test_each_served_view_forgets_its_subdomain_and_keeps_the_retain_set(served) -> None:
    alter, bundle, tokenizer, forget, retain = served
    retain_before = probability(alter, tokenizer, retain, mode="off")
    for head in bundle.forget_heads:
        served_view = calibrated_view(View(name="v", forget={head: 1.0}), bundle.manifest.calibration)
        view = {"mode": "view", "retain": 1.0, "forget": served_view.forget}
        forget_before = probability(alter, tokenizer, forget[head], mode="off")
        forget_after = probability(alter, tokenizer, forget[head], **view)
        retain_after = probability(alter, tokenizer, retain, **view)
        assert forget_before > 0.9, "the demo model should know its facts"
        assert forget_before / forget_after >= MIN_FORGET_DROP, (head, forget_before, forget_after)
        assert retain_after / retain_before >= MIN_RETAIN_RATIO, (head, retain_before, retain_after)


def test_the_calibrated_view_of_all_heads_forgets_every_subdomain_and_keeps_the_retain_set(served) -> None:
    """The demo's "forget-all" view: both heads at the calibrated ω(2) (at ω = 1 the stacked heads
    cost most of the retain set; train.alter.calibration)."""
    alter, bundle, tokenizer, forget, retain = served
    calibration = bundle.manifest.calibration
    assert calibration is not None and calibration.min_retain_ratio >= MIN_RETAIN_RATIO
    served_view = calibrated_view(View(name="v", forget={h: 1.0 for h in bundle.forget_heads}), calibration)
    omega = calibration.weight_for(len(bundle.forget_heads))
    assert 0.0 < omega < 1.0 and set(served_view.forget.values()) == {omega}
    view = {"mode": "view", "retain": 1.0, "forget": served_view.forget}
    retain_ratio = probability(alter, tokenizer, retain, **view) / probability(alter, tokenizer, retain, mode="off")
    assert retain_ratio >= MIN_RETAIN_RATIO, retain_ratio
    for head in bundle.forget_heads:
        drop = probability(alter, tokenizer, forget[head], mode="off") / probability(alter, tokenizer, forget[head], **view)
        assert drop >= MIN_FORGET_DROP, (head, drop)


def test_the_training_report_agrees_with_the_independent_scores(served, demo_bundle_dir) -> None:
    alter, bundle, tokenizer, forget, retain = served
    report = json.loads((demo_bundle_dir / "training" / "report.json").read_text())
    head = bundle.forget_heads[0]
    recorded = report["summary"]["per_view"][head]["forget_probability_after"]
    scored = probability(alter, tokenizer, forget[head], mode="view", forget={head: 1.0})
    assert scored == pytest.approx(recorded, rel=1e-4)
    assert (demo_bundle_dir / "training" / "loss_curve.png").is_file()
    assert (demo_bundle_dir / "training" / "entropy_hist.png").is_file()


def test_the_composed_peft_view_is_what_view_mode_computes(served, tmp_path) -> None:
    """vLLM serves the composed PEFT folder; PEFT's logits must equal view mode's."""
    from peft import PeftModel

    alter, bundle, tokenizer, forget, _ = served
    head = bundle.forget_heads[0]
    composed = compose(bundle, View(name=f"forget-{head}", forget={head: 1.0}), tmp_path)
    base = AutoModelForCausalLM.from_pretrained(bundle.manifest.base_model.name_or_path).eval()
    peft_model = PeftModel.from_pretrained(base, composed.path).eval()
    ids = torch.tensor([list(forget[head][0].input_ids)])
    with torch.no_grad(), alter.mixing("view", forget={head: 1.0}):
        ours = alter(input_ids=ids).logits
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_a_corrupted_or_mismatched_bundle_is_refused_with_every_problem(served, demo_model_dir, demo_bundle_dir, tmp_path) -> None:
    _, bundle, *_ = served
    bad = tmp_path / "bad"
    shutil.copytree(demo_bundle_dir, bad)
    tensors = load_file(str(bad / "weights.safetensors"))
    module = bundle.modules[0]
    head = bundle.forget_heads[0]
    tensors[f"{module}.lora_A"] = tensors[f"{module}.lora_A"][:, :-1].contiguous()     # wrong shape
    tensors[f"{bundle.modules[1]}.B.forget.{head}"][0, 0] = float("nan")               # non-finite
    del tensors[f"{bundle.modules[2]}.B.retain"]                                       # missing head weight
    tensors["mystery_tensor"] = torch.zeros(2)                                         # unknown name
    save_file(tensors, str(bad / "weights.safetensors"))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["base_model"]["fingerprint"] = "sha256:" + "0" * 64                       # other base model
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as info:
        load_bundle(bad, module_shapes(demo_model_dir), fingerprint(demo_model_dir))
    problems = "\n".join(info.value.problems)
    assert f"{module}.lora_A: shape" in problems
    assert f"{bundle.modules[1]}.B.forget.{head}: contains NaN or Inf" in problems
    assert f"{bundle.modules[2]}.B.retain: missing" in problems
    assert "'mystery_tensor': unknown name" in problems
    assert "train the bundle on this base model" in problems
    assert len(info.value.problems) >= 5
