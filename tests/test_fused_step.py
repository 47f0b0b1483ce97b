"""The fused Phase II step gives every head the gradient of the sequential steps (train.alter.fused_step)."""

from __future__ import annotations

import contextlib
import copy
import random

import pytest
import torch

from tests.test_alter_steps import HEADS, THRESHOLD, b_grads, base, set_phase  # noqa: F401 (fixture)
from train.alter.alter_steps import AlterStepConfig, AlterSteps
from train.examples import Example, collate
from train.alter.fused_step import (FusedPhase2, compact_positions, concat_batches, draw_views, groups_of, head_orthogonality,
                                    row_mixing)
from train.alter.modeling import inject, logits_at
from train.objectives import orthogonality_loss

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture()
def alter(base):  # noqa: F811
    model = inject(copy.deepcopy(base), TARGETS, 8, 16.0, HEADS)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_B.normal_(0, 0.05)
    set_phase(model, a=False, b=True)
    return model


def ragged_batch(seed: int, head: int, lengths: tuple[int, ...]):
    """A host batch of rows of the given lengths (so rows and batches are padded differently)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(3, 256, (n,), generator=generator).tolist()
        labels = [-100] * 3 + ids[3:]
        examples.append(Example(tuple(ids), tuple(labels), head, torch.rand(n - 1, generator=generator) * 2))
    return collate(examples, pad_id=0)


def batches(seed: int) -> tuple[dict, object]:
    forget = {"bio": ragged_batch(seed, 1, (9, 12, 7)), "cyber": ragged_batch(seed + 1, 2, (10, 10))}
    return forget, ragged_batch(seed + 2, 0, (14, 6, 11, 8))


def config(head_prob: float) -> AlterStepConfig:
    return AlterStepConfig(THRESHOLD, True, beta=1.3, gamma=0.7, lam=0.05, head_prob=head_prob)


def assert_same_heads(reference, alter, expected: dict, got) -> None:
    """Every head's gradient (non-zero) and loss of the fused step equal the sequential step's."""
    want, have = b_grads(reference), b_grads(alter)
    for index in range(len(HEADS) + 1):
        assert torch.count_nonzero(want[:, :, index]) > 0
        torch.testing.assert_close(have[:, :, index], want[:, :, index], atol=1e-5, rtol=1e-5)
    for head, loss in expected.items():
        torch.testing.assert_close(got.per_head[head], loss, atol=1e-6, rtol=1e-5)


def sequential(alter, forget, retain, cfg, seed) -> dict:
    steps = AlterSteps(alter, cfg, random.Random(seed), contextlib.nullcontext)
    losses = {head: steps.forget(batch, head)["ihl"] for head, batch in forget.items()}
    losses["retain"] = steps.retain(retain)["nll"]
    return losses


def fused(alter, forget, retain, cfg, seed):
    return FusedPhase2(alter, cfg, random.Random(seed), contextlib.nullcontext, pad_id=0).step(forget, retain)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("head_prob", [0.0, 0.5, 1.0])
def test_every_heads_gradient_equals_the_sequential_steps(alter, seed: int, head_prob: float) -> None:
    forget, retain = batches(10 * seed)
    cfg = config(head_prob)
    reference = copy.deepcopy(alter)
    expected = sequential(reference, forget, retain, cfg, seed)
    got = fused(alter, forget, retain, cfg, seed)
    assert_same_heads(reference, alter, expected, got)


def test_both_paths_draw_the_same_views() -> None:
    """Same RNG state: the fused step's views are the ones the sequential steps draw, in order."""
    cfg = config(0.5)
    drawn = draw_views(HEADS, HEADS, random.Random(3), cfg.head_prob, cfg.retain_nonempty)
    steps_rng = random.Random(3)
    from train.alter.alter_steps import random_view

    expected = {h: random_view(HEADS, steps_rng, 0.5, include=h) for h in HEADS}
    expected["retain"] = random_view(HEADS, steps_rng, 0.5, nonempty=True)
    assert drawn == expected and list(drawn) == [*HEADS, "retain"]


def test_a_heads_gradient_ignores_the_other_groups_rows(alter) -> None:
    """B_bio's gradient is the same, bit for bit, whatever the labels of cyber's or retain's rows."""
    forget, retain = batches(5)
    fused(alter, forget, retain, config(1.0), 0)
    bio = b_grads(alter)[:, :, 1].clone()
    alter.zero_grad(set_to_none=True)
    for batch in (forget["cyber"], retain):
        labelled = batch.labels != -100
        batch.labels = torch.where(labelled, (batch.labels + 11) % 256, batch.labels)
    fused(alter, forget, retain, config(1.0), 0)
    after = b_grads(alter)
    assert torch.equal(after[:, :, 1], bio)
    assert not torch.equal(after[:, :, 0], torch.zeros_like(after[:, :, 0]))


def test_compact_positions_keep_each_rows_masked_positions_in_order() -> None:
    masks = torch.tensor([[False, True, False, True], [False, False, False, False], [True, True, True, False]])
    labels = torch.arange(15).reshape(3, 5)
    index, compact, keep = compact_positions(masks, labels)
    assert index.tolist() == [[1, 3, 0, 0], [0, 0, 0, 0], [0, 1, 2, 0]]
    assert compact.tolist() == [[-100, 2, 4, -100], [-100, -100, -100, -100], [-100, 11, 12, 13]]
    assert keep.tolist() == [[True, True, False], [False, False, False], [True, True, True]]


def test_logits_are_computed_at_the_loss_positions_only(alter) -> None:
    """The output projection sees only the hidden states at the index: [N, J, V] logits, equal to
    the full logits there."""
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[4, 0, 2], [1, 5, 5]])
    full = alter(input_ids=ids).logits
    with logits_at(alter.model, index) as compact:
        picked = alter(input_ids=ids).logits
    assert compact and picked.shape == (2, 3, full.shape[-1])
    torch.testing.assert_close(picked, torch.stack([full[0, [4, 0, 2]], full[1, [1, 5, 5]]]))


def test_a_model_without_an_output_projection_hook_fuses_exactly(alter, monkeypatch) -> None:
    """Without `get_output_embeddings` the full logits are computed and then gathered: the same
    gradients as the sequential step."""
    forget, retain = batches(7)
    cfg = config(0.5)
    reference = copy.deepcopy(alter)
    expected = sequential(reference, forget, retain, cfg, 1)
    monkeypatch.setattr(alter.model, "get_output_embeddings", lambda: None)
    got = fused(alter, forget, retain, cfg, 1)
    assert_same_heads(reference, alter, expected, got)


def test_head_orthogonality_matches_the_per_head_term(alter) -> None:
    params = alter.lora_B_parameters()
    heads = len(HEADS) + 1
    every = head_orthogonality(params)
    for h in range(heads):
        one = orthogonality_loss(params, h, [j for j in range(heads) if j != h])
        torch.testing.assert_close(every[h], one, atol=1e-7, rtol=1e-6)


def test_rows_are_padded_to_the_widest_batch_only_and_mixed_per_group() -> None:
    forget, retain = batches(0)
    fused_batch = concat_batches([*forget.values(), retain], pad_id=0)
    assert fused_batch.input_ids.shape == (9, 14) and fused_batch.padded
    assert torch.equal(fused_batch.attention_mask.sum(1), torch.tensor([9, 12, 7, 10, 10, 14, 6, 11, 8]))
    views = {"bio": {"bio": 1.0}, "cyber": {"cyber": 1.0, "bio": 1.0}, "retain": {"cyber": 1.0}}
    groups = groups_of({**forget, "retain": retain}, views)
    weights, trainable = row_mixing(["retain", *HEADS], groups)
    assert weights[:, 0].eq(1).all()
    assert weights[0].tolist() == [1.0, 1.0, 0.0] and weights[3].tolist() == [1.0, 1.0, 1.0]
    assert trainable.sum(1).eq(1).all()
    assert trainable[:3, 1].all() and trainable[3:5, 2].all() and trainable[5:, 0].all()


def test_the_fused_step_reads_no_tensor_value(alter) -> None:
    from tests.test_modeling import no_device_reads

    forget, retain = batches(1)
    step = FusedPhase2(alter, config(0.5), random.Random(0), contextlib.nullcontext, pad_id=0)
    with no_device_reads():
        losses = step.step(forget, retain)
    assert all(v.dim() == 0 and not v.requires_grad for v in losses.per_head.values())


def test_a_missing_head_batch_is_refused(alter) -> None:
    forget, retain = batches(2)
    del forget["cyber"]
    with pytest.raises(ValueError, match="missing \\['cyber'\\]"):
        fused(alter, forget, retain, config(0.5), 0)


def test_a_training_run_is_the_same_fused_or_sequential(tmp_path) -> None:
    """The trainer's Phase II with optim.fused_step on and off: same views, same losses, same heads."""
    from alter_serve.core.bundle import load_bundle
    from tests.test_trainer import tiny_config
    from tests.tiny_model import build_tiny_model
    from train.data.synthetic import generate
    from train.run import run

    model_dir = build_tiny_model(tmp_path / "model")
    data_dir = generate(n_authors=8, facts_per_author=2, subdomains=("alpha", "beta", "gamma", "delta"),
                        seed=3).save(tmp_path / "data")
    runs = {}
    for fused_step in (True, False):
        config = tiny_config(model_dir, data_dir, tmp_path / f"run-{fused_step}",
                             optim={"router_epochs": 0, "fused_step": fused_step})
        config.calibration.enabled = False
        runs[fused_step] = run(config)
    fused_run, sequential_run = runs[True], runs[False]
    losses = fused_run.report["losses"]
    assert set(losses) == set(sequential_run.report["losses"]) and len(losses["phase2/ihl_alpha"]) == 4
    for series, values in sequential_run.report["losses"].items():
        assert losses[series] == pytest.approx(values, rel=1e-4, abs=1e-6), series
    fused_tensors = load_bundle(fused_run.bundle_dir).to_tensors()
    for name, tensor in load_bundle(sequential_run.bundle_dir).to_tensors().items():
        torch.testing.assert_close(fused_tensors[name], tensor, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_and_bf16_autocast_keep_the_fused_step_working(alter) -> None:
    """Recomputation in the backward sees the per-sample weights (the backward runs inside the
    mixing block), and under bf16 autocast (CPU here, CUDA in training) the gradients stay close."""
    forget, retain = batches(7)
    cfg = config(0.5)
    alter.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    alter.train()
    reference = copy.deepcopy(alter)
    sequential(reference, forget, retain, cfg, 0)
    fused(alter, forget, retain, cfg, 0)
    torch.testing.assert_close(b_grads(alter), b_grads(reference), atol=1e-5, rtol=1e-5)
    alter.zero_grad(set_to_none=True)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    FusedPhase2(alter, cfg, random.Random(0), bf16, pad_id=0).step(forget, retain)
    got, want = b_grads(alter), b_grads(reference)
    assert float((got - want).norm() / want.norm()) < 0.05


def _teacher(base):  # noqa: F811
    """A frozen model with other weights than the base: the kl_pre teacher."""
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return lambda batch: teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


@pytest.mark.parametrize("forget_loss", ["bounded_nll", "kl_pre"])
def test_the_objectives_beyond_the_paper_fuse_exactly(alter, base, forget_loss: str) -> None:  # noqa: F811
    """Bounded NLL on answer tokens, or KL to a teacher, plus the retain KL to the adapters-off
    base: every head's gradient and loss equal the sequential step's."""
    forget, retain = batches(7)
    cfg = AlterStepConfig(THRESHOLD, True, beta=1.3, gamma=0.7, lam=0.05, head_prob=0.5, forget_loss=forget_loss,
                          forget_tokens="answer", forget_target=9.0, retain_kl=0.8)
    teacher = _teacher(base) if forget_loss == "kl_pre" else None
    reference = copy.deepcopy(alter)
    steps = AlterSteps(reference, cfg, random.Random(1), contextlib.nullcontext, forget_teacher=teacher)
    expected = {head: steps.forget(batch, head)[forget_loss] for head, batch in forget.items()}
    retain_parts = steps.retain(retain)
    got = FusedPhase2(alter, cfg, random.Random(1), contextlib.nullcontext, pad_id=0,
                      forget_teacher=teacher).step(forget, retain)
    assert_same_heads(reference, alter, expected, got)
    torch.testing.assert_close(got.retain_kl, retain_parts["kl"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("retain_kl", [0.0, 0.8])
def test_retain_anchors_fuse_exactly(alter, retain_kl: float) -> None:
    """forget_anchor: each forget head's KL on its own retain rows under its own view reaches that
    head alone, and the fused step gives every head the sequential step's gradient and losses."""
    forget, retain = batches(3)
    anchors = {"bio": ragged_batch(41, 0, (8, 13)), "cyber": ragged_batch(42, 0, (5, 9, 12))}
    cfg = AlterStepConfig(THRESHOLD, True, beta=1.3, gamma=0.7, lam=0.05, head_prob=0.5, forget_loss="bounded_nll",
                          forget_tokens="answer", forget_target=9.0, retain_kl=retain_kl, forget_anchor=2.5)
    reference = copy.deepcopy(alter)
    steps = AlterSteps(reference, cfg, random.Random(5), contextlib.nullcontext)
    parts = {head: steps.forget(batch, head, anchors[head]) for head, batch in forget.items()}
    expected = {head: p["bounded_nll"] for head, p in parts.items()}
    expected["retain"] = steps.retain(retain)["nll"]
    got = FusedPhase2(alter, cfg, random.Random(5), contextlib.nullcontext, pad_id=0).step(forget, retain, anchors)
    assert_same_heads(reference, alter, expected, got)
    for head in forget:
        assert float(got.anchor[head]) > 0
        torch.testing.assert_close(got.anchor[head], parts[head]["anchor"], atol=1e-6, rtol=1e-5)
    assert (got.retain_kl is None) == (retain_kl == 0)


def test_an_anchored_step_without_anchors_is_refused(alter) -> None:
    forget, retain = batches(3)
    cfg = AlterStepConfig(THRESHOLD, True, forget_anchor=1.0)
    with pytest.raises(ValueError, match="forget_anchor"):
        FusedPhase2(alter, cfg, random.Random(0), contextlib.nullcontext, pad_id=0).step(forget, retain)
    with pytest.raises(ValueError, match="forget_anchor"):
        AlterSteps(alter, cfg, random.Random(0), contextlib.nullcontext).forget(forget["bio"], "bio")
