"""Losses: ALTER's inverted hinge loss, retain NLL and head orthogonality; baselines GA, GradDiff, NPO.

Conventions. `logits` are [B, T, V] from a causal LM, `labels` [B, T] with IGNORE_INDEX (−100)
on tokens that carry no loss (prompt, padding). Every loss first applies the causal shift —
position t predicts label t + 1 — so an optional `mask` is [B, T − 1], aligned with the shifted
labels (this is the alignment `train.alter.entropy.example_entropies` produces). All reductions are in
fp32. Baseline definitions follow open-unlearning (locuslab/open-unlearning, `src/trainer/unlearn`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits[:, :-1], labels[:, 1:]): the prediction at t and the token it must predict."""
    return logits[:, :-1], labels[:, 1:]


def _targets(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None):
    logits, labels = shift(logits, labels)
    valid = labels != IGNORE_INDEX
    if mask is not None:
        valid = valid & mask.to(valid.device).bool()
    return logits, labels.clamp(min=0), valid


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask`; exactly 0 (with a graph) when the mask selects nothing."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def token_nll(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None):
    """(−log p(y_t) [B, T−1], valid [B, T−1]) after the shift."""
    logits, targets, valid = _targets(logits, labels, mask)
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return nll, valid


def nll_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean token NLL  L = −(1/N) Σ_t log p(y_t)  over labelled (and masked-in) tokens."""
    nll, valid = token_nll(logits, labels, mask)
    return masked_mean(nll, valid)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] summed NLL per sequence, −Σ_t log p(y_t) (open-unlearning's `compute_batch_nll`)."""
    nll, valid = token_nll(logits, labels)
    return (nll * valid).sum(dim=-1)


def inverted_hinge_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Inverted hinge loss (LoKU, Cha et al. 2024), mean over selected tokens:

        IHL_t = 1 + p(y_t) − max_{v ≠ y_t} p(v)          ∈ [0, 2]

    It pushes the true token down *and* the strongest competitor up, and is bounded below by 0
    (reached when p(y_t) = 0 and one other token has all the mass), so unlike gradient ascent it
    cannot diverge. Computed from the top-2 logits and the log-partition, never a [V] copy.
    """
    logits, targets, valid = _targets(logits, labels, mask)
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    true_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    top_values, top_index = logits.topk(2, dim=-1)
    rival = torch.where(top_index[..., 0] == targets, top_values[..., 1], top_values[..., 0])
    ihl = 1.0 + torch.exp(true_logit - log_z) - torch.exp(rival - log_z)
    return masked_mean(ihl, valid)


def sequence_mean_nll(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None):
    """([B] mean NLL per sequence over its selected tokens, [B] whether it has any)."""
    nll, valid = token_nll(logits, labels, mask)
    count = valid.sum(dim=-1)
    return (nll * valid).sum(dim=-1) / count.clamp(min=1), count > 0


def bounded_nll_ascent(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None,
                       target: float) -> torch.Tensor:
    """"Never learned" as a bounded objective: raise each answer's NLL up to `target`, no further.

        L = mean_i max(0, τ − L̄_i)          L̄_i: mean NLL of sequence i's selected tokens

    τ is the NLL level of answers the model never learned (the holdout authors' mean answer NLL
    under the model before unlearning, `train.alter.alter_run`). Below τ the gradient is that of gradient
    ascent on the sequence; at τ it is zero, so a forgotten answer stops being pushed and the head
    stops spending its capacity (and the retain data's) on driving it to zero probability. An
    answer that overshoots is not pulled back. Sequences without a selected token are left out.
    """
    mean_nll, has = sequence_mean_nll(logits, labels, mask)
    gap = torch.clamp(target - mean_nll, min=0.0)
    return masked_mean(gap, has)


def distribution_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over selected positions of KL(p_teacher ‖ p_student) of the next-token distributions:

        L = (1/N) Σ_t Σ_v p_T(v | y_<t) (log p_T(v | y_<t) − log p_S(v | y_<t))

    Forward KL, the distillation direction: the student must cover what the teacher would say.
    The teacher is a no-grad forward (the model before unlearning on retain data; the model
    before the forgotten data was learned, on forget data). Positions follow the causal shift of
    `labels`, like every loss here."""
    student, _, valid = _targets(student_logits, labels, mask)
    teacher = teacher_logits[:, :-1].detach().float()
    log_s = torch.log_softmax(student.float(), dim=-1)
    log_t = torch.log_softmax(teacher, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return masked_mean(kl, valid)


# ---- baselines (open-unlearning definitions) -----------------------------------------------------


def grad_ascent_loss(forget_logits: torch.Tensor, forget_labels: torch.Tensor) -> torch.Tensor:
    """GradAscent:  L = −NLL(forget)."""
    return -nll_loss(forget_logits, forget_labels)


def grad_diff_loss(forget_logits: torch.Tensor, forget_labels: torch.Tensor,
                   retain_logits: torch.Tensor, retain_labels: torch.Tensor,
                   gamma: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """GradDiff:  L = γ · (−NLL(forget)) + α · NLL(retain)."""
    return gamma * grad_ascent_loss(forget_logits, forget_labels) + alpha * nll_loss(retain_logits, retain_labels)


def npo_forget_loss(forget_logits: torch.Tensor, ref_logits: torch.Tensor, forget_labels: torch.Tensor,
                    beta: float = 0.1) -> torch.Tensor:
    """NPO (Zhang et al. 2024), open-unlearning's DPO form with only a "lose" answer:

        log r = log π_θ(y|x) − log π_ref(y|x) = NLL_ref − NLL_θ      (summed over answer tokens)
        L     = −(2/β) · mean_batch log σ(−β · log r)

    `ref_logits` come from the frozen reference model (no grad).
    """
    log_ratio = sequence_nll(ref_logits.detach(), forget_labels) - sequence_nll(forget_logits, forget_labels)
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def npo_loss(forget_logits: torch.Tensor, ref_logits: torch.Tensor, forget_labels: torch.Tensor,
             retain_logits: torch.Tensor, retain_labels: torch.Tensor,
             beta: float = 0.1, gamma: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """NPO as open-unlearning trains it:  L = γ · L_NPO(forget) + α · NLL(retain)."""
    forget = npo_forget_loss(forget_logits, ref_logits, forget_labels, beta)
    return gamma * forget + alpha * nll_loss(retain_logits, retain_labels)


# ---- ALTER's structural term ----------------------------------------------------------------------


def orthogonality_loss(stacked_heads: Sequence[torch.Tensor], head: int, others: Sequence[int]) -> torch.Tensor:
    """Normalised overlap of head `head` with the (detached) heads `others`, averaged over layers:

        L_⊥ = mean_layers mean_{j ∈ others} ‖B_hᵀ B_j‖_F² / (‖B_h‖_F² · ‖B_j‖_F²)     ∈ [0, 1]

    `stacked_heads` holds each layer's B as [out, H, r]. The other heads are detached, so the term
    only moves head `head` (isolation is kept: no step writes a head it does not own). The
    normalisation makes it scale-free: it rotates B_h's column space away from the others' instead
    of rewarding a smaller B_h.
    """
    if not others:
        return stacked_heads[0].new_zeros(())
    # Layers of one shape are stacked and done in one batched product: a model has a handful of
    # shapes but dozens of layers, and per-layer products are ~10 tiny kernels each, per step.
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for stacked in stacked_heads:
        by_shape.setdefault(tuple(stacked.shape), []).append(stacked)
    terms = []
    for same in by_shape.values():
        b = torch.stack(same).float()                    # [L, out, H, r]
        own = b[:, :, head]                              # [L, out, r]
        # Integer views, stacked: indexing with a Python list would copy an index tensor to the
        # device (a host sync on CUDA) in every step.
        rest = torch.stack([b[:, :, j] for j in others], dim=2).detach()   # [L, out, J, r]
        overlap = torch.einsum("lor,lojs->ljrs", own, rest).pow(2).sum(dim=(2, 3))      # [L, J]
        norms = own.pow(2).sum(dim=(1, 2)).unsqueeze(1) * rest.pow(2).sum(dim=(1, 3))   # [L, J]
        terms.append((overlap / norms.clamp(min=1e-12)).mean(dim=1))                     # [L]
    return torch.cat(terms).mean()
