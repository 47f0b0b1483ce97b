"""Prompt formats: completion prompt, answer continuation, their tokenization, and the chat template."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from train.data.prompting import (
    CHAT_TEMPLATE,
    IGNORE_INDEX,
    QA_FORMAT,
    TOFU_LLAMA2_FORMAT,
    PromptFormat,
    answer_token_indices,
    encode_example,
    format_answer,
    format_prompt,
    prompt_format,
)
from train.data.synthetic import generate
from train.demo.demo_model import train_tokenizer

from .tiny_model import build_sentencepiece_tokenizer


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


# --- prompt formats ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [QA_FORMAT, TOFU_LLAMA2_FORMAT], ids=lambda f: f.name)
def test_encoding_is_the_scorers_tokenization_with_a_sentencepiece_tokenizer(fmt: PromptFormat) -> None:
    data = generate(n_authors=4, facts_per_author=3)
    tokenizer = build_sentencepiece_tokenizer([fmt.prompt(r["question"]) + fmt.answer(r["answer"])
                                             for r in data.records], vocab_size=700)
    # Why the pair is tokenized as one text: the separate encoding differs here.
    assert tokenizer(" Nobody", add_special_tokens=False)["input_ids"] != \
        tokenizer("Nobody", add_special_tokens=False)["input_ids"]
    for record in data.records[:6]:
        example = encode_example(tokenizer, record["question"], record["answer"], fmt)
        text = fmt.prompt(record["question"]) + fmt.answer(record["answer"])
        encoded = tokenizer(text, return_offsets_mapping=True)
        # Exactly the ids a completions endpoint echoes for the text, plus EOS ...
        assert example.input_ids == encoded["input_ids"] + [tokenizer.eos_token_id]
        # ... and the labelled tokens are exactly the ones the scorers score (and the EOS).
        scored = answer_token_indices(encoded["offset_mapping"], len(fmt.prompt(record["question"])), len(text))
        labelled = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
        assert labelled == scored + [len(encoded["input_ids"])]
        assert tokenizer.decode(example.input_ids[example.prompt_length:-1]).strip() == record["answer"]


def test_tofu_llama2_format_is_tofus_text() -> None:
    # TOFU's llama2-7b tags: question_start "[INST] ", question_end " [/INST]", answer tag "".
    assert TOFU_LLAMA2_FORMAT.prompt("Who?") + TOFU_LLAMA2_FORMAT.answer("Nobody.") == "[INST] Who? [/INST]Nobody."
    assert QA_FORMAT.prompt("Who?") + QA_FORMAT.answer("Nobody.") == "Question: Who?\nAnswer: Nobody."


def test_prompt_format_lookup_and_custom_formats() -> None:
    assert prompt_format("tofu-llama2") is TOFU_LLAMA2_FORMAT
    custom = prompt_format({"template": "Q: {question}\nA:", "stop": ["\nQ:"]})
    assert custom.prompt("x") == "Q: x\nA:" and custom.answer("y") == " y" and custom.stop == ("\nQ:",)
    with pytest.raises(ValueError, match="unknown prompt format 'chatml'"):
        prompt_format("chatml")
    for template in ("no placeholder", "{question} and {question}", "{question} {answer}", "{question"):
        with pytest.raises(ValueError, match="prompt template"):
            PromptFormat("bad", template)


def test_encoding_refuses_what_it_cannot_split(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="empty"):
        encode_example(tokenizer, "Who?", "  ")
    with pytest.raises(ValueError, match="nothing before the answer"):
        encode_example(tokenizer, "", "Nobody.", PromptFormat("bare", "{question}", ""))


# ---- a model's own chat template as the prompt format --------------------------------------------------

_CHATML = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
           "{{ '<s>system\nBe {brief}.</s>\n' }}{% endif %}"
           "{{ '<s>' + message['role'] + '\n' + message['content'] + '</s>\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}")


def test_chat_prompt_format_renders_a_user_turn_as_the_chat_template_does():
    from tests.tiny_model import build_tokenizer
    from train.data.prompting import chat_prompt_format

    tokenizer = build_tokenizer()
    tokenizer.chat_template = _CHATML
    fmt = chat_prompt_format(tokenizer)
    # Literal braces of the template (the system prompt's "{brief}") survive as text.
    assert fmt.prompt("Who wrote it?") == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who wrote it?"}], add_generation_prompt=True, tokenize=False)
    assert fmt.answer_prefix == "" and fmt.stop == ("</s>",)
    encoded = encode_example(tokenizer, "Who wrote it?", "The author did.", fmt)
    chat_ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who wrote it?"}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
    assert encoded.input_ids[: encoded.prompt_length] == list(chat_ids)
    assert encoded.input_ids[-1] == tokenizer.eos_token_id


def test_chat_prompt_format_needs_a_chat_template():
    from tests.tiny_model import build_tokenizer
    from train.data.prompting import chat_prompt_format

    with pytest.raises(ValueError, match="has no chat template"):
        chat_prompt_format(build_tokenizer())


def test_lr_schedule_warms_up_then_decays_to_zero():
    from train.optim import lr_factor

    assert [lr_factor(s, 10, 2, "linear") for s in range(10)] == pytest.approx(
        [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert {lr_factor(s, 10, 0, "constant") for s in range(10)} == {1.0}


def test_forget_losses_that_need_inputs_refuse_a_config_without_them():
    from train.run_config import TrainConfig

    data = {"kind": "json", "forget_file": "f.json", "retain_file": "r.json"}
    with pytest.raises(ValueError, match="needs its never-learned level"):
        TrainConfig.model_validate({"name": "x", "data": data, "optim": {"forget_loss": "bounded_nll"}})
    with pytest.raises(ValueError, match="needs model.pretrained_path"):
        TrainConfig.model_validate({"name": "x", "data": data, "optim": {"forget_loss": "kl_pre"}})
    TrainConfig.model_validate({"name": "x", "data": {**data, "holdout_file": "h.json"},
                                "optim": {"forget_loss": "bounded_nll"}})
