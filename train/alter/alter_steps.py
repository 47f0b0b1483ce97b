"""ALTER's two training phases, one optimizer step at a time.

Phase I — the shared A learns the high-entropy tokens. B is frozen (data-initialised, see
`train.alter.head_init`); the loss is the NLL of the tokens whose base-model entropy S_q exceeds the
threshold, on forget and retain data alike:

    L_I = NLL(y_t : S_q(t) > τ_S)                    (only A has requires_grad)

Phase II — the heads, A frozen. One optimizer step sums, for every forget head d, a step on a
batch of d's own data, and one step on a retain batch:

    L_d = β · IHL(y_t : S_q(t) ≤ τ_S, sub-domain d)  + λ · L_⊥(B_d | others)   → only B_d
    L_r = γ · NLL(retain)                              + λ · L_⊥(B_r | others)   → only B_r

Isolation is exact: each forward names the one head that may receive gradients; the other heads
that are switched on are detached (`AlterModel.set_grad_heads`), A has requires_grad off, and
the orthogonality term L_⊥ treats the other heads as constants. The optimizer step keeps it so:
gradients are clipped per head (`train.optim.clip_head_grad_norms`), since one norm over the
stacked B would scale B_d's step by the other heads' gradient norms; AdamW is element-wise.

Views during training. Tenants get static views B_r + Σ_{d∈V} B_d on *all* tokens, so every
training forward is such a view: the forget step for d runs the view {r, d} plus each other
forget head with probability p (detached), and the retain step runs {r} plus each forget head
with probability p (detached), redrawn until at least one forget head is on (`retain_nonempty`:
B_r alone is never served — the "original" view is the base model without any LoRA — so retain
steps are spent on the views tenants get). B_r thereby learns to keep retain data intact under
the forget heads a tenant switches on, without any forget head ever seeing retain gradients.

Why the forget step keeps B_r in its forward: B_d then has to break sub-domain d *despite* B_r's
repair of whatever B_r learned to repair on retain data. Damage that B_r undoes (generic damage,
e.g. to answer templates shared with retain data) stops paying off for B_d, so B_d is pushed
towards damage specific to its sub-domain — the same pressure GradDiff gets from one shared
parameter, obtained here without any retain gradient reaching B_d. (Dropping B_r from the forget
forward removes that pressure: B_r's repair then generalises to the forget data and undoes much
of the forgetting in the served view.) The cost: heads trained this way are tuned per view, and
a view that combines several forget heads can hurt retain data more than each single-head view
(the report measures every single-head view and the all-heads view). Served views therefore use
the calibrated head weight ω(n) for n heads (`train.alter.calibration`), chosen after training.

`use_entropy=False` is the ablation "AsymLoRA without entropy guidance": every answer token is
both "high" (Phase I) and "low" (Phase II).

Beyond the paper (each an option of `AlterStepConfig`, the paper's recipe is the default):

* `forget_loss`: the forget term L_d. "ihl" is the paper's IHL. "bounded_nll" raises each
  answer's NLL to the never-learned level τ and stops there (`objectives.bounded_nll_ascent`):
  the target is an answer the model never learned, not an answer driven to probability zero.
  "kl_pre" distils, on the forget answers, the model from before the forgotten data was learned
  (`objectives.distribution_kl` against a teacher forward).
* `forget_tokens`: "low_entropy" (the paper) or "answer": every answer token but the closing EOS,
  which retain data shares (pushing it down teaches the head to break every answer's end).
* `retain_kl` κ adds κ · KL(p_base ‖ p_view) on the retain answers, with the base model (adapters
  off, free in ALTER) as the teacher: the retain head keeps the base model's whole next-token
  distribution under the served views, not only the probability of the gold token.
* `forget_anchor` κ_a gives every forget head a retain anchor: the forget step for d adds
  κ_a · KL(p_base ‖ p_view) on a small retain batch run under d's own view, with the gradient to
  B_d only, like L_d:

      L_d = β · F(forget_d) + κ_a · KL(p_base ‖ p_{view_d})(retain) + λ · L_⊥(B_d | others)

  Without it nothing tells B_d which damage is its sub-domain's and which is everyone's: a head
  that raises its answers' NLL learns the cheapest direction, "break answers in this format", and
  only B_r (one head against all of them) pushes back. Measured on SmolLM2 (bounded NLL, no
  anchor): retain NLL 0.02 → 3–8 under the single-head views. Isolation between the heads stays
  exact: the anchor's gradient reaches B_d alone, like the rest of L_d; what B_d now sees is
  retain *text*, never the retain head's loss or another head's parameters.

No host sync per step: the steps take host (CPU) batches, make every data-dependent decision
(does this batch have a high-entropy token?) on the host copy, and copy the batch to the model's
device asynchronously (`Batch.to`). Losses come back as detached 0-dim device tensors; the caller
reads them in bulk (the trainer once per epoch).

Every step runs forward *and* backward inside the `mixing` block, so that activation
recomputation under gradient checkpointing sees the same head weights as the forward did.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from train.alter.entropy import high_entropy_mask, low_entropy_mask
from train.examples import Batch
from train.alter.modeling import AlterModel
from train.objectives import (
    IGNORE_INDEX,
    bounded_nll_ascent,
    distribution_kl,
    inverted_hinge_loss,
    nll_loss,
    orthogonality_loss,
)

FORGET_LOSSES = ("ihl", "bounded_nll", "kl_pre")
FORGET_TOKENS = ("low_entropy", "answer")
Teacher = Callable[[Batch], torch.Tensor]   # a batch → logits, computed without gradients


@dataclass
class AlterStepConfig:
    threshold: float
    use_entropy: bool = True
    beta: float = 1.0
    gamma: float = 1.0
    lam: float = 0.01
    head_prob: float = 0.5
    retain_nonempty: bool = True  # the retain step never runs B_r alone (no tenant is served B_r alone)
    forget_loss: str = "ihl"
    forget_tokens: str = "low_entropy"
    forget_target: float | None = None   # τ of bounded_nll
    retain_kl: float = 0.0
    forget_anchor: float = 0.0           # κ_a: each forget head's retain KL under its own view

    def __post_init__(self) -> None:
        if self.forget_loss not in FORGET_LOSSES:
            raise ValueError(f"unknown forget_loss {self.forget_loss!r}; use one of {FORGET_LOSSES}")
        if self.forget_tokens not in FORGET_TOKENS:
            raise ValueError(f"unknown forget_tokens {self.forget_tokens!r}; use one of {FORGET_TOKENS}")
        if self.forget_loss == "bounded_nll" and self.forget_target is None:
            raise ValueError("forget_loss 'bounded_nll' needs forget_target (the never-learned NLL level)")


def answer_mask_without_eos(labels: torch.Tensor) -> torch.Tensor:
    """[B, T−1] the labelled (shifted) tokens minus each row's last one, the closing EOS."""
    valid = labels[:, 1:] != IGNORE_INDEX
    positions = torch.arange(valid.shape[1], device=labels.device).expand_as(valid)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=-1, keepdim=True)
    return valid & (positions != last)


def forget_token_mask(batch: Batch, config: AlterStepConfig) -> torch.Tensor:
    """[B, T−1] the tokens the forget loss sees (`config.forget_tokens`): the low-entropy answer
    tokens (the paper), or every answer token but the closing EOS."""
    if config.forget_tokens == "answer":
        return answer_mask_without_eos(batch.labels)
    return token_masks(batch, config.threshold, config.use_entropy)[1]


def forget_term(config: AlterStepConfig, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                teacher: torch.Tensor | None = None) -> torch.Tensor:
    """L_d (without β) on one head's rows, as `config.forget_loss` says; `teacher` is the kl_pre
    teacher's logits for the same rows."""
    if config.forget_loss == "bounded_nll":
        return bounded_nll_ascent(logits, labels, mask, config.forget_target)
    if config.forget_loss == "kl_pre":
        return distribution_kl(logits, teacher, labels, mask)
    return inverted_hinge_loss(logits, labels, mask)


def token_masks(batch: Batch, threshold: float, use_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) boolean masks [B, T−1] over the labelled (shifted) tokens."""
    valid = batch.labels[:, 1:] != IGNORE_INDEX
    if not use_entropy:
        return valid, valid
    if batch.entropy is None:
        raise ValueError("entropy-guided training needs per-token entropies on the batch")
    return high_entropy_mask(batch.entropy, valid, threshold), low_entropy_mask(batch.entropy, valid, threshold)


def random_view(forget_heads: list[str], rng: random.Random, prob: float, include: str | None = None,
                nonempty: bool = False) -> dict[str, float]:
    """Forget-head weights of a random view: `include` always on, every other head with prob `prob`.

    `nonempty` redraws until at least one forget head is on (the views tenants are served).
    """
    while True:
        view = {h: 1.0 for h in forget_heads if h == include or rng.random() < prob}
        if view or not nonempty or not forget_heads or prob <= 0:
            return view


class AlterSteps:
    """The per-step losses of Phase I and Phase II for one AlterModel.

    Batches may live anywhere (host batches are best: see the module docstring); each step moves
    its batch to the model's device. Every step returns detached 0-dim tensors.
    """

    def __init__(self, alter: AlterModel, config: AlterStepConfig, rng: random.Random,
                 autocast: Callable[[], AbstractContextManager], forget_teacher: Teacher | None = None):
        if config.forget_loss == "kl_pre" and forget_teacher is None:
            raise ValueError("forget_loss 'kl_pre' needs a teacher: the model before the forget data was learned")
        self.alter, self.config, self.rng, self.autocast = alter, config, rng, autocast
        self.forget_teacher = forget_teacher

    def _logits(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            return self.alter(input_ids=batch.input_ids, attention_mask=batch.model_mask).logits

    def trains_phase1(self, batch: Batch) -> bool:
        """Whether `batch` has a high-entropy token (read it on a host batch: no device sync)."""
        high, _ = token_masks(batch, self.config.threshold, self.config.use_entropy)
        return bool(high.any())

    def phase1(self, batch: Batch) -> torch.Tensor | None:
        """Backward of L_I on one batch; None (no work) when it has no high-entropy token."""
        if not self.trains_phase1(batch):
            return None
        batch = batch.to(self.alter.device)
        high, _ = token_masks(batch, self.config.threshold, self.config.use_entropy)
        with self.alter.mixing("view", forget=random_view(self.alter.forget_heads, self.rng, self.config.head_prob)):
            loss = nll_loss(self._logits(batch), batch.labels, high)
            loss.backward()
        return loss.detach()

    def forget(self, batch: Batch, head: str, anchor: Batch | None = None) -> dict[str, torch.Tensor]:
        """Backward of L_d on a batch of sub-domain `head` (and, with `forget_anchor`, the retain
        batch `anchor` under the same view); gradients reach B_head only."""
        if self.config.forget_anchor > 0 and anchor is None:
            raise ValueError("forget_anchor needs a retain batch for every forget step")
        batch = batch.to(self.alter.device)
        mask = self.forget_mask(batch)
        teacher = self._teacher_logits(batch) if self.config.forget_loss == "kl_pre" else None
        anchored = self.config.forget_anchor > 0
        if anchored:
            anchor = anchor.to(self.alter.device)
            anchor_base = self._base_logits(anchor)
        view = random_view(self.alter.forget_heads, self.rng, self.config.head_prob, include=head)
        parts = {}
        with self.alter.mixing("view", forget=view, grad_heads=[head]):
            forget = self.forget_objective(self._logits(batch), batch, mask, teacher)
            structure = self._orthogonality(head)
            loss = self.config.beta * forget + self.config.lam * structure
            if anchored:
                kl = distribution_kl(self._logits(anchor), anchor_base, anchor.labels)
                loss = loss + self.config.forget_anchor * kl
                parts["anchor"] = kl.detach()
            loss.backward()
        return {self.config.forget_loss: forget.detach(), "orth": structure.detach(), **parts}

    def forget_mask(self, batch: Batch) -> torch.Tensor:
        return forget_token_mask(batch, self.config)

    def forget_objective(self, logits: torch.Tensor, batch: Batch, mask: torch.Tensor,
                         teacher: torch.Tensor | None = None) -> torch.Tensor:
        return forget_term(self.config, logits, batch.labels, mask, teacher)

    def retain(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Backward of L_r on a retain batch; gradients reach B_r only."""
        batch = batch.to(self.alter.device)
        base = self._base_logits(batch) if self.config.retain_kl > 0 else None
        view = random_view(self.alter.forget_heads, self.rng, self.config.head_prob,
                           nonempty=self.config.retain_nonempty)
        with self.alter.mixing("view", forget=view, grad_heads=[self.alter.heads[0]]):
            logits = self._logits(batch)
            nll = nll_loss(logits, batch.labels)
            loss = self.config.gamma * nll
            parts = {"nll": nll.detach()}
            if base is not None:
                kl = distribution_kl(logits, base, batch.labels)
                loss = loss + self.config.retain_kl * kl
                parts["kl"] = kl.detach()
            structure = self._orthogonality(self.alter.heads[0])
            (loss + self.config.lam * structure).backward()
        return {**parts, "orth": structure.detach()}

    @torch.no_grad()
    def _base_logits(self, batch: Batch) -> torch.Tensor:
        """The base model's logits (adapters off): the teacher of the retain KL and the anchors."""
        with self.alter.mixing("off"):
            return self._logits(batch)

    @torch.no_grad()
    def _teacher_logits(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            return self.forget_teacher(batch)

    def _orthogonality(self, head: str) -> torch.Tensor:
        index = self.alter.head_index(head)
        others = [i for i in range(len(self.alter.heads)) if i != index]
        return orthogonality_loss(self.alter.lora_B_parameters(), index, others)
