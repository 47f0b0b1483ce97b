"""Tokenised training examples and padded batches.

An example is one question/answer pair encoded exactly as it is served (`train.data.prompting`):
prompt tokens carry no loss, the answer continuation and EOS do. Each example knows which head
owns it (0 = retain data, d ≥ 1 = forget sub-domain d) and, once computed, the base model's
per-position entropies (length len − 1, aligned with the shifted labels).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from train.data.prompting import IGNORE_INDEX, encode_example

Record = dict


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    head: int = 0
    entropy: torch.Tensor | None = None  # [len − 1] fp32


@dataclass
class Batch:
    """Right-padded tensors. `entropy` is [B, T − 1] (0 on padding) when the examples have it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    head: torch.Tensor
    entropy: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels), move(self.head), move(self.entropy))

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def encode_records(tokenizer, records: Sequence[Record], head: int = 0, max_length: int = 256) -> list[Example]:
    """Encode records as prompt + " " + answer + EOS (truncated to `max_length` tokens)."""
    out = []
    for record in records:
        encoded = encode_example(tokenizer, record["question"], record["answer"])
        ids = encoded.input_ids[:max_length]
        labels = encoded.labels[:max_length]
        out.append(Example(tuple(ids), tuple(labels), head))
    return out


def with_entropies(examples: Sequence[Example], entropies: Sequence[torch.Tensor]) -> list[Example]:
    if len(examples) != len(entropies):
        raise ValueError(f"{len(entropies)} entropy rows for {len(examples)} examples")
    return [replace(e, entropy=h) for e, h in zip(examples, entropies)]


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    has_entropy = all(e.entropy is not None for e in examples)
    entropy = torch.zeros((len(examples), width - 1)) if has_entropy else None
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
        if entropy is not None:
            entropy[row, : n - 1] = e.entropy
    heads = torch.tensor([e.head for e in examples], dtype=torch.long)
    return Batch(ids, mask, labels, heads, entropy)


def epoch_batches(examples: Sequence[Example], batch_size: int, pad_id: int,
                  rng: random.Random | None = None) -> list[Batch]:
    """One epoch of batches, shuffled by `rng` (in order when None)."""
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    return [collate([examples[i] for i in order[s: s + batch_size]], pad_id)
            for s in range(0, len(order), batch_size)]


def answer_token_values(examples: Sequence[Example]) -> torch.Tensor:
    """All entropies at labelled positions, concatenated (for thresholds and the histogram)."""
    values = []
    for e in examples:
        if e.entropy is None:
            raise ValueError("examples have no entropies yet; compute them with train.entropy first")
        labelled = torch.tensor(e.labels[1:]) != IGNORE_INDEX
        values.append(e.entropy[labelled])
    return torch.cat(values) if values else torch.zeros(0)
