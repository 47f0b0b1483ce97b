"""The router's training data: one token budget per label, so a large retain set cannot crowd out
the forget data (TOFU retain90 is ~180k tokens against a 50k budget)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from train.alter.modeling import inject
from train.alter.router import EntropyRouter, base_features, train_router


def _data():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    alter = inject(model, ["q_proj"], 8, 16.0, ["d1"])
    generator = torch.Generator().manual_seed(0)

    def batches(count: int, low: int, high: int, label: int):
        return [(torch.randint(low, high, (4, 20), generator=generator), torch.ones(4, 20, dtype=torch.long),
                 torch.full((4,), label, dtype=torch.long)) for _ in range(count)]

    # Retain data (tokens 0-63) come first and alone exceed the budget; forget data use tokens 64-127.
    return alter, batches(10, 0, 64, 0), batches(3, 64, 128, 1)


@torch.no_grad()
def forget_weight(alter, router, batch) -> float:
    """Mean routed weight of the forget head over a batch's tokens."""
    hidden, entropy = base_features(alter, batch[0], batch[1], 1.5)
    return float(router.head_weights(hidden, entropy)[..., 1].mean())


def test_retain_data_larger_than_the_budget_still_leaves_the_router_forget_data() -> None:
    alter, retain, forget = _data()
    router = EntropyRouter(64, 1, 1.5, 1.2)
    # Budget 600 tokens (per label since the fix; the whole budget before it): 800 retain tokens come first.
    fit = train_router(alter, router, [*retain, *forget], 20, 1e-1, 600)
    on_forget, on_retain = forget_weight(alter, router, forget[0]), forget_weight(alter, router, retain[-1])
    assert on_forget > 0.75 and on_retain < 0.35, (on_forget, on_retain)  # before the fix: 0.18 on forget data
    assert fit.tokens == {0: 600, 1: 240}  # whole sequences until each label's budget is spent


def test_labels_weigh_the_same_however_many_tokens_they_bring() -> None:
    """Class-balanced loss: 640 retain tokens vs 80 forget tokens still route the forget data."""
    alter, retain, forget = _data()
    router = EntropyRouter(64, 1, 1.5, 1.2)
    fit = train_router(alter, router, [*retain[:8], forget[0]], epochs=20, lr=1e-1, tokens_per_label=None)
    assert fit.tokens == {0: 640, 1: 80} and len(fit.history) == 20 and fit.steps == 20
    assert forget_weight(alter, router, forget[0]) > 0.75
