"""Tokenised training examples and padded batches.

An example is one question/answer pair encoded exactly as it is served (`train.data.prompting`):
prompt tokens carry no loss, the answer continuation and EOS do. Each example knows which head
owns it (0 = retain data, d ≥ 1 = forget sub-domain d) and, once computed, the base model's
per-position entropies (length len − 1, aligned with the shifted labels).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from train.data.prompting import IGNORE_INDEX, QA_FORMAT, PromptFormat, encode_example
from train.runtime import to_device

Record = dict


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    head: int = 0
    entropy: torch.Tensor | None = None  # [len − 1] fp32


@dataclass
class Batch:
    """Right-padded tensors. `entropy` is [B, T − 1] (0 on padding) when the examples have it.
    `padded`: whether any row is padded, known on the host when the batch was built (None: unknown)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    head: torch.Tensor
    entropy: torch.Tensor | None = None
    padded: bool | None = None

    @property
    def model_mask(self) -> torch.Tensor | None:
        """The attention mask to give the model: None for a batch known to have no padding, which
        is the same computation, and spares transformers' "is the mask all ones?" check (a read of
        a device tensor, so a host sync on CUDA, in every forward)."""
        return None if self.padded is False else self.attention_mask

    def to(self, device: torch.device | str) -> Batch:
        """This batch on `device` (itself if already there).

        Host → CUDA goes through pinned memory with non_blocking=True: the copy is queued behind
        the running kernels instead of waiting for them (a pageable copy syncs the host)."""
        device = torch.device(device)
        if self.input_ids.device == device or (device.index is None and self.input_ids.device.type == device.type):
            return self
        moved = (_move(t, device) for t in (self.input_ids, self.attention_mask, self.labels, self.head, self.entropy))
        return Batch(*moved, padded=self.padded)

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def _move(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else to_device(tensor, device)


def encode_records(tokenizer, records: Sequence[Record], head: int = 0, max_length: int = 256,
                   fmt: PromptFormat = QA_FORMAT) -> list[Example]:
    """Encode records as prompt + answer continuation + EOS in format `fmt` (truncated to `max_length` tokens)."""
    out = []
    for record in records:
        encoded = encode_example(tokenizer, record["question"], record["answer"], fmt)
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
    return Batch(ids, mask, labels, heads, entropy, padded=any(len(e.input_ids) < width for e in examples))


def epoch_batches(examples: Sequence[Example], batch_size: int, pad_id: int,
                  rng: random.Random | None = None) -> list[Batch]:
    """One epoch of batches, shuffled by `rng` (in order when None)."""
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    return [collate([examples[i] for i in order[s: s + batch_size]], pad_id)
            for s in range(0, len(order), batch_size)]


def answer_tokens(example: Example) -> int:
    """Labelled tokens the example's answer contributes after the causal shift (0: fully truncated)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def sample_by_tokens(examples: Sequence[Example], budget: int, rng: random.Random,
                     count: Callable[[Example], int] = lambda e: len(e.input_ids)) -> list[Example]:
    """A random sample of whole examples, drawn in `rng`'s order until they hold `budget` tokens
    (as `count` counts them), or all of them. Spread over the whole set, unlike its first rows
    (which in TOFU-style files are one author's)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    chosen, total = [], 0
    for index in order:
        if total >= budget:
            break
        chosen.append(examples[index])
        total += count(examples[index])
    return chosen


def answer_token_values(examples: Sequence[Example]) -> torch.Tensor:
    """All entropies at labelled positions, concatenated (for thresholds and the histogram)."""
    values = []
    for e in examples:
        if e.entropy is None:
            raise ValueError("examples have no entropies yet; compute them with train.alter.entropy first")
        labelled = torch.tensor(e.labels[1:]) != IGNORE_INDEX
        values.append(e.entropy[labelled])
    return torch.cat(values) if values else torch.zeros(0)
