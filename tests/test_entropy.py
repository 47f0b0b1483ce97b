"""Tsallis entropy against closed forms, the split, entropy alignment, caching and the histogram."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from train.alter.entropy import (
    DEFAULT_Q,
    DEFAULT_THRESHOLD,
    EntropySplit,
    cached_example_entropies,
    check_reachable_threshold,
    entropy_cache_key,
    example_entropies,
    high_entropy_mask,
    low_entropy_mask,
    max_tsallis_entropy,
    plot_entropy_histogram,
    tsallis_entropy,
)


@pytest.mark.parametrize("q", [0.5, 1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("n", [2, 7, 256])
def test_uniform_distribution_matches_closed_form(q: float, n: int) -> None:
    got = tsallis_entropy(torch.zeros(n), q).item()
    expected = math.log(n) if q == 1.0 else (1 - n ** (1 - q)) / (q - 1)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert max_tsallis_entropy(n, q) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("q", [0.5, 1.0, 1.5, 2.0])
def test_one_hot_distribution_has_zero_entropy(q: float) -> None:
    logits = torch.full((5,), float("-inf"))
    logits[3] = 0.0
    assert tsallis_entropy(logits, q).item() == 0.0
    # A finite but overwhelming logit gap is numerically one-hot too.
    assert tsallis_entropy(torch.tensor([80.0, 0.0, 0.0]), q).item() == pytest.approx(0.0, abs=1e-6)


def test_q_to_one_recovers_shannon() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    p = torch.softmax(logits.double(), -1)
    shannon = -(p * p.log()).sum(-1)
    assert torch.allclose(tsallis_entropy(logits, 1.0).double(), shannon, atol=1e-5)
    for q in (1 + 1e-3, 1 - 1e-3):
        assert torch.allclose(tsallis_entropy(logits, q).double(), shannon, atol=5e-3)


def test_matches_direct_power_sum_on_random_distributions() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 6, 40)
    p = torch.softmax(logits.double(), -1)
    for q in (0.7, 1.5, 2.5):
        direct = (1 - p.pow(q).sum(-1)) / (q - 1)
        assert torch.allclose(tsallis_entropy(logits, q).double(), direct, atol=1e-5)


def test_default_q_can_cross_the_paper_threshold() -> None:
    # The documented reason for q = 1.5: the maximum exceeds 1.2 for any realistic vocabulary,
    # while q = 2 never can (its maximum is 1 − 1/n < 1).
    for vocab in (64, 256, 768, 32000, 128256):
        assert max_tsallis_entropy(vocab, DEFAULT_Q) > DEFAULT_THRESHOLD
    assert max_tsallis_entropy(128256, 2.0) < DEFAULT_THRESHOLD


def test_a_threshold_no_distribution_can_exceed_is_refused_with_the_numbers() -> None:
    check_reachable_threshold(DEFAULT_THRESHOLD, DEFAULT_Q, 32000)  # max 1.989: fine
    with pytest.raises(ValueError, match=r"threshold 1.2 can never be exceeded: with q = 2.0 .*32000 tokens.* = 1,"):
        check_reachable_threshold(1.2, 2.0, 32000)
    with pytest.raises(ValueError, match="1.9"):  # q = 1.5, n = 400: max 2 · (1 − 1/20) = 1.9
        check_reachable_threshold(1.95, 1.5, 400)


def test_split_threshold_and_quantile() -> None:
    ent = torch.tensor([[0.1, 1.3, 1.2, 2.0]])
    valid = torch.tensor([[True, True, True, False]])
    assert high_entropy_mask(ent, valid, 1.2).tolist() == [[False, True, False, False]]
    assert low_entropy_mask(ent, valid, 1.2).tolist() == [[True, False, True, False]]
    assert EntropySplit(threshold=0.7).resolve_threshold(ent[valid]) == 0.7
    values = torch.arange(100, dtype=torch.float32)
    assert EntropySplit(mode="quantile", quantile=0.8).resolve_threshold(values) == pytest.approx(79.2)
    with pytest.raises(ValueError, match="threshold' or 'quantile"):
        EntropySplit(mode="median").resolve_threshold(values)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_example_entropies_are_aligned_and_padding_invariant() -> None:
    model = _tiny_llama()
    # Batched by length (shortest first), answered in input order.
    seqs = [[5, 9, 17, 3, 200, 44], [7, 8, 9], [11, 12], [90, 91, 92, 93, 94, 95, 96], [4, 4, 4, 4]]
    batched = example_entropies(model, seqs, q=1.5, batch_size=2, pad_id=0)
    assert [len(e) for e in batched] == [5, 2, 1, 6, 3]  # one per shifted label
    for seq, ent in zip(seqs, batched):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, :-1]
        assert torch.allclose(ent, tsallis_entropy(logits, 1.5), atol=1e-5)


class _Counting(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.model(**kwargs)


def test_entropies_are_computed_once_and_cached(tmp_path) -> None:
    model = _Counting(_tiny_llama())
    seqs = [[1, 2, 3, 4], [5, 6, 7]]
    first = cached_example_entropies(model, seqs, "model-x", tmp_path, q=1.5)
    calls = model.calls
    again = cached_example_entropies(model, seqs, "model-x", tmp_path, q=1.5)
    assert model.calls == calls  # served from the cache file
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    cached_example_entropies(model, seqs, "model-x", tmp_path, q=2.0)  # another q is another entry
    assert model.calls > calls
    assert len(list(tmp_path.glob("entropy-*.safetensors"))) == 2


def test_the_cache_key_separates_weight_dtype_and_device_type(tmp_path) -> None:
    """bf16-on-CUDA and fp32-on-CPU entropies differ near the threshold: they must not share an entry."""
    model = _Counting(_tiny_llama())
    seqs = [[1, 2, 3, 4], [5, 6, 7]]
    cached_example_entropies(model, seqs, "model-x", tmp_path, q=1.5)
    calls = model.calls
    cached_example_entropies(model.double(), seqs, "model-x", tmp_path, q=1.5)
    assert model.calls > calls
    assert len(list(tmp_path.glob("entropy-*.safetensors"))) == 2
    keys = {entropy_cache_key("m", 1.5, seqs, dtype, device)
            for dtype in (torch.float32, torch.bfloat16) for device in ("cpu", "cuda")}
    assert len(keys) == 4


def test_two_writers_of_one_entry_both_succeed(tmp_path, monkeypatch) -> None:
    """Two processes computing the same entry (the TOFU benchmark's parallel methods) used to share
    one temporary name: the second rename found the file gone. Here the second writer runs between
    the first one's write and its rename."""
    import train.alter.entropy as entropy_module

    model, seqs = _tiny_llama(), [[1, 2, 3, 4], [5, 6, 7]]
    real_save = entropy_module.save_file
    nested: list = []
    started = []

    def save_then_let_another_writer_finish(tensors, filename):
        real_save(tensors, filename)
        if not started:
            started.append(True)
            nested.append(cached_example_entropies(model, seqs, "model-x", tmp_path, q=1.5))

    monkeypatch.setattr(entropy_module, "save_file", save_then_let_another_writer_finish)
    first = cached_example_entropies(model, seqs, "model-x", tmp_path, q=1.5)
    assert all(torch.equal(a, b) for a, b in zip(first, nested[0]))
    assert [p.name for p in tmp_path.iterdir()] == [p.name for p in tmp_path.glob("entropy-*.safetensors")]
    assert len(list(tmp_path.iterdir())) == 1  # no temporary file left behind


def test_histogram_png(tmp_path) -> None:
    out = plot_entropy_histogram(torch.rand(500) * 2, 1.2, tmp_path / "h.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000
