"""Forget sub-domains (one forget head each): from a record field, or k-means over hidden states.

When the data carry no sub-domain label, each forget record is embedded as the base model's mean
last-layer hidden state over its tokens (prompt and answer), and the embeddings are clustered
with k-means (k-means++ seeding, Lloyd iterations, cosine geometry: embeddings are L2-normalised
first, so clusters follow direction rather than norm). Cluster c becomes head "cluster-c".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from train.examples import Example, epoch_batches


def cluster_head_names(k: int) -> list[str]:
    return [f"cluster-{c}" for c in range(k)]


@torch.no_grad()
def mean_hidden_states(model: torch.nn.Module, examples: Sequence[Example], pad_id: int,
                       batch_size: int = 16, device: torch.device | str = "cpu") -> torch.Tensor:
    """[N, hidden] mean last hidden state over each example's tokens (base model, no grad)."""
    rows = []
    for batch in epoch_batches(examples, batch_size, pad_id):
        batch = batch.to(device)
        hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       output_hidden_states=True).hidden_states[-1].float()
        mask = batch.attention_mask.unsqueeze(-1).float()
        rows.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(rows)


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iterations: int = 100) -> torch.Tensor:
    """[N] cluster index in 0 … k−1 for L2-normalised `points` (k-means++ init, Lloyd updates).

    Deterministic for a given seed. Every cluster is non-empty: an emptied cluster is re-seeded
    at the point farthest from its current centre.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of records, got k={k}, n={n}")
    x = torch.nn.functional.normalize(points.double(), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    centres = _kmeans_pp(x, k, generator)
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        distances = torch.cdist(x, centres)
        new_assign = distances.argmin(1)
        for c in range(k):
            if not (new_assign == c).any():  # re-seed an empty cluster at the worst-fit point
                worst = distances.gather(1, new_assign.unsqueeze(1)).squeeze(1).argmax()
                new_assign[worst] = c
        centres = torch.stack([x[new_assign == c].mean(0) for c in range(k)])
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return assign


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    first = torch.randint(x.shape[0], (1,), generator=generator)
    centres = [x[first].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).min(1).values.pow(2)
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        centres.append(x[torch.multinomial(probs.float(), 1, generator=generator)].squeeze(0))
    return torch.stack(centres)
