"""The entropy-aware router of ALTER's per-token ("routed") inference.

For token position t, with S_t = S_q of the frozen base model's next-token distribution there and
h_t the base model's last hidden state (RMS-normalised), the router scores the forget heads
plus a *null* slot ("no forget head"):

    f_t = [h_t / rms(h_t), S_t, 1]                   features, [hidden + 2]
    z_t = W_g f_t                                     [1 + D]   (slot 0 = null, slots 1 … D = forget heads)
    ω_t = softmax(z_t / τ_t)[1:]                      τ_t = 0.8 if S_t > threshold else 0.01

and the layer applies B_r + Σ_d ω_{t,d} B_d. The retain head is always on (weight 1), as in the
static views. The null slot is what lets a retain-domain token route to *no* forget head; without
it a softmax over forget heads alone would always switch some head fully on. Low-entropy tokens
(τ = 0.01) get an essentially hard choice; high-entropy tokens (τ = 0.8) a soft mixture.

The paper writes the gate as W_g · S_q(x_t). A scalar entropy alone cannot tell sub-domains apart,
so the features add the base model's hidden state; the entropy enters both as a feature and
through the temperature. W_g is trained after Phase II by cross-entropy (at τ = 1) on the
sequence's sub-domain label (null for retain data), on detached base-model features: it
touches no adapter weight, so head isolation is unaffected.

Training data are balanced by label: each label (null/retain and every forget head) gets its own
token budget, and the loss weights every label equally however many tokens it brought. A retain
set is typically 10–20× the forget set (TOFU retain90 vs forget10); with one shared budget filled
in file order the router would never see a forget token and routed mode would never switch a
forget head on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alter_serve.core.bundle import AlterBundle
from alter_serve.core.manifest import RouterSpec

from train.alter.entropy import tsallis_entropy
from train.alter.modeling import AlterModel

ROUTER_KIND = "entropy_softmax"
NULL_SLOT = 0


class EntropyRouter(nn.Module):
    """W_g [1 + D, hidden + 2] and the temperatures; see the module docstring for the math."""

    def __init__(self, hidden_size: int, num_forget: int, q: float, threshold: float,
                 tau_high: float = 0.8, tau_low: float = 0.01):
        super().__init__()
        self.hidden_size = hidden_size
        self.q, self.threshold = q, threshold
        self.tau_high, self.tau_low = tau_high, tau_low
        # Zero init: uniform routing until trained (no accidental preference for any head).
        self.weight = nn.Parameter(torch.zeros(1 + num_forget, hidden_size + 2))

    @property
    def num_forget(self) -> int:
        return self.weight.shape[0] - 1

    def features(self, hidden: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
        ones = torch.ones_like(entropy, dtype=torch.float32)
        return torch.cat([normed, entropy.float().unsqueeze(-1), ones.unsqueeze(-1)], dim=-1)

    def logits(self, hidden: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        features = self.features(hidden, entropy)
        return F.linear(features, self.weight.to(features.device))

    def temperature(self, entropy: torch.Tensor) -> torch.Tensor:
        high = torch.full_like(entropy, self.tau_high, dtype=torch.float32)
        return torch.where(entropy > self.threshold, high, torch.full_like(high, self.tau_low))

    def head_weights(self, hidden: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        """[..., 1 + D] weights for (retain, forget heads…): retain 1, forget ω_t (null dropped)."""
        tau = self.temperature(entropy).unsqueeze(-1)
        omega = torch.softmax(self.logits(hidden, entropy) / tau, dim=-1)
        retain = torch.ones_like(omega[..., :1])
        return torch.cat([retain, omega[..., 1:]], dim=-1)

    # ---- bundle I/O ----------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.detach().cpu().float().contiguous()}

    def spec(self) -> RouterSpec:
        return RouterSpec(kind=ROUTER_KIND, params={
            "features": "rms_normed_last_hidden+entropy+bias", "null_slot": NULL_SLOT,
            "q": self.q, "threshold": self.threshold, "tau_high": self.tau_high, "tau_low": self.tau_low,
        })

    @classmethod
    def from_bundle(cls, bundle: AlterBundle) -> "EntropyRouter":
        if "weight" not in bundle.router:
            raise ValueError("bundle has no router weights ('router.weight'); routed mode is unavailable")
        weight = bundle.router["weight"]
        p = bundle.manifest.router.params
        router = cls(weight.shape[1] - 2, weight.shape[0] - 1, float(p["q"]), float(p["threshold"]),
                     float(p.get("tau_high", 0.8)), float(p.get("tau_low", 0.01)))
        if router.num_forget != len(bundle.forget_heads):
            raise ValueError(f"router scores {router.num_forget} forget heads, bundle has {len(bundle.forget_heads)}")
        with torch.no_grad():
            router.weight.copy_(weight.float())
        return router


@torch.no_grad()
def base_features(alter: AlterModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden [B, T, hidden], S_q [B, T]) of the base model (adapters off), no grad."""
    with alter.mixing("off"):
        out = alter(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return out.hidden_states[-1], tsallis_entropy(out.logits, q)


def routed_forward(alter: AlterModel, router: EntropyRouter, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, **kwargs) -> object:
    """The paper's inference: a base pass for (h_t, S_t), then the adapted pass with ω_t per token."""
    hidden, entropy = base_features(alter, input_ids, attention_mask, router.q)
    weights = router.head_weights(hidden, entropy)
    with alter.mixing("routed", routed=weights):
        return alter(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


ROUTER_BATCH_TOKENS = 1024  # tokens per router optimizer step


@dataclass
class RouterFit:
    history: list[float]      # mean weighted cross-entropy per epoch
    tokens: dict[int, int]    # tokens trained on, per label (0 = null/retain, d = forget head d)
    steps: int                # optimizer steps


def train_router(
    alter: AlterModel,
    router: EntropyRouter,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    epochs: int = 3,
    lr: float = 1e-2,
    tokens_per_label: int | None = 50_000,
    seed: int = 0,
) -> RouterFit:
    """Fit W_g to each sequence's head label (0 = null/retain, d = forget head d).

    `batches` yields (input_ids, attention_mask, head_label [B]) on any device. Every label keeps
    whole sequences, in the order given, until it holds `tokens_per_label` tokens (None: no cap);
    later sequences of a full label are skipped without a forward pass, so pass each label's data
    in a random order (the trainer passes a seeded sample per label). Features come from one
    base-model pass (no grad) and are reused across epochs.

    Each epoch visits the cached tokens in a seeded random order, `ROUTER_BATCH_TOKENS` per step,
    with the class-balanced cross-entropy

        L = Σ_t w_{c_t} · CE(z_t, c_t) / Σ_t w_{c_t},     w_c = N / (C · N_c)

    (N tokens, C labels present, N_c tokens of label c), so each label weighs the same.
    """
    hidden, entropy, target, used = _router_features(alter, router, batches, tokens_per_label)
    counts = torch.bincount(target, minlength=router.num_forget + 1).float()
    present = int((counts > 0).sum())
    weight = torch.where(counts > 0, target.numel() / (present * counts.clamp(min=1.0)), torch.zeros_like(counts))
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history, steps = [], 0
    for _ in range(epochs):
        order = torch.randperm(target.numel(), generator=generator).to(target.device)
        total = torch.zeros((), device=target.device)
        chunks = order.split(ROUTER_BATCH_TOKENS)
        for rows in chunks:
            loss = F.cross_entropy(router.logits(hidden[rows], entropy[rows]), target[rows], weight=weight)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        steps += len(chunks)
        history.append(float(total / max(len(chunks), 1)))  # one read per epoch
    return RouterFit(history, used, steps)


def _router_features(alter: AlterModel, router: EntropyRouter, batches, tokens_per_label: int | None):
    """(hidden [N, hidden], S_q [N], label [N], tokens per label) of the kept sequences' tokens."""
    device = alter.device
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    used: dict[int, int] = {}
    for input_ids, attention_mask, label in batches:
        keep = []
        for row, (head, length) in enumerate(zip(label.tolist(), attention_mask.sum(dim=1).tolist())):
            if tokens_per_label is None or used.get(head, 0) < tokens_per_label:
                keep.append(row)
                used[head] = used.get(head, 0) + int(length)
        if not keep:
            continue
        rows = torch.tensor(keep, device=input_ids.device)
        ids, mask = input_ids[rows].to(device), attention_mask[rows].to(device)
        hidden, entropy = base_features(alter, ids, mask, router.q)
        valid = mask.bool()
        labels = label.to(rows.device)[rows].to(device).unsqueeze(1).expand_as(mask)[valid]
        parts.append((hidden[valid], entropy[valid], labels))
    if not parts:
        raise ValueError("the router has no training tokens")
    hidden, entropy, target = (torch.cat(column) for column in zip(*parts))
    return hidden, entropy, target, dict(sorted(used.items()))
