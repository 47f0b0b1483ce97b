"""`views.compose_b` / `content_hash`: the fast path gives the same bytes (and so the same hash)
as the defining fp32 expression, for every bundle dtype; `compose` reuses a stored folder."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from alter_serve.core.bundle import AlterBundle, BundleError
from alter_serve.core.manifest import BaseModelRef, Heads, Manifest
from alter_serve.core.views import (
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    View,
    compose,
    compose_b,
    content_hash,
    peft_config,
    peft_tensors,
)

SHAPES = {"model.layers.0.self_attn.q_proj": (64, 32), "model.layers.0.mlp.down_proj": (32, 96)}  # (out, in)
HEADS = ["bio", "cyber", "chem"]
RANK = 8


def make_bundle(dtype: torch.dtype, seed: int = 0) -> AlterBundle:
    gen = torch.Generator().manual_seed(seed)

    def rand(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen).to(dtype)

    manifest = Manifest(base_model=BaseModelRef(name_or_path="tiny", fingerprint="0" * 64), rank=RANK, alpha=16.0,
                        target_modules=["q_proj", "down_proj"], heads=Heads(forget=HEADS))
    return AlterBundle(
        manifest,
        lora_a={m: rand(RANK, i) for m, (o, i) in SHAPES.items()},
        retain={m: rand(o, RANK) for m, (o, i) in SHAPES.items()},
        forget={h: {m: rand(o, RANK) for m, (o, i) in SHAPES.items()} for h in HEADS},
    )


def reference_b(bundle: AlterBundle, view: View) -> dict[str, torch.Tensor]:
    """The definition, written the obvious way in torch: w_r·B_r + Σ_d w_d·B_d in fp32, left to right."""
    out = {}
    for module in bundle.modules:
        b = view.retain * bundle.retain[module].float()
        for head, weight in view.forget.items():
            b = b + weight * bundle.forget[head][module].float()
        out[module] = b
    return out


def reference_hash(config: dict, tensors: dict[str, torch.Tensor]) -> str:
    """The content hash as defined: sha256(config JSON, then name|dtype|shape| and bytes per tensor)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


VIEWS = [
    View(name="retain-only"),
    View(name="scaled-retain", retain=0.7),
    View(name="one", forget={"bio": 1.0}),
    View(name="weighted", retain=0.9, forget={"cyber": -1.3, "bio": 0.37, "chem": 1.0}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.name)
def test_compose_b_is_bit_identical_to_the_definition(dtype: torch.dtype, view: View) -> None:
    bundle = make_bundle(dtype)
    ours, expected = compose_b(bundle, view), reference_b(bundle, view)
    assert sorted(ours) == sorted(expected)
    for module, b in ours.items():
        assert b.dtype == torch.float32 and b.shape == expected[module].shape
        assert torch.equal(b, expected[module]), module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_content_hash_matches_its_definition(dtype: torch.dtype) -> None:
    bundle = make_bundle(dtype)
    view = VIEWS[-1]
    config, tensors = peft_config(bundle), peft_tensors(bundle, view)
    assert content_hash(config, tensors) == reference_hash(config, tensors)
    # bf16 tensors too (peft_tensors can be asked for another dtype).
    half = peft_tensors(bundle, view, torch.bfloat16)
    assert content_hash(config, half) == reference_hash(config, half)


def test_compose_does_not_modify_the_bundle() -> None:
    bundle = make_bundle(torch.float32)
    before = {m: t.clone() for m, t in bundle.retain.items()}
    compose_b(bundle, View(name="w", retain=2.0, forget={"bio": 1.0, "chem": 0.5}))
    assert all(torch.equal(bundle.retain[m], before[m]) for m in before)


def test_compose_writes_the_view_and_reuses_the_folder(tmp_path) -> None:
    bundle = make_bundle(torch.float32)
    view = View(name="no-bio", forget={"bio": 1.0})
    first = compose(bundle, view, tmp_path)
    assert first.path == tmp_path / first.content_hash
    stored = load_file(str(first.path / ADAPTER_WEIGHTS))
    expected = reference_b(bundle, view)
    for module in bundle.modules:
        assert torch.equal(stored[f"{PEFT_PREFIX}{module}.lora_B.weight"], expected[module])
        assert torch.equal(stored[f"{PEFT_PREFIX}{module}.lora_A.weight"], bundle.lora_a[module])
    mtime = (first.path / ADAPTER_WEIGHTS).stat().st_mtime_ns
    again = compose(bundle, view, tmp_path)
    assert again == first and (again.path / ADAPTER_WEIGHTS).stat().st_mtime_ns == mtime
    changed = compose(bundle, View(name="no-bio", forget={"bio": 0.5}), tmp_path)
    assert changed.content_hash != first.content_hash and changed.lora_name != first.lora_name


def test_compose_refuses_a_view_that_overflows_fp16_and_writes_nothing(tmp_path) -> None:
    """vLLM folds s = alpha/r into B_V and may hold it in fp16: s·|B_V| must stay ≤ 65504."""
    bundle = make_bundle(torch.float32)  # s = 16 / 8 = 2
    q, down = sorted(SHAPES)[1], sorted(SHAPES)[0]
    bundle.retain[q] = torch.full_like(bundle.retain[q], 9000.0)
    bundle.forget["bio"][q] = torch.full_like(bundle.forget["bio"][q], 9000.0)
    bundle.forget["bio"][down] = torch.full_like(bundle.forget["bio"][down], 3e38)
    bundle.forget["cyber"][down] = torch.full_like(bundle.forget["cyber"][down], 3e38)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the overflow is reported, not warned about
        with pytest.raises(BundleError) as info:
            compose(bundle, View(name="loud", retain=4.0, forget={"bio": 1.0, "cyber": 1.0}), tmp_path)
    text = "\n".join(info.value.problems)
    assert f"{q}: s·|B_V| = 2·4.5e+04 is not finite or exceeds the fp16 maximum 65504" in text
    assert f"{down}: s·|B_V| = 2·inf" in text
    assert len(info.value.problems) == 2
    assert list(tmp_path.iterdir()) == []
    # The same heads at a weight that fits are servable: B_V = 9000·1 + 9000·1, s·B_V = 36000.
    bundle.forget["bio"][down] = bundle.forget["cyber"][down] = bundle.retain[down]
    compose(bundle, View(name="fits", forget={"bio": 1.0}), tmp_path)


def test_content_hash_accepts_any_tensor_shape() -> None:
    assert len(content_hash({}, {"scalar": torch.tensor(1.0)})) == 64
