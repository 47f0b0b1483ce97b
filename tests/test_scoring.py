"""Answer probability of a local model: an example whose answer was truncated away is never 1.0."""

from __future__ import annotations

import pytest
import torch

from train.examples import Batch, Example
from train.answer_probability import answer_probabilities, mean_answer_probability

VOCAB = 16


def uniform(batch: Batch) -> torch.Tensor:
    """A model that gives every token probability 1/16."""
    return torch.zeros(*batch.input_ids.shape, VOCAB)


ANSWERED = Example((1, 2, 3, 4), (-100, -100, 3, 4))
TRUNCATED = Example((1, 2, 3, 4), (-100, -100, -100, -100))  # the prompt filled max_length


def test_an_example_without_answer_tokens_has_no_probability() -> None:
    values = answer_probabilities(uniform, [ANSWERED, TRUNCATED], pad_id=0)
    assert values[0] == pytest.approx(1 / VOCAB) and torch.isnan(values[1])


def test_the_mean_leaves_it_out_and_says_so() -> None:
    with pytest.warns(UserWarning, match="1 of 2 examples have no answer token"):
        mean = mean_answer_probability(uniform, [ANSWERED, TRUNCATED], pad_id=0)
    assert mean == pytest.approx(1 / VOCAB)  # was (1/16 + 1) / 2: the truncated example scored 1.0
    with pytest.raises(ValueError, match="raise data.max_length"):
        mean_answer_probability(uniform, [TRUNCATED], pad_id=0)
