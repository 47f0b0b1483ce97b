"""The optimizer step every training loop takes: clip the gradients, step, clear them.

ALTER's heads are clipped one head at a time. Each layer stores its heads stacked, B [out, H, r],
so torch's `clip_grad_norm_` over those parameters would compute one norm over all heads and
scale every head by it: B_d's update would then depend on the retain head's and the other
forget heads' gradients, which breaks the exact isolation of `train.alter.alter_steps`. AdamW itself
is element-wise, so per-head clipping is all it takes to keep a head's update its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def clip_head_grad_norms(stacked_heads: Sequence[torch.Tensor], max_norm: float,
                         eps: float = 1e-6) -> torch.Tensor | None:
    """Clip every head's gradient on its own, across all layers (in place).

    With g_{l,h} the gradient of B_h in layer l (`stacked_heads` holds each layer's B as
    [out, H, r]):

        n_h = sqrt(Σ_l ‖g_{l,h}‖_F²),     g_{l,h} ← g_{l,h} · min(1, max_norm / (n_h + eps))

    which is `torch.nn.utils.clip_grad_norm_` applied to each head separately. One norm over the
    whole stacked parameter would make B_d's step depend on the other heads' gradients. Returns the
    [H] norms before clipping (on the device: nothing is read back), or None without gradients.
    """
    grads = [p.grad for p in stacked_heads if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack([g.float().pow(2).sum(dim=(0, 2)) for g in grads]).sum(dim=0).sqrt()
    scale = (max_norm / (norms + eps)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype).view(1, -1, 1))
    return norms


def optimizer_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float | None,
                   per_head: bool = False) -> None:
    """Clip gradients to `max_norm` (None: no clipping), step, clear the gradients.

    `per_head`: `params` are ALTER's stacked heads [out, H, r], and every head is clipped on its
    own across all layers (`clip_head_grad_norms`), so a head's update never depends on another
    head's gradient. Otherwise one global norm over `params` (torch's clip_grad_norm_).
    """
    if max_norm is not None:
        if per_head:
            clip_head_grad_norms(params, max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based) of `total`:

        f = (step + 1) / warmup                      while step < warmup
        f = 1 (constant) or (total − step) / (total − warmup) (linear decay to 0 at the end)

    A pure function of the step, so a resumed run sets exactly the rate the uninterrupted run had."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
