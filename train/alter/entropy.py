"""Token entropy of the frozen base model: Tsallis entropy and the high/low token split.

For a next-token distribution p over a vocabulary of n tokens, the Tsallis entropy of index q is

    S_q(p) = (1 − Σ_i p_i^q) / (q − 1)        (q ≠ 1)
    S_1(p) = −Σ_i p_i log p_i                  (the limit q → 1: Shannon, in nats)

It is 0 for a one-hot p and largest for the uniform p, where S_q = (1 − n^{1−q}) / (q − 1).

Choice of q. ALTER splits tokens at S_q > 1.2 (the paper's threshold). For q > 1 the maximum
(1 − n^{1−q})/(q − 1) is below 1/(q − 1) for every vocabulary, so a threshold of 1.2 is only
reachable when q < 1 + 1/1.2 ≈ 1.83 (q = 2 caps S_q below 1: nothing would ever be "high").
We use q = 1.5 by default: its maximum is 2·(1 − n^{−1/2}), i.e. 1.88 for n = 256, 1.96 for
n = 768 and 1.99 for n = 32000, so 1.2 sits at ~60 % of the range for any realistic vocabulary,
and q > 1 weights the head of the distribution more than Shannon does (less sensitive to the
long tail of tiny probabilities).

Alignment. Entropies are computed teacher-forced: position t of a sequence carries the entropy of
the base model's distribution p(· | x_≤t), i.e. the distribution that predicts token t + 1.
After the usual causal-LM shift that is exactly the entropy "of" label t + 1, so the split masks
line up with the shifted labels used by every loss in `train.objectives`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DEFAULT_Q = 1.5
DEFAULT_THRESHOLD = 1.2
_SHANNON_EPS = 1e-6  # |q − 1| below this is treated as q = 1 (the formula is 0/0 there)


def tsallis_entropy(logits: torch.Tensor, q: float = DEFAULT_Q) -> torch.Tensor:
    """S_q of softmax(logits) over the last dimension, computed in fp32 from log-probabilities.

    Σ p_i^q is evaluated as exp(logsumexp(q · log p)), which stays accurate for peaked
    distributions where p_i^q underflows.
    """
    if q <= 0:
        raise ValueError(f"Tsallis index q must be > 0, got {q}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    if abs(q - 1.0) < _SHANNON_EPS:
        p = logp.exp()
        # 0 · log 0 = 0 (a masked logit of −inf would otherwise give 0 · −inf = NaN).
        return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)
    power_sum = torch.logsumexp(q * logp, dim=-1).exp()
    return (1.0 - power_sum) / (q - 1.0)


def max_tsallis_entropy(vocab_size: int, q: float = DEFAULT_Q) -> float:
    """S_q of the uniform distribution over `vocab_size` tokens: (1 − n^{1−q})/(q − 1), or log n."""
    if abs(q - 1.0) < _SHANNON_EPS:
        return float(torch.log(torch.tensor(float(vocab_size))))
    return (1.0 - vocab_size ** (1.0 - q)) / (q - 1.0)


def check_reachable_threshold(threshold: float, q: float, vocab_size: int) -> None:
    """Refuse a threshold that no token can exceed: S_q ≤ max_tsallis_entropy(n, q) for every
    next-token distribution over n tokens, so with threshold ≥ that maximum nothing is
    "high-entropy" and Phase I silently trains on nothing."""
    top = max_tsallis_entropy(vocab_size, q)
    if threshold >= top:
        raise ValueError(
            f"entropy.threshold {threshold} can never be exceeded: with q = {q} and this model's vocabulary of "
            f"{vocab_size} tokens the largest possible S_q is (1 − n^(1−q))/(q − 1) = {top:.4g}, so Phase I "
            "would train on nothing. Lower entropy.threshold (or q), or use entropy.split: quantile")


# ---- the split ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntropySplit:
    """How tokens are split into high- and low-entropy.

    `mode="threshold"`: high ⇔ S_q > threshold (the paper). `mode="quantile"`: the threshold is the
    `quantile` of the data set's own entropies (so a fraction 1 − quantile of tokens is high),
    for models whose entropies never reach the absolute threshold.
    """

    q: float = DEFAULT_Q
    threshold: float = DEFAULT_THRESHOLD
    mode: str = "threshold"
    quantile: float = 0.8

    def resolve_threshold(self, entropies: torch.Tensor) -> float:
        """The absolute threshold to use on these (valid-token) entropies."""
        if self.mode == "threshold":
            return float(self.threshold)
        if self.mode == "quantile":
            if entropies.numel() == 0:
                raise ValueError("quantile split needs at least one token entropy")
            return float(torch.quantile(entropies.float(), self.quantile))
        raise ValueError(f"entropy split mode must be 'threshold' or 'quantile', got {self.mode!r}")


def high_entropy_mask(entropies: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask of valid tokens with S_q > threshold."""
    return valid & (entropies > threshold)


def low_entropy_mask(entropies: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask of valid tokens with S_q ≤ threshold (the knowledge-bearing tokens)."""
    return valid & (entropies <= threshold)


# ---- computing and caching per-example entropies ------------------------------------------------


@torch.no_grad()
def sequence_entropies(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    q: float = DEFAULT_Q,
) -> torch.Tensor:
    """[B, T] entropies of the model's next-token distributions (position t predicts token t+1)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return tsallis_entropy(logits, q)


@torch.no_grad()
def example_entropies(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    q: float = DEFAULT_Q,
    batch_size: int = 16,
    pad_id: int = 0,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """Per example, the fp32 entropies at positions 0 … len−2 (one per shifted label).

    The model should be the frozen base model (adapters off); it is run in eval mode, no grad.
    """
    was_training = model.training
    model.eval()
    out: list[torch.Tensor | None] = [None] * len(sequences)
    # Batches of similar lengths waste less compute on padding; results go back in input order.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start: start + batch_size]
            chunk = [sequences[i] for i in rows]
            ids, mask = _pad(chunk, pad_id)
            ent = sequence_entropies(model, ids.to(device), mask.to(device), q).cpu()
            for row, (index, seq) in enumerate(zip(rows, chunk)):
                out[index] = ent[row, : len(seq) - 1].clone()
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def entropy_cache_key(model_id: str, q: float, sequences: Iterable[Sequence[int]],
                      dtype: torch.dtype = torch.float32, device_type: str = "cpu") -> str:
    """sha256 over the base model's identity (e.g. its fingerprint), q, the weights' dtype, the
    device type and every token id. Dtype and device are part of the key because they change the
    numbers (bf16 on CUDA vs fp32 on CPU move entropies near the threshold across it)."""
    header = {"model": model_id, "q": q, "dtype": str(dtype), "device": device_type}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for seq in sequences:
        digest.update(torch.tensor(list(seq), dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:32]


def cached_example_entropies(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    model_id: str,
    cache_dir: str | Path | None,
    q: float = DEFAULT_Q,
    batch_size: int = 16,
    pad_id: int = 0,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """`example_entropies`, computed once per (model, q, dtype, device type, data) and stored as
    safetensors.

    Several processes may compute the same entry at once (the TOFU benchmark trains methods in
    parallel): each writes its own temporary file in the cache folder and renames it into place
    (atomic on one file system), so a reader never sees a partial file and the last writer wins
    with identical content.
    """
    path = None
    if cache_dir is not None:
        dtype = next(model.parameters()).dtype
        key = entropy_cache_key(model_id, q, sequences, dtype, torch.device(device).type)
        path = Path(cache_dir) / f"entropy-{key}.safetensors"
        if path.is_file():
            stored = load_file(str(path))
            return [stored[str(i)] for i in range(len(sequences))]
    result = example_entropies(model, sequences, q, batch_size, pad_id, device)
    if path is not None:
        _write_atomically({str(i): t.contiguous() for i, t in enumerate(result)}, path)
    return result


def _write_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


# ---- the histogram --------------------------------------------------------------------------------


def plot_entropy_histogram(
    entropies: torch.Tensor,
    threshold: float,
    path: str | Path,
    q: float = DEFAULT_Q,
    title: str | None = None,
) -> Path:
    """PNG histogram of token entropies with the split threshold drawn as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    values = entropies.float().cpu().numpy()
    high = float((values > threshold).mean()) if values.size else 0.0
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.hist(values, bins=60, color="#4878a8")
    ax.axvline(threshold, color="#c0392b", linestyle="--", label=f"threshold {threshold:.3g} ({high:.1%} high)")
    ax.set_xlabel(f"Tsallis entropy S_q (q = {q:g})")
    ax.set_ylabel("answer tokens")
    ax.set_title(title or f"Base-model token entropy ({values.size} tokens)")
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
