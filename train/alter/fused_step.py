"""ALTER's Phase II step, fused: every head trained in one forward and one backward.

The sequential step (`train.alter.alter_steps`: `AlterSteps.forget` per forget head, then
`AlterSteps.retain`) runs one forward and backward per head, each on its own batch under its own
random view. The fused step concatenates those batches into one batch of N rows (right-padded to
the longest row only) and gives every row the view of the group it came from
(`AlterModel.sample_mixing`). A row of group g, trained head h_g, view V_g, runs

    B_n = B_r + Σ_{d ∈ V_g} w_d B_d            with only B_{h_g} trainable, the others detached

so one forward gives every group the logits its own sequential forward gives, and

    L = β Σ_d F(logits_d, labels_d, low_d) + γ R(logits_r, labels_r) + λ Σ_h L_⊥(B_h | others)

has, head by head, the gradient of the sequential steps' summed losses: B_h's gradient comes from
its own group's rows only (elsewhere its weight goes through B.detach()) and from its own L_⊥
term (the other heads detached there). One backward; per-head clipping follows as before
(`train.optim.clip_head_grad_norms`).

Anchors. With `forget_anchor` κ_a, each forget head d brings a second group: retain rows under d's
view, trained head d, loss κ_a · KL(base ‖ view) (`alter_loop`). Its rows sit between the forget
groups and the retain group, so every row that needs the base model's logits (anchors, and the
retain group under `retain_kl`) is one contiguous block and gets one no-grad forward.

Views. `draw_views` takes them from the steps' RNG in the sequential order (each forget head in
the order given, then retain), so from the same RNG state both paths train on the same views.

Objectives. F and R are per-group functions (logits, labels, mask) → loss over one head's rows,
with the causal shift inside (`train.objectives` conventions). By default F is the sequential
step's forget term for the config (`alter_loop.forget_term`: IHL, bounded NLL or the KL to a
teacher, on the tokens `forget_tokens` names) and R the NLL on every labelled token, plus
κ · KL(base ‖ view) on the retain rows when `retain_kl` is set. The teacher and the base model
(adapters off) run no-grad forwards on their groups' rows before the fused forward, so they see
exactly the rows the sequential step gives them. Another objective plugs in as
`FusedPhase2(..., forget_objective=..., retain_objective=...)`.

Cost. Per adapted layer: A x once for all N rows, the per-row [out, r] matrices as one small
einsum of the [N, H] weights with B, and the mix as one bmm (`train.alter.modeling`, samples mode).
The forward holds all N rows' activations at once, where the sequential step held one group's:
that is the price of one pass (gradient checkpointing bounds it as usual).

Logits only where a loss reads them. Every loss here reads the prediction at position t only
where its token mask m[n, t] is set (t predicts label t + 1; masked-out positions are multiplied
by 0 or never gathered), so the output projection W_out h_t, [V] per position, is computed only
there (`compact_positions`, `logits_at`): row n keeps its positions t₁ < … < t_k in order,
left-aligned, and its labels become (ignored, y_{t₁+1}, …, y_{t_k+1}), so every loss, with its
causal shift, sees exactly the terms it saw on the full rows, per row (per-sequence losses too).
Teachers' logits are taken at the same positions. The vocabulary projection and every
vocabulary-wide loss pass then run on the masked tokens only, not on all N·T positions (on
SmolLM2, V = 49152, about two thirds of them are prompt, padding or high-entropy tokens).

No host sync: batches are concatenated on the host, the row weights, loss masks and (with
padding, under SDPA) the 4-D attention mask are host tensors copied asynchronously, and the
group boundaries are Python ints.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from alter_serve.core.names import RETAIN_HEAD

from train.alter.alter_steps import AlterStepConfig, Teacher, forget_term, forget_token_mask, random_view
from train.examples import Batch
from train.alter.modeling import AlterModel, at_positions, logits_at
from train.objectives import IGNORE_INDEX, distribution_kl, nll_loss
from train.runtime import to_device

HeadLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def retain_objective(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """R for the retain rows: mean NLL over the masked (here: every labelled) token."""
    return nll_loss(logits, labels, mask)


ANCHOR = "anchor/"   # batch key prefix of a forget head's retain anchor: "anchor/<head>"


@dataclass(frozen=True)
class Group:
    """One batch's rows [start, stop) of the fused batch, trained head `head`, forget weights
    `view` (the retain head always has weight 1); `key` is the batch's key ("<head>", "retain",
    or "anchor/<head>" for head's retain anchor)."""

    head: str
    start: int
    stop: int
    view: dict[str, float]
    key: str = ""

    @property
    def is_anchor(self) -> bool:
        return self.key.startswith(ANCHOR)


@dataclass(frozen=True)
class FusedLosses:
    """Detached device tensors: each head's data loss (F for forget heads, R for retain; without
    β, γ), L_⊥ of every head [H] in the model's head order, the retain KL, and each forget
    head's anchor KL (without κ, κ_a)."""

    per_head: dict[str, torch.Tensor]
    orthogonality: torch.Tensor
    retain_kl: torch.Tensor | None = None
    anchor: dict[str, torch.Tensor] = field(default_factory=dict)


def draw_views(forget_heads: Sequence[str], order: Sequence[str], rng: random.Random, prob: float,
               retain_nonempty: bool) -> dict[str, dict[str, float]]:
    """Every group's view, drawn as the sequential step draws them: one `random_view` per forget
    head in `order` (that head always on), then the retain view (redrawn while empty if
    `retain_nonempty`). Keys are the trained heads, retain last."""
    heads = list(forget_heads)
    views = {head: random_view(heads, rng, prob, include=head) for head in order}
    views[RETAIN_HEAD] = random_view(heads, rng, prob, nonempty=retain_nonempty)
    return views


def concat_batches(batches: Sequence[Batch], pad_id: int) -> Batch:
    """Host batches stacked row-wise, right-padded to the widest only (pad_id, mask 0, no label).

    No entropies: the loss masks are made per group before concatenation (`loss_masks`)."""
    width = max(b.input_ids.shape[1] for b in batches)

    def widen(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(tensor, (0, width - tensor.shape[1]), value=value)

    padded = any(b.padded is not False or b.input_ids.shape[1] < width for b in batches)
    return Batch(torch.cat([widen(b.input_ids, pad_id) for b in batches]),
                 torch.cat([widen(b.attention_mask, 0) for b in batches]),
                 torch.cat([widen(b.labels, IGNORE_INDEX) for b in batches]),
                 torch.cat([b.head for b in batches]), None, padded=padded)


def sdpa_mask(batch: Batch, attn_implementation: str | None) -> torch.Tensor | None:
    """The attention mask to give the model for a host batch.

    None without padding (causal attention as is). With padding under SDPA: the 4-D boolean mask
    transformers would build itself, [N, 1, T, T] = causal ∧ (key is a token), made here on the
    host, because from a 2-D mask transformers first asks whether it is all ones, and that read of
    a device tensor is a host sync on CUDA. Other attention implementations get the 2-D mask."""
    if batch.padded is False:
        return None
    if attn_implementation != "sdpa":
        return batch.attention_mask
    width = batch.input_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return causal[None, None] & batch.attention_mask.bool()[:, None, None, :]


def loss_masks(batches: dict[str, Batch], config: AlterStepConfig, width: int) -> torch.Tensor:
    """[N, width − 1] bool, the tokens each group's loss reads: a forget batch's forget tokens (as
    `AlterSteps.forget`), every labelled token of the retain batch and of the anchors."""
    masks = []
    for key, batch in batches.items():
        if key == RETAIN_HEAD or key.startswith(ANCHOR):
            mask = batch.labels[:, 1:] != IGNORE_INDEX
        else:
            mask = forget_token_mask(batch, config)
        masks.append(F.pad(mask, (0, width - 1 - mask.shape[1]), value=False))
    return torch.cat(masks)


def compact_positions(masks: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked positions of every row, left-aligned (module docstring, "Logits only where a loss
    reads them"), from host `masks` [N, T − 1] and `labels` [N, T]:

        index  [N, P + 1]   index[n, j] = t_j (the row's j-th masked position), 0 past its k_n;
                            the last column is a spare the causal shift drops
        labels [N, P + 1]   (ignored, y_{t₁+1}, …, y_{t_k+1}, ignored …)
        mask   [N, P]       j < k_n

    with P = max_n k_n. Built on the host (P is a Python int, no device read)."""
    counts = masks.sum(dim=1)
    # Read through numpy, which refuses a device tensor: this read can never become a host sync.
    width = int(counts.numpy().max()) if masks.numel() else 0
    # A stable sort of "not masked" puts each row's masked positions first, in their order.
    order = torch.sort((~masks).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    keep = torch.arange(width)[None, :] < counts[:, None]
    index = torch.where(keep, order, 0)
    picked = torch.where(keep, labels.gather(1, index + 1), IGNORE_INDEX)
    return F.pad(index, (0, 1)), F.pad(picked, (1, 0), value=IGNORE_INDEX), keep


def groups_of(batches: dict[str, Batch], views: dict[str, dict[str, float]]) -> list[Group]:
    """The row range of every batch in the concatenation, with its view (an anchor has its
    head's)."""
    groups, start = [], 0
    for key, batch in batches.items():
        head = key.removeprefix(ANCHOR)
        stop = start + batch.input_ids.shape[0]
        groups.append(Group(head, start, stop, views[head], key))
        start = stop
    return groups


def row_mixing(heads: Sequence[str], groups: Sequence[Group]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ω [N, H], trainable [N, H]) on the host: a row of group g has ω = 1 on retain, g's view
    weights on the forget heads, and only g's own head trainable."""
    heads = list(heads)
    rows = groups[-1].stop if groups else 0
    weights = torch.zeros(rows, len(heads))
    trainable = torch.zeros(rows, len(heads), dtype=torch.bool)
    for group in groups:
        weights[group.start: group.stop, 0] = 1.0
        for name, weight in group.view.items():
            weights[group.start: group.stop, heads.index(name)] = weight
        trainable[group.start: group.stop, heads.index(group.head)] = True
    return weights, trainable


def head_orthogonality(stacked_heads: Sequence[torch.Tensor]) -> torch.Tensor:
    """[H]: L_⊥ of every head against the others (detached) at once; entry h is
    `objectives.orthogonality_loss(stacked_heads, h, [j ≠ h])`:

        L_⊥(h) = mean_layers mean_{j ≠ h} ‖B_hᵀ sg(B_j)‖_F² / (‖B_h‖_F² · ‖B_j‖_F²)

    `stacked_heads` holds each layer's B as [out, H, r]; layers of one shape go in one batched
    product. Term (h, j) moves only B_h: its B_j is detached."""
    heads = stacked_heads[0].shape[1]
    if heads < 2:
        return stacked_heads[0].new_zeros(heads)
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for stacked in stacked_heads:
        by_shape.setdefault(tuple(stacked.shape), []).append(stacked)
    off_diagonal = ~torch.eye(heads, dtype=torch.bool, device=stacked_heads[0].device)
    terms = []
    for same in by_shape.values():
        own = torch.stack(same).float()                                        # [L, out, H, r]
        rest = own.detach()
        overlap = torch.einsum("lohr,lojs->lhjrs", own, rest).pow(2).sum(dim=(3, 4))     # [L, H, H]
        norms = own.pow(2).sum(dim=(1, 3)).unsqueeze(2) * rest.pow(2).sum(dim=(1, 3)).unsqueeze(1)
        ratio = (overlap / norms.clamp(min=1e-12)) * off_diagonal
        terms.append(ratio.sum(dim=2) / (heads - 1))                          # [L, H]
    return torch.cat(terms).mean(dim=0)


class FusedPhase2:
    """The Phase II step of `train.alter.alter_steps` in one forward and one backward (module docstring).

    Uses the sequential steps' config, RNG (for the views) and autocast; `pad_id` pads the
    concatenated rows. Every forget head of the model must bring a batch to each step.
    """

    def __init__(self, alter: AlterModel, config: AlterStepConfig, rng: random.Random,
                 autocast: Callable[[], AbstractContextManager], pad_id: int,
                 forget_objective: HeadLoss | None = None, retain_objective: HeadLoss = retain_objective,
                 forget_teacher: Teacher | None = None):
        if config.forget_loss == "kl_pre" and forget_teacher is None and forget_objective is None:
            raise ValueError("forget_loss 'kl_pre' needs a teacher: the model before the forget data was learned")
        self.alter, self.config, self.rng, self.autocast, self.pad_id = alter, config, rng, autocast, pad_id
        self.forget_objective, self.retain_objective = forget_objective, retain_objective
        self.forget_teacher = forget_teacher

    def step(self, forget: dict[str, Batch], retain: Batch,
             anchors: dict[str, Batch] | None = None) -> FusedLosses:
        """Backward of L (module docstring) on one host batch per forget head plus a retain batch,
        and with `forget_anchor` one retain batch per forget head as its anchor."""
        missing = sorted(set(self.alter.forget_heads) - set(forget))
        unknown = sorted(set(forget) - set(self.alter.forget_heads))
        if missing or unknown:
            raise ValueError(f"the fused step needs one batch per forget head {self.alter.forget_heads}; "
                             f"missing {missing}, unknown {unknown}")
        anchors = anchors or {}
        if self.config.forget_anchor > 0 and set(anchors) != set(forget):
            raise ValueError(f"forget_anchor needs one retain batch per forget head {sorted(forget)}; "
                             f"got {sorted(anchors)}")
        views = draw_views(self.alter.forget_heads, list(forget), self.rng, self.config.head_prob,
                           self.config.retain_nonempty)
        anchored = {ANCHOR + head: anchors[head] for head in forget} if self.config.forget_anchor > 0 else {}
        batches = {**forget, **anchored, RETAIN_HEAD: retain}
        groups = groups_of(batches, views)
        fused = concat_batches(list(batches.values()), self.pad_id)
        index, labels, masks = compact_positions(loss_masks(batches, self.config, fused.input_ids.shape[1]),
                                                 fused.labels)
        attention = sdpa_mask(fused, getattr(self.alter.config, "_attn_implementation", None))
        weights, trainable = row_mixing(self.alter.heads, groups)
        device = self.alter.device
        fused, index, labels, masks = fused.to(device), *(to_device(t, device) for t in (index, labels, masks))
        attention = None if attention is None else to_device(attention, device)
        targets = self._targets(groups, fused, attention, index)
        with self.alter.sample_mixing(weights, trainable):
            logits = self._logits(fused.input_ids, attention, index)
            per_head = {g.head: self._loss(g.head, logits[g.start: g.stop], labels[g.start: g.stop],
                                           masks[g.start: g.stop], targets.get(g.key))
                        for g in groups if not g.is_anchor}
            kl = {g.key: distribution_kl(logits[g.start: g.stop], targets[g.key], labels[g.start: g.stop])
                  for g in groups if g.key in targets and (g.is_anchor or g.key == RETAIN_HEAD)}
            retain_kl = kl.pop(RETAIN_HEAD, None)
            anchor = {key.removeprefix(ANCHOR): value for key, value in kl.items()}
            orthogonality = head_orthogonality(self.alter.lora_B_parameters())
            self._total(per_head, orthogonality, retain_kl, anchor).backward()
        return FusedLosses({h: loss.detach() for h, loss in per_head.items()}, orthogonality.detach(),
                           None if retain_kl is None else retain_kl.detach(),
                           {h: value.detach() for h, value in anchor.items()})

    def _logits(self, input_ids: torch.Tensor, attention: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
        """The model's logits at `index` only ([N, J, V]), in the current adapter mode."""
        with logits_at(self.alter.model, index) as compact, self.autocast():
            logits = self.alter(input_ids=input_ids, attention_mask=attention).logits
        return logits if compact else at_positions(logits, index)

    @torch.no_grad()
    def _targets(self, groups: Sequence[Group], fused: Batch, attention: torch.Tensor | None,
                 index: torch.Tensor) -> dict[str, torch.Tensor]:
        """No-grad logits the losses compare against, by group key, at the rows' `index` positions:
        the kl_pre teacher's on each forget group; the base model's (adapters off) on every anchor,
        and on the retain group when retain_kl is set — those rows are contiguous (`step` orders
        them so), one forward."""
        targets: dict[str, torch.Tensor] = {}

        def rows(start: int, stop: int) -> Batch:
            mask = None if attention is None else attention[start: stop]
            return Batch(fused.input_ids[start: stop], mask, fused.labels[start: stop],
                         fused.head[start: stop], padded=None if mask is not None else False)

        on_base = [g for g in groups if g.is_anchor or (g.key == RETAIN_HEAD and self.config.retain_kl > 0)]
        if on_base:
            start, stop = on_base[0].start, on_base[-1].stop
            if sum(g.stop - g.start for g in on_base) != stop - start:
                raise AssertionError("the rows scored by the base model must be contiguous")
            with self.alter.mixing("off"):
                logits = self._logits(fused.input_ids[start: stop], rows(start, stop).attention_mask,
                                      index[start: stop])
            targets.update({g.key: logits[g.start - start: g.stop - start] for g in on_base})
        if self.config.forget_loss == "kl_pre" and self.forget_objective is None:
            for group in groups:
                if group.key in self.alter.forget_heads:
                    with self.autocast():
                        teacher = self.forget_teacher(rows(group.start, group.stop))
                    targets[group.key] = at_positions(teacher, index[group.start: group.stop])
        return targets

    def _loss(self, head: str, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
              target: torch.Tensor | None) -> torch.Tensor:
        if head == RETAIN_HEAD:
            return self.retain_objective(logits, labels, mask)
        if self.forget_objective is not None:
            return self.forget_objective(logits, labels, mask)
        return forget_term(self.config, logits, labels, mask, target)

    def _total(self, per_head: dict[str, torch.Tensor], orthogonality: torch.Tensor,
               retain_kl: torch.Tensor | None = None, anchor: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """β Σ_d F_d + κ_a Σ_d KL_d + γ R + κ KL_r + λ Σ_h L_⊥(h): the sum of the sequential steps'
        losses."""
        cfg = self.config
        forget = sum(loss for head, loss in per_head.items() if head != RETAIN_HEAD)
        total = cfg.beta * forget + cfg.gamma * per_head[RETAIN_HEAD] + cfg.lam * orthogonality.sum()
        if anchor:
            total = total + cfg.forget_anchor * sum(anchor.values())
        return total if retain_kl is None else total + cfg.retain_kl * retain_kl
