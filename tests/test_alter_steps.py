"""Phase I / Phase II steps: gradients reach exactly the parameters the method says, nothing else."""

from __future__ import annotations

import contextlib
import copy
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from train.alter.alter_steps import AlterStepConfig, AlterSteps, random_view, token_masks
from train.examples import Example, collate
from train.alter.head_init import collect_outputs, init_heads, top_directions
from train.alter.modeling import inject

TARGETS = ["q_proj", "v_proj", "down_proj"]
HEADS = ["bio", "cyber"]
THRESHOLD = 1.0


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64)
    return LlamaForCausalLM(config).eval()


def make_batch(seed: int, head: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(3):
        ids = torch.randint(3, 256, (10,), generator=generator).tolist()
        labels = [-100] * 4 + ids[4:]
        entropy = torch.rand(9, generator=generator) * 2  # about half above THRESHOLD
        examples.append(Example(tuple(ids), tuple(labels), head, entropy))
    return collate(examples, pad_id=0), examples


@pytest.fixture()
def alter(base):
    model = inject(copy.deepcopy(base), TARGETS, 8, 16.0, HEADS)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_B.normal_(0, 0.05)
    return model


def steps_for(alter, use_entropy: bool = True, head_prob: float = 1.0) -> AlterSteps:
    return AlterSteps(alter, AlterStepConfig(THRESHOLD, use_entropy, lam=0.01, head_prob=head_prob),
                      random.Random(0), contextlib.nullcontext)


def b_grads(alter) -> torch.Tensor:
    return torch.stack([layer.lora_B.grad if layer.lora_B.grad is not None else torch.zeros_like(layer.lora_B)
                        for layer in alter.layers.values()])


def a_grads(alter) -> list[torch.Tensor | None]:
    return [layer.lora_A.grad for layer in alter.layers.values()]


def set_phase(alter, a: bool, b: bool) -> None:
    for p in alter.lora_A_parameters():
        p.requires_grad_(a)
    for p in alter.lora_B_parameters():
        p.requires_grad_(b)


def test_phase1_trains_only_a_and_only_from_high_entropy_tokens(alter) -> None:
    set_phase(alter, a=True, b=False)
    batch, examples = make_batch(1)
    high, low = token_masks(batch, THRESHOLD, True)
    assert high.any() and low.any()
    steps_for(alter).phase1(batch)
    reference = [g.clone() for g in a_grads(alter)]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in reference)
    assert all(layer.lora_B.grad is None for layer in alter.layers.values())
    # Change every label at a low-entropy position: A's gradient must not change at all.
    alter.zero_grad(set_to_none=True)
    labels = batch.labels.clone()
    shifted = labels[:, 1:]
    shifted[low] = (shifted[low] + 7) % 256
    batch.labels = labels
    steps_for(alter).phase1(batch)
    assert all(torch.equal(g, r) for g, r in zip(a_grads(alter), reference))


def test_phase1_skips_batches_without_high_entropy_tokens(alter) -> None:
    set_phase(alter, a=True, b=False)
    batch, _ = make_batch(2)
    batch.entropy = torch.zeros_like(batch.entropy)
    assert steps_for(alter).phase1(batch) is None
    assert all(g is None for g in a_grads(alter))


def test_ablation_without_entropy_uses_every_token(alter) -> None:
    batch, _ = make_batch(1)
    high, low = token_masks(batch, THRESHOLD, use_entropy=False)
    valid = batch.labels[:, 1:] != -100
    assert torch.equal(high, valid) and torch.equal(low, valid)


@pytest.mark.parametrize("head", HEADS)
def test_forget_step_reaches_only_its_own_head(alter, head: str) -> None:
    set_phase(alter, a=False, b=True)
    batch, _ = make_batch(3, head=1 + HEADS.index(head))
    parts = steps_for(alter, head_prob=1.0).forget(batch, head)  # every head is on in the forward
    assert 0.0 <= parts["ihl"] <= 2.0
    grads = b_grads(alter)
    own = 1 + HEADS.index(head)
    assert torch.count_nonzero(grads[:, :, own]) > 0
    assert torch.count_nonzero(grads[:, :, [i for i in range(3) if i != own]]) == 0
    assert all(g is None for g in a_grads(alter))


def test_forget_step_uses_only_low_entropy_tokens(alter) -> None:
    set_phase(alter, a=False, b=True)
    batch, _ = make_batch(4, head=1)
    steps_for(alter, head_prob=0.0).forget(batch, "bio")
    reference = b_grads(alter).clone()
    alter.zero_grad(set_to_none=True)
    high, _ = token_masks(batch, THRESHOLD, True)
    labels = batch.labels.clone()
    labels[:, 1:][high] = (labels[:, 1:][high] + 5) % 256
    batch.labels = labels
    steps_for(alter, head_prob=0.0).forget(batch, "bio")
    assert torch.allclose(b_grads(alter), reference, atol=0, rtol=0)


def test_retain_step_reaches_only_the_retain_head(alter) -> None:
    set_phase(alter, a=False, b=True)
    batch, _ = make_batch(5)
    steps_for(alter, head_prob=1.0).retain(batch)
    grads = b_grads(alter)
    assert torch.count_nonzero(grads[:, :, 0]) > 0 and torch.count_nonzero(grads[:, :, 1:]) == 0


def test_retain_step_forward_includes_the_sampled_forget_heads(alter) -> None:
    """The detached forget heads change the retain loss (so B_r learns under the served views)."""
    set_phase(alter, a=False, b=True)
    batch, _ = make_batch(6)
    with_heads = float(steps_for(alter, head_prob=1.0).retain(batch)["nll"])
    without = float(steps_for(alter, head_prob=0.0).retain(batch)["nll"])
    assert with_heads != pytest.approx(without, abs=1e-6)


def test_random_view_always_contains_the_trained_head() -> None:
    rng = random.Random(0)
    views = [random_view(HEADS, rng, 0.5, include="bio") for _ in range(200)]
    assert all(v.get("bio") == 1.0 for v in views)
    share = sum("cyber" in v for v in views) / len(views)
    assert 0.35 < share < 0.65


def test_head_init_uses_each_heads_data_and_keeps_forget_heads_orthogonal_to_retain(alter) -> None:
    def batches(seed: int):
        batch, _ = make_batch(seed)
        yield batch.input_ids, batch.attention_mask, batch.labels != -100

    directions = init_heads(alter, {"retain": batches(10), "bio": batches(11), "cyber": batches(12)},
                            init_scale=0.02, max_tokens=64)
    layer_name = f"model.layers.0.self_attn.{TARGETS[0]}"
    layer = alter.layers[layer_name]
    retain, bio = directions["retain"][layer_name], directions["bio"][layer_name]
    assert torch.allclose(retain.T @ retain, torch.eye(8), atol=1e-5)  # orthonormal columns
    assert torch.allclose(retain.T @ bio, torch.zeros(8, 8), atol=1e-5)  # B_d ⟂ B_r at init
    assert torch.allclose(layer.lora_B[:, 1], 0.02 * bio)
    assert torch.allclose(layer.head(0).norm(dim=0), torch.full((8,), 0.02), atol=1e-6)


def test_collected_outputs_are_the_full_forwards_first_tokens(alter) -> None:
    """Running only the rows that hold a kept token, and no output projection, changes nothing:
    the first `max_tokens` masked outputs of a plain forward of every row."""
    batch, _ = make_batch(3)
    mask = (batch.labels != -100) & batch.attention_mask.bool()
    layer = alter.layers[f"model.layers.1.mlp.{TARGETS[-1]}"]
    seen = []
    handle = layer.base.register_forward_hook(lambda module, inputs, output: seen.append(output[mask]))
    with torch.no_grad(), alter.mixing("off"):
        alter(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    handle.remove()
    budget = int(mask[0].sum()) + 1  # the first row and one token of the second: the rest is not run
    got = collect_outputs(alter, [(batch.input_ids, batch.attention_mask, batch.labels != -100)], budget)
    torch.testing.assert_close(got[f"model.layers.1.mlp.{TARGETS[-1]}"], seen[0][:budget], atol=1e-6, rtol=1e-5)


def test_top_directions_recover_a_planted_subspace() -> None:
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(32, 2))
    outputs = torch.randn(200, 2) @ basis.T * 5 + torch.randn(200, 32) * 0.01
    found = top_directions(outputs, 2)
    assert torch.linalg.matrix_norm(found @ found.T - basis @ basis.T) < 0.05


def test_top_directions_stay_orthogonal_to_the_excluded_span_with_fewer_rows_than_rank() -> None:
    torch.manual_seed(1)
    exclude, _ = torch.linalg.qr(torch.randn(16, 4))
    outputs = torch.randn(3, 16)  # 3 informative directions, rank 8: 5 come from the zero eigenspace
    found = top_directions(outputs, 8, exclude)
    assert torch.allclose(found.T @ found, torch.eye(8), atol=1e-5)
    assert float((exclude.T @ found).abs().max()) < 1e-5


def test_top_directions_of_a_wide_layer_match_the_svd() -> None:
    """N < out (a wide MLP layer, few tokens): the [N, N] Gram path gives the SVD's directions."""
    torch.manual_seed(2)
    exclude, _ = torch.linalg.qr(torch.randn(300, 4))
    outputs = torch.randn(40, 6) @ torch.randn(6, 300) * 3 + torch.randn(40, 300) * 0.1
    found = top_directions(outputs, 5, exclude)
    projected = (outputs - outputs @ exclude @ exclude.T).double()
    expected = torch.linalg.svd(projected, full_matrices=False).Vh[:5].T
    assert torch.allclose((found.double().T @ expected).abs().diagonal(), torch.ones(5, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(found.T @ found, torch.eye(5), atol=1e-5)
    assert float((exclude.T @ found).abs().max()) < 1e-5


def test_phase2_steps_read_no_tensor_value(alter) -> None:
    """A Phase II step queues its work and returns device tensors: nothing waits for the GPU (the
    losses used to come back through .item(), and every adapted layer tested a device mask)."""
    from tests.test_modeling import no_device_reads

    set_phase(alter, a=False, b=True)
    batch, _ = make_batch(3, head=1)
    assert batch.padded is False and batch.model_mask is None
    steps = steps_for(alter, head_prob=0.5)
    with no_device_reads():
        forget = steps.forget(batch, "bio")
        retain = steps.retain(batch)
    for value in (*forget.values(), *retain.values()):
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad


def _one_clipped_step(alter, retain_grad_scale: float, per_head: bool) -> torch.Tensor:
    """B after one AdamW step on fixed gradients, the retain head's scaled; returns B_bio."""
    from train.optim import optimizer_step

    params = alter.lora_B_parameters()
    generator = torch.Generator().manual_seed(7)
    for p in params:
        grad = torch.randn(p.shape, generator=generator)
        grad[:, 0] *= retain_grad_scale
        p.grad = grad
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    optimizer_step(optimizer, params, max_norm=1e-3, per_head=per_head)
    return torch.stack([p[:, 1].detach().clone() for p in params])


def test_per_head_clipping_keeps_a_heads_update_independent_of_the_others(alter) -> None:
    """One norm over the stacked B (the old clipping) scales B_bio's gradient by the retain
    head's gradient norm; per-head clipping does not. Each step starts from a copy of one model."""
    small = _one_clipped_step(copy.deepcopy(alter), 1.0, per_head=True)
    large = _one_clipped_step(copy.deepcopy(alter), 1000.0, per_head=True)
    assert torch.equal(small, large)
    coupled_small = _one_clipped_step(copy.deepcopy(alter), 1.0, per_head=False)
    coupled_large = _one_clipped_step(copy.deepcopy(alter), 1000.0, per_head=False)
    assert not torch.equal(coupled_small, coupled_large)


def test_clip_head_grad_norms_clips_each_head_to_the_bound_across_layers() -> None:
    from train.optim import clip_head_grad_norms

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(6, 3, 2)), torch.nn.Parameter(torch.zeros(4, 3, 2))]
    for p, scale in zip(params, (1.0, 2.0)):
        p.grad = torch.randn(p.shape) * scale
        p.grad[:, 2] *= 1e-3  # head 2 is below the bound: left as it is
    head2 = [p.grad[:, 2].clone() for p in params]
    norms = clip_head_grad_norms(params, max_norm=0.5)
    after = torch.stack([sum(p.grad[:, h].pow(2).sum() for p in params).sqrt() for h in range(3)])
    assert bool((norms[:2] > 0.5).all()) and float(norms[2]) < 0.5
    assert torch.allclose(after[:2], torch.full((2,), 0.5), atol=1e-5)
    assert all(torch.equal(p.grad[:, 2], g) for p, g in zip(params, head2))
