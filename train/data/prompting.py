"""Prompt formats: how a question/answer pair becomes the text a model is trained, scored and served on.

A format turns a pair into the text

    prompt(question) + answer_prefix + answer <eos>

for example the default `qa` format's `Question: {question}\\nAnswer: {answer}<eos>`. Training puts
the loss on the answer continuation (`answer_prefix + answer`, then EOS), evaluation scores it, and
a served model receives exactly the prompt, through `/v1/completions` or `/v1/chat/completions`.

The pair is tokenized as *one* text, and a token belongs to the answer when its character span
overlaps the answer's (`answer_token_indices`). The evaluation scorers tokenize the same way (an
endpoint can only echo the tokens of the whole text), so training and scoring see the same ids even
with SentencePiece-style tokenizers, which tokenize a separately encoded `" answer"` with an extra
word-boundary token.

Formats:

* `qa` (default): `Question: {question}\\nAnswer:` + `" " + answer`. The demo and TOFU-bench models
  are trained on it, and `CHAT_TEMPLATE` renders a single user message as the same prompt text.
* `tofu-llama2`: `[INST] {question} [/INST]` + `answer` (no space), the format the public TOFU
  Llama-2-7b-chat checkpoints were fine-tuned on (TOFU's question_start_tag "[INST] ",
  question_end_tag " [/INST]", answer_tag ""). Their tokenizer's own chat template renders a user
  message as `<s>[INST] {question} [/INST]`, the same tokens.
* a model's own chat template (`chat_prompt_format(tokenizer)`): the prompt is the template's
  rendering of one user message with the generation prompt, exactly what a served
  `/v1/chat/completions` request feeds the model; the answer follows with no prefix, and the
  end-of-turn token (the tokenizer's EOS, e.g. SmolLM2's `<|im_end|>`) ends it.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label that torch's cross-entropy skips


@dataclass(frozen=True)
class PromptFormat:
    """`template` holds `{question}` exactly once; `answer_prefix` goes between the prompt and the
    answer; `stop` strings end a greedy answer (the next turn's opening, when the model runs on)."""

    name: str
    template: str
    answer_prefix: str = " "
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as exc:
            raise ValueError(f"prompt template {self.template!r} is not a valid format string: {exc}") from None
        if fields != ["question"]:
            raise ValueError(f"prompt template {self.template!r} must contain {{question}} exactly once and no "
                             f"other field (found {fields}); write literal braces as {{{{ and }}}}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    def prompt(self, question: str) -> str:
        return self.template.format(question=question)

    def answer(self, answer: str) -> str:
        return self.answer_prefix + answer


QA_FORMAT = PromptFormat("qa", "Question: {question}\nAnswer:", " ", ("\nQuestion:",))
TOFU_LLAMA2_FORMAT = PromptFormat("tofu-llama2", "[INST] {question} [/INST]", "", ("[INST]",))
PROMPT_FORMATS: Mapping[str, PromptFormat] = {f.name: f for f in (QA_FORMAT, TOFU_LLAMA2_FORMAT)}

# HF-style Jinja chat template of the `qa` format. "Answer:" is the assistant header (the
# generation prompt), so one user message plus add_generation_prompt renders as format_prompt(content),
# and a past assistant turn renders as "Answer:" + format_answer(content) + eos, the text the model
# was trained on. Newlines are Jinja string literals so that the trim_blocks setting cannot remove them.
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


def prompt_format(spec: str | Mapping[str, Any] | PromptFormat) -> PromptFormat:
    """A format by name (`qa`, `tofu-llama2`), from a mapping {template, answer_prefix, stop}, or as given."""
    if isinstance(spec, PromptFormat):
        return spec
    if isinstance(spec, str):
        try:
            return PROMPT_FORMATS[spec]
        except KeyError:
            raise ValueError(f"unknown prompt format {spec!r}; known: {', '.join(PROMPT_FORMATS)}, "
                             "or give {template, answer_prefix, stop}") from None
    return PromptFormat(name=str(spec.get("name", "custom")), template=spec["template"],
                        answer_prefix=spec.get("answer_prefix", " "), stop=tuple(spec.get("stop", ())))


# Stands in for the question while a chat template is rendered; no template produces it by itself.
_QUESTION_SENTINEL = "\x00ALTER-QUESTION\x00"


def chat_prompt_format(tokenizer: PreTrainedTokenizerBase, name: str = "chat") -> PromptFormat:
    """The prompt format of `tokenizer`'s own chat template: one user message rendered with the
    generation prompt (the model's default system prompt included, as a chat request gets it),
    the answer without a prefix, and the end-of-turn EOS as the stop string.

    Raises ValueError when the tokenizer has no chat template or no EOS token."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no chat "
                         "template; use a named prompt format (qa, tofu-llama2) or a custom template")
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no EOS token to end a chat answer with")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _QUESTION_SENTINEL}],
                                             add_generation_prompt=True, tokenize=False)
    if rendered.count(_QUESTION_SENTINEL) != 1:
        raise ValueError("the chat template does not render the user message exactly once")
    if tokenizer.bos_token and rendered.startswith(tokenizer.bos_token) and _adds_bos(tokenizer):
        # The tokenizer adds its BOS itself when the text is encoded (encode_example, the scorers).
        rendered = rendered[len(tokenizer.bos_token):]
    before, after = rendered.split(_QUESTION_SENTINEL)
    escape = lambda text: text.replace("{", "{{").replace("}", "}}")  # noqa: E731 - literal braces
    return PromptFormat(name, escape(before) + "{question}" + escape(after), "", (tokenizer.eos_token,))


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def format_prompt(question: str) -> str:
    """The `qa` prompt for a question: `Question: {question}\\nAnswer:` (no trailing space)."""
    return QA_FORMAT.prompt(question)


def format_answer(answer: str) -> str:
    """The `qa` answer continuation, `" " + answer`. The EOS token follows it as a token id."""
    return QA_FORMAT.answer(answer)


def answer_token_indices(spans: Sequence[tuple[int, int]], answer_start: int, answer_end: int) -> list[int]:
    """Indices of the tokens whose character span [s, e) overlaps the answer span
    [answer_start, answer_end); zero-width tokens (BOS and other specials) never overlap."""
    return [i for i, (s, e) in enumerate(spans) if s < answer_end and e > answer_start and e > s]


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of prompt + answer + EOS; the first `prompt_length` ids are the prompt."""

    input_ids: list[int]
    prompt_length: int

    @property
    def labels(self) -> list[int]:
        """Causal-LM labels with the prompt masked: the loss covers the answer and the EOS only."""
        return [IGNORE_INDEX] * self.prompt_length + self.input_ids[self.prompt_length:]


def encode_example(tokenizer: PreTrainedTokenizerBase, question: str, answer: str,
                   fmt: PromptFormat = QA_FORMAT) -> EncodedExample:
    """Tokenize one pair as the model sees it when served and scored.

    The text `prompt + answer continuation` is tokenized once, with the tokenizer's special tokens
    (a BOS, for tokenizers that add one), as a completions server tokenizes it; the answer starts
    at the first token that overlaps the continuation's characters (a token straddling the boundary
    counts as answer, as in the scorers), and EOS is appended.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; the answer continuation needs one")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("encoding needs a fast tokenizer (PreTrainedTokenizerFast): the answer's tokens are "
                        "found by character offsets")
    if not answer.strip():
        raise ValueError(f"the answer to {question!r} is empty; there is nothing to train on")
    prompt = fmt.prompt(question)
    text = prompt + fmt.answer(answer)
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    positions = answer_token_indices(encoded["offset_mapping"], len(prompt), len(text))
    if not positions or positions[0] == 0:
        raise ValueError(f"the prompt for {question!r} tokenizes to nothing before the answer; "
                         "the answer needs a prompt to be predicted from")
    # Specials the tokenizer itself appends after the text (an EOS of its own) are dropped: the
    # example ends with exactly one EOS.
    ids = list(encoded["input_ids"][: positions[-1] + 1])
    return EncodedExample(ids + [tokenizer.eos_token_id], positions[0])
