"""Data-driven, non-zero initialisation of the heads B_r and B_d before Phase I.

Phase I trains only the shared A. Its gradient is ∂L/∂A = s · Σ_h ω_h B_hᵀ g xᵀ, which is zero
while every B_h = 0, so the heads must start non-zero. We start each head in the subspace its
own data occupies at that layer:

    Y_h = [W0 x_t]_t ∈ R^{N × out}     the base layer's outputs on head h's answer tokens
                                         (retain data for B_r, sub-domain d's data for B_d;
                                          the first `max_tokens` tokens of the batches given)
    B_r = c · U_r                       U_r: top-r right singular vectors of Y_r  ([out, r])
    B_d = c · U_d                       U_d: top-r right singular vectors of (Y_d − Y_d U_r U_rᵀ)

i.e. the r output directions that best reconstruct that head's activations. The first one is,
for uncentred data, the direction of the data's centroid, so B_d starts at the sub-domain's
cluster centroid plus its main spread. Forget heads are taken after projecting out B_r's
subspace, so each starts orthogonal to B_r (the same property the structural term then keeps).
Columns are orthonormal, scaled by `c = init_scale` (small), so the model at initialisation
is within O(c) of the base model.

The batches should be a random sample of each head's examples (the trainer passes a seeded
sample, `train.examples.sample_by_tokens`): the first rows of a TOFU-style file are one author's,
and a head started on one author's directions starts biased towards that author.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from train.alter.modeling import AlterModel, logits_at

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, token mask


@torch.no_grad()
def collect_outputs(alter: AlterModel, batches: Iterable[Batch], max_tokens: int = 512) -> dict[str, torch.Tensor]:
    """Per adapted module, the base layer outputs W0 x at the masked token positions: [N, out] fp32."""
    stores: dict[str, list[torch.Tensor]] = {name: [] for name in alter.layers}
    current: dict[str, torch.Tensor] = {}
    hooks = []
    for name, layer in alter.layers.items():
        def hook(module, inputs, output, name=name):
            stores[name].append(output[current["mask"]].detach().float().cpu())
        hooks.append(layer.base.register_forward_hook(hook))
    taken = 0
    try:
        with alter.mixing("off"):
            for input_ids, attention_mask, token_mask in batches:
                if taken >= max_tokens:
                    break
                mask = token_mask.bool() & attention_mask.bool()
                # Keep at most the remaining budget of tokens, in order.
                budget = max_tokens - taken
                positions = mask.flatten().nonzero().squeeze(-1)[budget:]
                mask.view(-1)[positions] = False
                # Rows are independent (causal, right-padded): only those holding a kept token are
                # run, and the output projection over the vocabulary (nothing here reads logits) on
                # no position at all.
                rows = mask.any(dim=1)
                current["mask"] = mask[rows]
                with logits_at(alter.model, torch.zeros(int(rows.sum()), 0, dtype=torch.long)):
                    alter(input_ids=input_ids[rows], attention_mask=attention_mask[rows])
                taken += int(mask.sum())
    finally:
        for handle in hooks:
            handle.remove()
    return {name: torch.cat(chunks) for name, chunks in stores.items() if chunks}


def top_directions(outputs: torch.Tensor, rank: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """[out, rank] orthonormal: top right singular vectors of `outputs` Y [N, out], after removing
    the span of `exclude` E ([out, k], orthonormal) from Y's rows: Y ← Y − Y E Eᵀ.

    One symmetric eigensolver on the smaller Gram matrix (fp32; several times faster than a full
    SVD, and the directions agree to 1e-6):

    * out ≤ N: the right singular vectors are the top eigenvectors of YᵀY [out, out];
    * N < out (wide layers, e.g. a 7B MLP with out = 11008 and N = 512 tokens): with Y Yᵀ u = σ² u,
      v = Yᵀ u / σ, so only an [N, N] problem is solved.

    Every direction found lies in the row space of the projected Y, hence ⟂ E. When there are
    fewer than `rank` informative directions (tiny data), the rest is filled with seeded random
    directions orthogonalised against those and against E.
    """
    y = outputs.float()
    e = exclude.float() if exclude is not None else None
    if e is not None:
        y = y - (y @ e) @ e.T
    n, out = y.shape
    if out <= n:
        values, vectors = torch.linalg.eigh(y.T @ y)          # ascending
        values, basis = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
    else:
        values, vectors = torch.linalg.eigh(y @ y.T)
        values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
        basis = (y.T @ vectors) / values.clamp(min=1e-30).sqrt()
    informative = values > values[:1].clamp(min=1e-30) * 1e-6
    basis = basis[:, informative]
    if basis.shape[1] < rank:
        basis = _fill(basis, rank, e)
    # Eigenvector signs are arbitrary; fix them so the centroid direction points along the data.
    signs = torch.sign(outputs.float().mean(0) @ basis)
    signs[signs == 0] = 1.0
    return basis * signs


def _fill(basis: torch.Tensor, rank: int, exclude: torch.Tensor | None) -> torch.Tensor:
    """`basis` [out, k] (orthonormal) completed to `rank` columns with seeded random directions
    orthogonal to it and to `exclude`."""
    out = basis.shape[0]
    extra = torch.randn(out, rank - basis.shape[1], generator=torch.Generator().manual_seed(0))
    fixed = basis if exclude is None else torch.cat([exclude, basis], dim=1)
    for _ in range(2):  # project twice: one Gram–Schmidt pass loses orthogonality in fp32
        extra = extra - fixed @ (fixed.T @ extra)
    extra, _ = torch.linalg.qr(extra)
    return torch.cat([basis, extra], dim=1)


@torch.no_grad()
def init_heads(
    alter: AlterModel,
    head_batches: dict[str, list[Batch]],
    init_scale: float = 1e-2,
    max_tokens: int = 512,
) -> dict[str, dict[str, torch.Tensor]]:
    """Set every head's B to `init_scale` × its data's top output directions (see module doc).

    `head_batches` maps head name ("retain" and each forget head) to that head's data.
    Returns the unscaled directions per head and module (for inspection and tests).
    """
    missing = sorted(set(alter.heads) - set(head_batches))
    if missing:
        raise ValueError(f"no initialisation data for heads {missing}")
    directions: dict[str, dict[str, torch.Tensor]] = {}
    retain_name = alter.heads[0]
    retain_outputs = collect_outputs(alter, head_batches[retain_name], max_tokens)
    directions[retain_name] = {m: top_directions(y, alter.rank) for m, y in retain_outputs.items()}
    for head in alter.forget_heads:
        outputs = collect_outputs(alter, head_batches[head], max_tokens)
        directions[head] = {m: top_directions(y, alter.rank, directions[retain_name][m]) for m, y in outputs.items()}
    for module, layer in alter.layers.items():
        for index, head in enumerate(alter.heads):
            layer.lora_B[:, index].copy_(init_scale * directions[head][module].to(layer.lora_B.device))
    return directions
