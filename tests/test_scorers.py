"""Scorers: LocalScorer against a hand computation on a tiny random Llama; the endpoint scorer's
answer-token location, retries and max_tokens fallback on hand-made completions responses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from train.evaluation.scorers import (
    AnswerScores,
    EndpointScorer,
    LocalScorer,
    answer_scores_from_echo,
    answer_token_indices,
    cut_at_stop,
)

CORPUS = [
    "Question: Where was Elara Thornwood born?\nAnswer: Elara Thornwood was born in Velmora.",
    "Question: What genre does Corin Ashford write?\nAnswer: Corin Ashford writes mystery novels.",
    "Question: Which award did Selwyn Oakley win?\nAnswer: Selwyn Oakley won the Tiber Medal.",
]
PROMPTS = ["Question: Where was Elara Thornwood born?\nAnswer:", "Question: Which award?\nAnswer:"]
ANSWERS = [" Elara Thornwood was born in Velmora.", " the Tiber Medal"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def _hand_logprobs(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, prompt: str, answer: str) -> list[float]:
    """log softmax(logits[t − 1])[id_t] for every token after the prompt's tokens, unbatched."""
    prompt_ids = tok(prompt)["input_ids"]
    full_ids = tok(prompt + answer)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids  # the boundary is a token boundary here
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full_ids])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return [float(logp[t - 1, full_ids[t]]) for t in range(len(prompt_ids), len(full_ids))]


def test_local_answer_logprobs_match_hand_computation(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    # batch_size=2 pads the shorter pair, so this also checks that padding changes nothing.
    scorer = LocalScorer(model, tokenizer, batch_size=2, progress=False)
    got = scorer.answer_logprobs(PROMPTS, ANSWERS)
    for prompt, answer, lp in zip(PROMPTS, ANSWERS, got):
        expected = _hand_logprobs(model, tokenizer, prompt, answer)
        assert len(lp) == len(tokenizer(answer)["input_ids"]) == len(expected)
        assert lp == pytest.approx(expected, abs=1e-5)


def test_local_greedy_flags_are_argmax(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    scorer = LocalScorer(model, tokenizer, progress=False)
    # Under a random model each flag must agree with the argmax of the logits at t − 1.
    full = tokenizer(PROMPTS[0] + ANSWERS[0])["input_ids"]
    n_prompt = len(tokenizer(PROMPTS[0])["input_ids"])
    with torch.no_grad():
        argmax = model(input_ids=torch.tensor([full])).logits[0].argmax(-1).tolist()
    expected = tuple(argmax[t - 1] == full[t] for t in range(n_prompt, len(full)))
    assert scorer.answer_scores(PROMPTS[:1], ANSWERS[:1])[0].greedy == expected


class _ForwardOnly(torch.nn.Module):
    """A module with the HF forward signature but no `generate`, like a custom wrapper."""

    def __init__(self, inner: LlamaForCausalLM) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_local_generate_uses_generate_or_greedy_loop_identically(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    with_generate = LocalScorer(model, tokenizer, batch_size=2, progress=False).generate(PROMPTS, 5)
    forward_only = LocalScorer(_ForwardOnly(model), tokenizer, progress=False).generate(PROMPTS, 5)
    assert with_generate == forward_only
    assert all(text for text in with_generate)


def test_local_mode_context_wraps_every_model_call(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    entered: list[str] = []

    @contextlib.contextmanager
    def mode() -> Iterator[None]:
        entered.append("view")
        yield

    scorer = LocalScorer(model, tokenizer, mode=mode, batch_size=1, progress=False)
    scorer.answer_logprobs(PROMPTS, ANSWERS)
    scorer.generate(PROMPTS[:1], 2)
    assert entered == ["view"] * 3


def test_answer_token_indices_and_stop() -> None:
    # "Answer:" ends at 7; " Paris" covers 7..13; BOS is zero-width at 0.
    spans = [(0, 0), (0, 6), (6, 7), (7, 13), (13, 14)]
    assert answer_token_indices(spans, 7, 14) == [3, 4]
    assert answer_token_indices(spans, 6, 14) == [2, 3, 4]  # a straddling token counts
    assert cut_at_stop(" Paris.\nQuestion: next", ["\nQuestion:"]) == "Paris."
    assert cut_at_stop(" Paris. ", []) == "Paris."


# --- endpoint ---------------------------------------------------------------------------------

# vLLM-style echo of "Question: Capital?\nAnswer: Paris." with a BOS: offsets count the decoded
# BOS string, so they are *not* positions in the prompt text.
ECHO = SimpleNamespace(
    tokens=["<s>", "Question", ":", " Capital", "?", "\n", "Answer", ":", " Paris", ".", " It"],
    text_offset=[0, 3, 11, 12, 20, 21, 22, 28, 29, 35, 36],
    token_logprobs=[None, -5.0, -0.5, -7.0, -1.0, -0.2, -0.1, -0.01, -1.5, -0.25, -3.0],
    top_logprobs=[None, {"Question": -5.0}, {":": -0.5}, {" The": -2.0, " Capital": -7.0},
                  {"?": -1.0}, {"\n": -0.2}, {"Answer": -0.1}, {":": -0.01},
                  {" London": -0.9, " Paris": -1.5}, {".": -0.25}, {" It": -3.0}],
)


def test_echo_answer_tokens_located_from_the_end() -> None:
    # max_tokens=1: 10 echoed prompt tokens, then one generated token (" It") to ignore.
    scores = answer_scores_from_echo(ECHO, " Paris.", n_prompt_tokens=10)
    assert scores == AnswerScores(logprobs=(-1.5, -0.25), greedy=(False, True))
    # Without the space, " Paris" still overlaps the answer span and is scored.
    assert answer_scores_from_echo(ECHO, "Paris.", 10).logprobs == (-1.5, -0.25)
    assert answer_scores_from_echo(ECHO, "?\nAnswer: Paris.", 10).logprobs == (-1.0, -0.2, -0.1, -0.01, -1.5, -0.25)


def test_echo_counts_every_byte_token_of_a_split_character() -> None:
    """"é" and "😀" each split over byte tokens: the tokens that end inside the character add ''
    (the server's `tokens`), and all of them are answer tokens, as the tokenizer's offsets make
    them for local scoring."""
    echo = SimpleNamespace(
        tokens=["<s>", "Q", ":", " Ren", "", "é", " ", "", "", "", "😀"],
        text_offset=[0, 3, 4, 5, 9, 9, 10, 11, 11, 11, 11],
        token_logprobs=[None, -0.5, -0.5, -1.0, -2.0, -0.1, -0.3, -0.4, -0.5, -0.6, -0.7],
        top_logprobs=None,
    )
    assert answer_scores_from_echo(echo, " Ren\u00e9 \U0001F600", 11).logprobs == \
        (-1.0, -2.0, -0.1, -0.3, -0.4, -0.5, -0.6, -0.7)
    assert answer_scores_from_echo(echo, "\u00e9 \U0001F600", 11).logprobs == (-2.0, -0.1, -0.3, -0.4, -0.5, -0.6, -0.7)
    assert answer_scores_from_echo(echo, "\U0001F600", 11).logprobs == (-0.4, -0.5, -0.6, -0.7)


def test_echo_rejects_text_that_does_not_match() -> None:
    with pytest.raises(ValueError, match="do not end with the answer"):
        answer_scores_from_echo(ECHO, " Rome.", 10)


def _completion(logprobs: Any = None, text: str = "", prompt_tokens: int = 10) -> Any:
    choice = SimpleNamespace(text=text, logprobs=logprobs)
    return SimpleNamespace(choices=[choice], usage=SimpleNamespace(prompt_tokens=prompt_tokens))


def _status_error(cls: type[openai.APIStatusError], code: int) -> openai.APIStatusError:
    response = httpx.Response(code, request=httpx.Request("POST", "http://test/v1/completions"))
    return cls(f"status {code}", response=response, body=None)


class _FakeCompletions:
    """Refuses max_tokens=0 with 400, answers 429 on the first scoring call, then succeeds."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def create(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        if kwargs.get("echo"):
            if kwargs["max_tokens"] == 0:
                raise _status_error(openai.BadRequestError, 400)
            if sum(1 for c in self.calls if c.get("echo")) == 2:
                raise _status_error(openai.RateLimitError, 429)
            return _completion(ECHO)
        return _completion(text=" Paris.\nQuestion: more")


def test_endpoint_scorer_falls_back_to_max_tokens_1_and_retries_429() -> None:
    fake = _FakeCompletions()
    scorer = EndpointScorer("http://test", "view-a", client=SimpleNamespace(completions=fake),
                            backoff_s=0.0, concurrency=1, progress=False)
    assert scorer.answer_logprobs(["Question: Capital?\nAnswer:"], [" Paris."]) == [[-1.5, -0.25]]
    assert [c["max_tokens"] for c in fake.calls] == [0, 1, 1]  # refused, rate-limited, answered
    assert all(c["model"] == "view-a" and c["logprobs"] == 1 for c in fake.calls)
    assert scorer.generate(["Question: Capital?\nAnswer:"], 8, stop=["\nQuestion:"]) == ["Paris."]
    assert fake.calls[-1]["temperature"] == 0.0 and fake.calls[-1]["stop"] == ["\nQuestion:"]


def test_endpoint_scorer_gives_up_on_other_errors() -> None:
    def create(**_: Any) -> Any:
        raise _status_error(openai.NotFoundError, 404)

    scorer = EndpointScorer("http://test/v1", "nope", client=SimpleNamespace(completions=SimpleNamespace(create=create)),
                            backoff_s=0.0, progress=False)
    with pytest.raises(openai.NotFoundError):
        scorer.generate(["x"], 1)
