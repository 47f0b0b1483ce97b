"""Scorers: what a TOFU evaluation needs from a model, behind one interface.

Two questions are asked of a model, and nothing else:

* ``answer_scores(prompts, answers)``: for each pair, the log-probability of every answer token
  given the prompt and the answer tokens before it, and whether each answer token is the greedy
  (argmax) choice at its position (for extraction strength);
* ``generate(prompts, max_tokens)``: the greedy continuation of each prompt (for ROUGE).

:class:`LocalScorer` answers them with a PyTorch model in this process (any view or routing
mode of the ALTER reference model); :class:`EndpointScorer` answers them through any
OpenAI-compatible server (``/v1/completions`` with ``echo`` + ``logprobs``), so a served view
can be audited from outside with exactly the same metric code.

Which tokens are "answer tokens" is decided the same way in both: the prompt and the answer are
scored as one text ``prompt + answer``, and a token belongs to the answer when its character
span overlaps the answer's span. That way no tokenizer boundary effect differs between the two,
and a token straddling the boundary (rare: BPE merges across "Answer:" and " x" do not occur in
the usual vocabularies) is counted as an answer token. The end-of-sequence token is never
scored: an endpoint cannot echo it, and the served numbers must match the local ones.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from train.data.prompting import answer_token_indices

T = TypeVar("T")

# A callable returning a context manager, entered around every forward pass and generation
# (e.g. one that sets the ALTER adapter mode to a view or to routing, and restores it after).
ModeContext = Callable[[], AbstractContextManager[object]]


@dataclass(frozen=True)
class AnswerScores:
    """Per-answer-token scores for one (prompt, answer) pair.

    ``logprobs[i]`` = log p(y_i | prompt, y_<i) (natural log). ``greedy[i]`` = whether y_i is the
    argmax next token at that position; ``None`` when the backend cannot tell.
    """

    logprobs: tuple[float, ...]
    greedy: tuple[bool, ...] | None


class Scorer(ABC):
    """The interface every metric is computed through."""

    @abstractmethod
    def answer_scores(self, prompts: Sequence[str], answers: Sequence[str]) -> list[AnswerScores]:
        """Score ``answers[i]`` as the continuation of ``prompts[i]`` (text ``prompt + answer``)."""

    @abstractmethod
    def generate(
        self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str] = ()
    ) -> list[str]:
        """Greedy continuation of each prompt, at most ``max_tokens`` tokens, cut before the first
        stop string, surrounding whitespace stripped."""

    def answer_logprobs(self, prompts: Sequence[str], answers: Sequence[str]) -> list[list[float]]:
        """Per-answer-token log-probabilities only (see :meth:`answer_scores`)."""
        return [list(s.logprobs) for s in self.answer_scores(prompts, answers)]


# ---------------------------------------------------------------------------------------------
# shared helpers


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string, whitespace stripped."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut].strip()


def _check_pairs(prompts: Sequence[str], answers: Sequence[str]) -> None:
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers; pass one each")
    empty = [i for i, a in enumerate(answers) if not a.strip()]
    if empty:
        raise ValueError(f"answers at positions {empty[:5]} are empty; nothing to score")


# ---------------------------------------------------------------------------------------------
# local PyTorch model


class LocalScorer(Scorer):
    """Scores with a causal LM in this process.

    ``model`` is any ``torch.nn.Module`` with the Hugging Face causal-LM forward signature
    (``model(input_ids=..., attention_mask=...).logits``, shape [batch, seq, vocab]); if it has
    ``generate`` (a ``GenerationMixin``) that is used for greedy decoding, otherwise a plain
    greedy loop. ``tokenizer`` must be a fast tokenizer (character offsets are needed to find the
    answer tokens). ``mode`` is entered around every model call, so the same model can be
    scored as different adapter views.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        mode: ModeContext | None = None,
        batch_size: int = 8,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("LocalScorer needs a fast tokenizer (PreTrainedTokenizerFast) for offsets")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.mode = mode or contextlib.nullcontext
        self.batch_size = batch_size
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.progress = progress

    # -- scoring --------------------------------------------------------------------------

    def answer_scores(self, prompts: Sequence[str], answers: Sequence[str]) -> list[AnswerScores]:
        _check_pairs(prompts, answers)
        texts = [p + a for p, a in zip(prompts, answers)]
        enc = self.tokenizer(texts, return_offsets_mapping=True)
        targets = [
            self._answer_positions(offsets, len(p), len(t), i)
            for i, (offsets, p, t) in enumerate(zip(enc["offset_mapping"], prompts, texts))
        ]
        results: dict[int, AnswerScores] = {}
        for batch in self._batches(enc["input_ids"], "scoring answers"):
            logits = self._forward([enc["input_ids"][i] for i in batch])
            for row, i in enumerate(batch):
                results[i] = _scores_from_logits(logits[row], enc["input_ids"][i], targets[i])
        return [results[i] for i in range(len(texts))]

    def _answer_positions(
        self, offsets: Sequence[tuple[int, int]], answer_start: int, text_end: int, i: int
    ) -> list[int]:
        positions = answer_token_indices(offsets, answer_start, text_end)
        if not positions:
            raise ValueError(f"pair {i}: no token of the answer survived tokenization")
        if positions[0] == 0:
            # The first token has no context to be predicted from.
            raise ValueError(f"pair {i}: the answer starts at token 0; give a non-empty prompt")
        return positions

    def _forward(self, sequences: list[list[int]]) -> torch.Tensor:
        """Logits [batch, seq, vocab] for right-padded sequences (causal: padding on the right
        cannot change the logits of the real tokens before it)."""
        ids, mask = _pad(sequences, pad_id=0, left=False)
        with torch.no_grad(), self.mode():
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return out.logits

    # -- generation -----------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str] = ()
    ) -> list[str]:
        encoded = self.tokenizer(list(prompts))["input_ids"]
        out: dict[int, str] = {}
        for batch in self._batches(encoded, "generating"):
            new_tokens = self._generate_batch([encoded[i] for i in batch], max_tokens)
            for i, toks in zip(batch, new_tokens):
                out[i] = cut_at_stop(self.tokenizer.decode(toks, skip_special_tokens=True), stop)
        return [out[i] for i in range(len(prompts))]

    def _generate_batch(self, sequences: list[list[int]], max_tokens: int) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id
        if not hasattr(self.model, "generate"):
            return self._greedy_loop(sequences, max_tokens, eos)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        # Left padding, so every row's continuation starts at the same column.
        ids, mask = _pad(sequences, pad_id=pad if pad is not None else 0, left=True)
        with torch.no_grad(), self.mode():
            gen = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
            )
        return [_until_eos(row[ids.shape[1] :].tolist(), eos) for row in gen]

    def _greedy_loop(self, sequences: list[list[int]], max_tokens: int, eos: int | None) -> list[list[int]]:
        """Batched greedy decoding without a KV cache, for modules that only implement ``forward``.

        Rows stay right-padded (causal attention: padding after a row's last token cannot change
        its logits, and positions stay 0..n-1 as in an unpadded call); each step reads every row's
        logits at its own last token, and a row leaves the batch at EOS.
        """
        rows = [list(seq) for seq in sequences]
        active = list(range(len(rows)))
        for _ in range(max_tokens):
            if not active:
                break
            logits = self._forward([rows[i] for i in active])
            last = torch.tensor([len(rows[i]) - 1 for i in active], device=logits.device)
            chosen = logits[torch.arange(len(active), device=logits.device), last].argmax(dim=-1).tolist()
            still = []
            for i, token in zip(active, chosen):
                if token != eos:
                    rows[i].append(token)
                    still.append(i)
            active = still
        return [row[len(seq):] for row, seq in zip(rows, sequences)]

    def _batches(self, sequences: Sequence[Sequence[int]], desc: str) -> Iterator[list[int]]:
        """Index batches, longest first: similar lengths share a batch (less padding), and an
        out-of-memory error shows up on the first batch rather than the last."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        with tqdm(total=len(order), desc=desc, disable=not self.progress) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                yield batch
                bar.update(len(batch))


def _pad(sequences: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into ``input_ids`` and ``attention_mask`` tensors."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def _scores_from_logits(
    logits: torch.Tensor, input_ids: Sequence[int], positions: Sequence[int]
) -> AnswerScores:
    """Token t is predicted by the logits at position t − 1; log-softmax only those rows, in
    float32 (a full [seq, vocab] log-softmax in half precision would waste memory and accuracy)."""
    rows = logits[[p - 1 for p in positions]].float().log_softmax(dim=-1)
    target = torch.tensor([input_ids[p] for p in positions], device=rows.device)
    logprobs = rows.gather(1, target[:, None])[:, 0]
    greedy = rows.argmax(dim=-1) == target
    return AnswerScores(tuple(logprobs.tolist()), tuple(bool(g) for g in greedy.tolist()))


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint


def answer_scores_from_echo(logprobs: Any, answer: str, n_prompt_tokens: int) -> AnswerScores:
    """Answer-token scores from the ``logprobs`` of an ``echo=True`` completion of ``prompt + answer``.

    ``logprobs`` has the OpenAI completion fields ``tokens``, ``token_logprobs``, ``text_offset``
    and ``top_logprobs``; only the first ``n_prompt_tokens`` entries are the echoed input (the
    rest, if any, were generated). The answer is located from the *end* of the echoed tokens:
    vLLM's ``text_offset`` counts the decoded BOS string too, so offsets are not positions in the
    prompt text, but the echoed token strings still end with exactly ``answer``. A token is an
    answer token when its span overlaps the last ``len(answer)`` characters; the bytes of one
    character split over several tokens all belong to that character.
    """
    tokens = list(logprobs.tokens or [])[:n_prompt_tokens]
    offsets = list(logprobs.text_offset or [])[:n_prompt_tokens]
    values = list(logprobs.token_logprobs or [])[:n_prompt_tokens]
    if not tokens or not (len(tokens) == len(offsets) == len(values)):
        raise ValueError("the endpoint returned no per-token logprobs for the echoed prompt")
    if not "".join(tokens).endswith(answer):
        raise ValueError(
            f"the echoed tokens do not end with the answer {answer[:40]!r}; the server's "
            "detokenization differs from the text sent, so answer tokens cannot be located"
        )
    end = offsets[-1] + len(tokens[-1])
    spans = list(zip(offsets, offsets[1:] + [end]))
    # A token that ends inside a multi-byte character (a byte-fallback or byte-level piece) adds ''
    # and has no width of its own; it belongs to the character that a following token completes, so
    # it takes that character's span, as a fast tokenizer's offsets give it for local scoring.
    for i in range(len(spans) - 2, -1, -1):
        if tokens[i] == "" and spans[i][0] == spans[i][1] == spans[i + 1][0]:
            spans[i] = spans[i + 1]
    picked = answer_token_indices(spans, end - len(answer), end)
    if any(values[i] is None for i in picked):
        raise ValueError("the endpoint returned no logprob for an answer token (is the prompt empty?)")
    return AnswerScores(
        tuple(float(values[i]) for i in picked), _greedy_flags(logprobs.top_logprobs, values, picked)
    )


def _greedy_flags(
    top_logprobs: Sequence[dict[str, float] | None] | None, values: Sequence[float], picked: list[int]
) -> tuple[bool, ...] | None:
    """A token is greedy iff its logprob equals the best logprob offered at its position (the
    server's top-1; tolerance for JSON float round trips)."""
    if top_logprobs is None or any(top_logprobs[i] is None for i in picked):
        return None
    return tuple(values[i] >= max(top_logprobs[i].values()) - 1e-6 for i in picked)


def _v1_base_url(url: str) -> str:
    """The openai client wants the ``/v1`` root; accept the server root as well."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class EndpointScorer(Scorer):
    """Scores through an OpenAI-compatible ``/v1/completions`` endpoint (vLLM, alter-serve, ...).

    Probabilities: ``echo=True, logprobs=1, max_tokens=0`` on the text ``prompt + answer``
    (servers that refuse ``max_tokens=0`` get 1, and the generated token is ignored).
    Generation: ``temperature=0``. Requests run ``concurrency`` at a time; 429 and 503 answers
    and connection errors are retried with exponential backoff, ``max_retries`` times.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        max_retries: int = 6,
        backoff_s: float = 0.5,
        timeout_s: float = 300.0,
        progress: bool = True,
        client: Any | None = None,
    ) -> None:
        self.model = model
        self.concurrency = max(1, concurrency)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.progress = progress
        self.client = client or _openai_client(_v1_base_url(base_url), api_key, timeout_s)
        self._echo_max_tokens = 0
        self._lock = threading.Lock()

    def answer_scores(self, prompts: Sequence[str], answers: Sequence[str]) -> list[AnswerScores]:
        _check_pairs(prompts, answers)
        return self._map(self._score_one, list(zip(prompts, answers)), "scoring answers")

    def generate(
        self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str] = ()
    ) -> list[str]:
        return self._map(lambda p: self._generate_one(p, max_tokens, stop), list(prompts), "generating")

    def _score_one(self, pair: tuple[str, str]) -> AnswerScores:
        prompt, answer = pair
        max_tokens = self._echo_max_tokens
        try:
            resp = self._create(prompt=prompt + answer, echo=True, logprobs=1, max_tokens=max_tokens)
        except Exception as err:  # noqa: BLE001 — only a refused max_tokens=0 is handled here
            if max_tokens != 0 or getattr(err, "status_code", None) != 400:
                raise
            with self._lock:
                self._echo_max_tokens = 1
            return self._score_one(pair)
        choice = resp.choices[0]
        n_prompt = len(choice.logprobs.tokens) if max_tokens == 0 else _prompt_tokens(resp)
        return answer_scores_from_echo(choice.logprobs, answer, n_prompt)

    def _generate_one(self, prompt: str, max_tokens: int, stop: Sequence[str]) -> str:
        resp = self._create(
            prompt=prompt, max_tokens=max_tokens, temperature=0.0, stop=list(stop) or None
        )
        # Cut locally too: a server may not honour every stop string.
        return cut_at_stop(resp.choices[0].text, stop)

    def _create(self, **kwargs: Any) -> Any:
        """One completions call, retried on 429/503/connection errors (see :func:`_backoff`)."""
        for attempt in range(self.max_retries + 1):
            try:
                return self.client.completions.create(model=self.model, **kwargs)
            except Exception as err:  # noqa: BLE001 — filtered by _retryable right below
                if attempt == self.max_retries or not _retryable(err):
                    raise
                time.sleep(_backoff(err, self.backoff_s, attempt))
        raise AssertionError("unreachable")

    def _map(self, fn: Callable[[Any], T], items: list[Any], desc: str) -> list[T]:
        """``[fn(x) for x in items]``, ``concurrency`` at a time, in order."""
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            results = pool.map(fn, items)
            return list(tqdm(results, total=len(items), desc=desc, disable=not self.progress))
        finally:
            # After a failure, drop the queued requests instead of sending them all first.
            pool.shutdown(wait=True, cancel_futures=True)


def _openai_client(base_url: str, api_key: str | None, timeout_s: float) -> Any:
    try:
        import openai
    except ImportError as err:  # the openai client is an optional dependency of train
        raise ImportError("EndpointScorer needs the `openai` package: pip install openai") from err
    key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    # Retries are ours (bounded, with backoff on 429/503 only); the client's would multiply them.
    return openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=0)


def _prompt_tokens(resp: Any) -> int:
    usage = getattr(resp, "usage", None)
    if usage is None or not usage.prompt_tokens:
        raise ValueError("the endpoint needs max_tokens=1 for echo but reports no usage.prompt_tokens")
    return int(usage.prompt_tokens)


def _retryable(err: Exception) -> bool:
    if getattr(err, "status_code", None) in (429, 503):
        return True
    try:
        import openai
    except ImportError:
        return False
    return isinstance(err, openai.APIConnectionError)  # includes timeouts


def _backoff(err: Exception, base_s: float, attempt: int) -> float:
    """backoff_s · 2^attempt, capped at 30 s; a longer Retry-After is honoured up to 60 s."""
    delay = min(30.0, base_s * 2**attempt)
    response = getattr(err, "response", None)
    retry_after = response.headers.get("retry-after") if response is not None else None
    try:
        return min(60.0, max(delay, float(retry_after))) if retry_after else delay
    except ValueError:  # an HTTP-date Retry-After: fall back to our own schedule
        return delay
