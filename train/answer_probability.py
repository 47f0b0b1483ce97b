"""Answer probability of a local model, the number the training report and the e2e test use.

Per example, p̄ = exp(−L̄) with L̄ the mean NLL of the answer tokens (answer continuation + EOS)
given the prompt — TOFU's "probability" (`train.evaluation.tofu_metrics.answer_probability` on the same
log-probabilities). `forward` maps a batch to logits, so the same code scores the base model,
a static view, the routed model or a baseline.

An example with no answer token (the prompt alone fills `max_length`, so the answer was cut
off) has no probability: it is NaN here, never exp(−0) = 1, and the mean leaves it out with a
warning. The trainer drops such examples up front and counts them in its report.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

from train.examples import Batch, Example, epoch_batches
from train.objectives import token_nll

Forward = Callable[[Batch], torch.Tensor]


@torch.no_grad()
def answer_probabilities(forward: Forward, examples: Sequence[Example], pad_id: int,
                         batch_size: int = 16, device: torch.device | str = "cpu") -> torch.Tensor:
    """[N] per-example exp(−mean answer-token NLL), in input order; NaN for an example without an
    answer token."""
    values = []
    for batch in epoch_batches(examples, batch_size, pad_id):
        batch = batch.to(device)
        nll, valid = token_nll(forward(batch), batch.labels)
        count = valid.sum(-1)
        mean_nll = (nll * valid).sum(-1) / count.clamp(min=1)
        values.append(torch.where(count > 0, torch.exp(-mean_nll), torch.full_like(mean_nll, math.nan)).cpu())
    return torch.cat(values) if values else torch.zeros(0)


def mean_answer_probability(forward: Forward, examples: Sequence[Example], pad_id: int,
                            batch_size: int = 16, device: torch.device | str = "cpu") -> float:
    """Mean over examples of p̄ (TOFU averages the per-example probabilities), over the examples
    that have an answer token; a warning names how many had none."""
    values = answer_probabilities(forward, examples, pad_id, batch_size, device)
    scored = values[~values.isnan()]
    missing = values.numel() - scored.numel()
    if missing:
        if scored.numel() == 0:
            raise ValueError(f"none of the {values.numel()} examples has an answer token left after truncation; "
                             "raise data.max_length")
        warnings.warn(f"{missing} of {values.numel()} examples have no answer token (the prompt fills max_length); "
                      "they are left out of the mean answer probability", stacklevel=2)
    return float(scored.mean())


def model_forward(model: torch.nn.Module) -> Forward:
    """`forward` for any HF causal LM (or an AlterModel in its current mode)."""
    def forward(batch: Batch) -> torch.Tensor:
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return forward
