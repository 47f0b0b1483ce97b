"""The one prompt format used for training, evaluation and serving.

A question/answer pair is the text

    Question: {question}\\nAnswer: {answer}<eos>

split into a *prompt* (`format_prompt`) and an *answer continuation* (`format_answer` followed by
the EOS token). Training puts the loss on the continuation, evaluation scores it, and a served
model receives exactly the prompt, whether through `/v1/completions` or `/v1/chat/completions`:
`CHAT_TEMPLATE` renders a single user message as the same prompt text, so both routes reach the
model as the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
IGNORE_INDEX = -100  # the label that torch's cross-entropy skips

# HF-style Jinja chat template. "Answer:" is the assistant header (the generation prompt), so one
# user message plus add_generation_prompt renders as format_prompt(content), and a past assistant
# turn renders as "Answer:" + format_answer(content) + eos, the text the model was trained on.
# Newlines are Jinja string literals so that the trim_blocks setting cannot remove them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Question: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Answer: ' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}"
)


def format_prompt(question: str) -> str:
    """The prompt for a question: `Question: {question}\\nAnswer:` (no trailing space)."""
    return PROMPT_TEMPLATE.format(question=question)


def format_answer(answer: str) -> str:
    """The answer continuation, `" " + answer`; the EOS token follows it as a token id."""
    return " " + answer


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of prompt + answer + EOS; the first `prompt_length` ids are the prompt."""

    input_ids: list[int]
    prompt_length: int

    @property
    def labels(self) -> list[int]:
        """Causal-LM labels with the prompt masked: the loss covers the answer and the EOS only."""
        return [IGNORE_INDEX] * self.prompt_length + self.input_ids[self.prompt_length:]


def encode_example(tokenizer: PreTrainedTokenizerBase, question: str, answer: str) -> EncodedExample:
    """Tokenize one pair as the model sees it.

    The prompt is tokenized on its own with the tokenizer's special tokens (a BOS, for tokenizers
    that add one), exactly as a completions server tokenizes a prompt; the answer continuation is
    tokenized separately and EOS appended, so the prompt/answer boundary is exact.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; the answer continuation needs one")
    prompt_ids = tokenizer(format_prompt(question), add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(format_answer(answer), add_special_tokens=False)["input_ids"]
    return EncodedExample(prompt_ids + answer_ids + [tokenizer.eos_token_id], len(prompt_ids))
