"""AsymLoRA injection: views, routing and merged LoRA agree; isolation; bundles; PEFT parity."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alter_serve.core.bundle import load_bundle
from alter_serve.core.fingerprint import fingerprint, module_shapes
from alter_serve.core.views import View, compose, peft_tensors
from train.alter.modeling import AlterLinear, from_bundle, inject, to_bundle

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEADS = ["bio", "cyber"]
RANK, ALPHA = 8, 16.0
ATOL = 1e-5


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def randomise_heads(alter, seed: int = 1, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in alter.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture()
def alter(base):
    model = inject(copy.deepcopy(base), TARGETS, RANK, ALPHA, HEADS)
    randomise_heads(model)
    return model


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def merged_by_hand(base, alter, weights: list[float]) -> LlamaForCausalLM:
    """A copy of the base with W0 + s · (Σ_h w_h B_h) · A folded into every adapted weight."""
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in alter.layers.items():
            b_view = sum(w * layer.head(h) for h, w in enumerate(weights))
            merged.get_submodule(name).weight += layer.scale * b_view @ layer.lora_A
    return merged


def test_injection_wraps_targets_and_freezes_the_base(alter) -> None:
    assert len(alter.layers) == 2 * len(TARGETS)
    assert all(isinstance(alter.model.get_submodule(n), AlterLinear) for n in alter.layers)
    trainable = {n for n, p in alter.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    layer = alter.layers["model.layers.0.mlp.down_proj"]
    assert layer.lora_A.shape == (RANK, 256) and layer.lora_B.shape == (128, 3, RANK)
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject(tiny_llama(), ["nonexistent"], RANK, ALPHA, HEADS)


def test_off_mode_is_the_base_model(base, alter, batch) -> None:
    with alter.mixing("off"):
        assert torch.allclose(logits(alter, batch), logits(base, batch), atol=ATOL)


@pytest.mark.parametrize("head", [0, 1, 2])
def test_one_hot_view_equals_merged_lora(base, alter, batch, head: int) -> None:
    weights = [0.0, 0.0, 0.0]
    weights[head] = 1.0
    names = ["retain", *HEADS]
    forget = {names[head]: 1.0} if head else {}
    with alter.mixing("view", retain=weights[0], forget=forget):
        got = logits(alter, batch)
    expected = logits(merged_by_hand(base, alter, weights), batch)
    assert torch.allclose(got, expected, atol=ATOL)
    assert not torch.allclose(got, logits(base, batch), atol=1e-3)  # the head really does something


def test_weighted_view_equals_merged_lora(base, alter, batch) -> None:
    with alter.mixing("view", retain=1.0, forget={"bio": 0.5, "cyber": -0.25}):
        got = logits(alter, batch)
    assert torch.allclose(got, logits(merged_by_hand(base, alter, [1.0, 0.5, -0.25]), batch), atol=ATOL)


@pytest.mark.parametrize("weights", [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 0.3, 0.7]])
def test_routed_with_a_forced_route_equals_the_view(base, alter, batch, weights) -> None:
    route = torch.tensor(weights).expand(*batch["input_ids"].shape, 3)
    with alter.mixing("routed", routed=route):
        routed = logits(alter, batch)
    with alter.mixing("view", retain=weights[0], forget={"bio": weights[1], "cyber": weights[2]}):
        view = logits(alter, batch)
    assert torch.allclose(routed, view, atol=ATOL)
    assert torch.allclose(routed, logits(merged_by_hand(base, alter, weights), batch), atol=ATOL)


def test_routed_mode_is_per_token(alter, batch) -> None:
    # Routing only the last position to a different head changes only the last position's logits.
    route = torch.tensor([1.0, 0.0, 0.0]).repeat(*batch["input_ids"].shape, 1)
    with alter.mixing("routed", routed=route):
        before = logits(alter, batch)
    route[:, -1] = torch.tensor([1.0, 1.0, 1.0])
    with alter.mixing("routed", routed=route):
        after = logits(alter, batch)
    assert torch.allclose(before[:, :-1], after[:, :-1], atol=ATOL)
    assert not torch.allclose(before[:, -1], after[:, -1], atol=1e-4)


def test_mixing_restores_the_previous_mode(alter) -> None:
    alter.set_view(1.0, {"bio": 1.0})
    with alter.mixing("off"):
        assert alter.mix.mode == "off"
    assert alter.mix.mode == "view" and alter.mix.weights.tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(KeyError, match="no head 'nope'"):
        alter.set_view(1.0, {"nope": 1.0})


def _grads(alter, batch, **mixing) -> tuple[torch.Tensor, torch.Tensor]:
    alter.zero_grad(set_to_none=True)
    with alter.mixing(**mixing):
        alter(**batch).logits.float().pow(2).mean().backward()
    layer = alter.layers["model.layers.1.self_attn.v_proj"]
    return layer.lora_A.grad, layer.lora_B.grad


def test_isolation_gradients_are_exactly_zero_for_detached_heads(alter, batch) -> None:
    # Forget step for "bio": retain and cyber heads are active but detached.
    _, g = _grads(alter, batch, mode="view", retain=1.0, forget={"bio": 1.0, "cyber": 1.0}, grad_heads=["bio"])
    assert torch.count_nonzero(g[:, 1]) > 0
    assert torch.count_nonzero(g[:, 0]) == 0 and torch.count_nonzero(g[:, 2]) == 0
    # Retain step with the forget heads in the forward, detached.
    _, g = _grads(alter, batch, mode="view", retain=1.0, forget={"bio": 1.0, "cyber": 1.0}, grad_heads=["retain"])
    assert torch.count_nonzero(g[:, 0]) > 0 and torch.count_nonzero(g[:, 1:]) == 0
    # A head with weight 0 gets exactly zero gradient even when it is not detached.
    _, g = _grads(alter, batch, mode="view", retain=1.0, forget={"cyber": 0.0})
    assert torch.count_nonzero(g[:, 2]) == 0 and torch.count_nonzero(g[:, 1]) == 0
    # Routed mode: same per-head isolation.
    route = torch.ones(*batch["input_ids"].shape, 3)
    _, g = _grads(alter, batch, mode="routed", routed=route, grad_heads=["cyber"])
    assert torch.count_nonzero(g[:, 2]) > 0 and torch.count_nonzero(g[:, :2]) == 0


def test_frozen_a_gets_no_gradient(alter, batch) -> None:
    for p in alter.lora_A_parameters():
        p.requires_grad_(False)
    a_grad, b_grad = _grads(alter, batch, mode="view", retain=1.0)
    assert a_grad is None and b_grad is not None


def _save_base(model: LlamaForCausalLM, folder) -> None:
    model.save_pretrained(folder, safe_serialization=True)


def test_bundle_round_trip_gives_identical_logits(base, alter, batch, tmp_path) -> None:
    _save_base(base, tmp_path / "base")
    fp = fingerprint(tmp_path / "base")
    bundle = to_bundle(alter, str(tmp_path / "base"), fp, training={"method": "test"})
    bundle.save(tmp_path / "bundle")
    loaded = load_bundle(tmp_path / "bundle", base_shapes=module_shapes(tmp_path / "base"), base_fingerprint=fp)
    assert loaded.forget_heads == HEADS and len(loaded.modules) == 2 * len(TARGETS)
    restored = from_bundle(copy.deepcopy(base), loaded)
    for forget in ({}, {"bio": 1.0}, {"bio": 1.0, "cyber": 1.0}):
        with alter.mixing("view", forget=forget), restored.mixing("view", forget=forget):
            assert torch.equal(logits(alter, batch), logits(restored, batch))


def test_peft_loaded_view_matches_view_mode(base, alter, batch, tmp_path) -> None:
    """What vLLM serves: the composed PEFT LoRA folder, loaded by PEFT, equals our view mode."""
    from peft import PeftModel, set_peft_model_state_dict

    bundle = to_bundle(alter, "tiny", "sha256:test")
    for view in (View(name="retain-only"), View(name="no-bio", forget={"bio": 1.0}),
                 View(name="no-both", forget={"bio": 1.0, "cyber": 1.0})):
        composed = compose(bundle, view, tmp_path / "views")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), composed.path).eval()
        with alter.mixing("view", retain=view.retain, forget=view.forget):
            ours = logits(alter, batch)
        assert torch.allclose(logits(peft_model, batch), ours, atol=ATOL), view.name
        # Same tensors through set_peft_model_state_dict (the in-memory route).
        set_peft_model_state_dict(peft_model, peft_tensors(bundle, view))
        assert torch.allclose(logits(peft_model, batch), ours, atol=ATOL)


def test_from_bundle_refuses_a_bundle_for_another_architecture(alter) -> None:
    bundle = to_bundle(alter, "tiny", "sha256:test")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                                         head_dim=64))
    with pytest.raises(ValueError, match="modules without adapters"):
        from_bundle(other, bundle)


# ---- GPU-readiness: no host sync in a layer's forward; the mixing tensors follow the module ------


@contextlib.contextmanager
def no_device_reads():
    """Fail on any Python-level read of a tensor's value: on CUDA each is a host sync."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor value was read back (a host sync on CUDA)")

    names = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("grad_heads", [None, ["bio"], ["retain", "bio", "cyber"]])
def test_an_adapted_layers_forward_and_backward_read_no_tensor_value(alter, grad_heads) -> None:
    """`_isolate` used to test `bool(grad_heads.all())` in every layer's forward: on CUDA, one
    host sync per adapted layer per forward. The decision is now a Python flag set with the heads."""
    layer = alter.layers["model.layers.0.mlp.down_proj"]
    x = torch.randn(2, 5, 256)
    with alter.mixing("view", forget={"bio": 1.0, "cyber": 1.0}, grad_heads=grad_heads):
        assert alter.mix.isolate == (grad_heads == ["bio"])
        with no_device_reads():
            layer(x).pow(2).sum().backward()
    grad = layer.lora_B.grad
    assert torch.count_nonzero(grad[:, 1]) > 0
    if grad_heads == ["bio"]:
        assert torch.count_nonzero(grad[:, 0]) == 0 and torch.count_nonzero(grad[:, 2]) == 0


def test_the_mixing_tensors_move_and_cast_with_the_module(alter, batch) -> None:
    """The view weights set at injection lived wherever the model was then: after a later move
    they stayed behind (e.g. on the CPU after from_bundle(...).to("cuda"))."""
    with torch.no_grad():
        before = alter(**batch).logits
    alter.set_grad_heads(["bio"])
    alter.to(torch.float64)
    assert alter.mix.weights.dtype == torch.float64 and alter.mix.keep.dtype == torch.bool
    with torch.no_grad():
        after = alter(**batch).logits
    assert after.dtype == torch.float64 and torch.allclose(after.float(), before, atol=1e-4)
    # Moving only the wrapped model (as the evaluation CLI does) carries them too.
    alter.model.to("meta")
    assert alter.mix.weights.device.type == "meta" and alter.mix.keep.device.type == "meta"
    assert not any(name.endswith(("mix.weights", "mix.keep")) for name in alter.state_dict())


def test_samples_mode_gives_each_row_its_own_view(alter, batch) -> None:
    """Row n under per-sample weights ω_n is the same as the whole batch under the view ω_n."""
    views = [{"bio": 1.0}, {"bio": 1.0, "cyber": 0.5}, {}]
    weights = torch.tensor([[1.0, *(view.get(h, 0.0) for h in HEADS)] for view in views])
    with alter.sample_mixing(weights, trainable=torch.eye(3, dtype=torch.bool)), torch.no_grad():
        mixed = alter(**batch).logits
    assert alter.mix.mode == "view"  # restored
    for row, view in enumerate(views):
        with alter.mixing("view", forget=view):
            torch.testing.assert_close(mixed[row], logits(alter, batch)[row], atol=ATOL, rtol=0)


def test_samples_mode_refuses_weights_for_another_batch_size(alter, batch) -> None:
    with alter.sample_mixing(torch.ones(2, 3)), pytest.raises(ValueError, match="head weights for 2 samples"):
        alter(**batch)
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        alter.set_samples(torch.ones(3, 2))
