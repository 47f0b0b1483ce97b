"""The one prompt format: completion prompt, answer continuation, and the chat template."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from train.data.prompting import CHAT_TEMPLATE, IGNORE_INDEX, encode_example, format_answer, format_prompt
from train.data.synthetic import generate
from train.demo_model import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    data = generate(n_authors=4, facts_per_author=3)
    texts = [format_prompt(r["question"]) + format_answer(r["answer"]) for r in data.records]
    return train_tokenizer(texts, vocab_size=300)


def test_prompt_and_answer_text() -> None:
    assert format_prompt("Who?") == "Question: Who?\nAnswer:"
    assert format_answer("Nobody.") == " Nobody."


def test_encoded_example_masks_the_prompt_and_ends_with_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    example = encode_example(tokenizer, "Who?", "Nobody.")
    prompt_ids = tokenizer(format_prompt("Who?"))["input_ids"]
    assert example.input_ids[: example.prompt_length] == prompt_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels[: example.prompt_length] == [IGNORE_INDEX] * len(prompt_ids)
    assert example.labels[example.prompt_length:] == example.input_ids[example.prompt_length:]
    assert tokenizer.decode(example.input_ids, skip_special_tokens=True) == "Question: Who?\nAnswer: Nobody."


def test_chat_template_single_turn_equals_the_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    assert tokenizer.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Who?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        format_prompt("Who?")


def test_chat_template_history_is_the_training_text(tokenizer: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Nobody."},
                {"role": "user", "content": "Why?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    eos = tokenizer.eos_token
    assert rendered == f"{format_prompt('Who?')}{format_answer('Nobody.')}{eos}\n{format_prompt('Why?')}"
