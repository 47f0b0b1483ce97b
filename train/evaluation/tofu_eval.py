"""TOFU evaluation: every metric for the forget, retain, real-authors and world-facts sets, and
the head-isolation matrix, computed through a :class:`~train.evaluation.scorers.Scorer` (a local model or a
served endpoint, so what is measured is what is served).

Per record (TOFU ``*_perturbed.json`` format: question, answer, paraphrased_answer,
perturbed_answer[...]) the prompt is ``fmt.prompt(question)`` and each answer is scored as the
continuation ``fmt.answer(answer)`` (``" " + answer`` in the default `qa` format, see
:mod:`train.data.prompting`; EOS not scored, see :mod:`train.evaluation.scorers`). Then, with ℓ the
answer-token log-probabilities:

* probability      p̄(answer) = exp(mean ℓ); on real authors and world facts the normalised
                   p̄(answer) / (p̄(answer) + Σ_j p̄(perturbed_j)) (open-unlearning's Q_A_Prob_normalised);
* ROUGE-L recall   of the greedy answer (at most ``max_new_tokens``, cut at the format's stop strings) vs gold;
* truth ratio      R = geomean_j p̄(perturbed_j) / p̄(true), true = paraphrased answer on forget and
                   retain (the answer when a record has none), the answer on real authors / world
                   facts; reported as mean min(R, 1/R) on forget, mean max(0, 1 − R) elsewhere;
* extraction strength  1 − k*/n on the gold answer (see :func:`train.evaluation.tofu_metrics.extraction_strength`).

Across sets: model utility = harmonic mean of the nine retain / real-authors / world-facts numbers;
forget quality = KS-test p-value between this model's per-sample forget R and a retain model's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from train.evaluation import tofu_metrics
from train.data.prompting import QA_FORMAT, PromptFormat
from train.evaluation.scorers import AnswerScores, Scorer

Record = Mapping[str, Any]

SET_NAMES = ("forget", "retain", "real_authors", "world_facts")
# Sets without a paraphrase, scored with the normalised probability (TOFU's utility sets).
OPTION_SETS = frozenset({"real_authors", "world_facts"})
DEFAULT_MAX_NEW_TOKENS = 200


@dataclass(frozen=True)
class _Requests:
    """The (prompt, continuation) pairs one set needs, flattened into a single scoring call.

    For record i: ``answer[i]``, ``true[i]`` and ``perturbed[i][j]`` index into ``pairs``.
    """

    pairs: list[tuple[str, str]]
    answer: list[int]
    true: list[int]
    perturbed: list[list[int]]


def evaluate_tofu(
    scorer: Scorer,
    sets: Mapping[str, Sequence[Record]],
    *,
    reference_forget_truth_ratios: Sequence[float] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stop: Sequence[str] | None = None,
    prompt_format: PromptFormat = QA_FORMAT,
    answer_suffix: str = "",
) -> dict[str, Any]:
    """All TOFU metrics for the given sets (any subset of :data:`SET_NAMES`).

    Returns ``{"sets": {name: set report}, "model_utility": float | None,
    "forget_quality": float | None, "settings": {...}}``. Model utility needs retain,
    real_authors and world_facts; forget quality needs a forget set and the per-sample forget
    truth ratios of a retain model (:func:`forget_truth_ratios` of that model's report).
    Greedy answers stop at `stop` (default: the prompt format's stop strings). `answer_suffix`
    is scored after every answer: the EOS text (e.g. ``"<|im_end|>"``) scores the end of the turn
    as training puts its loss on it, as open-unlearning scores chat-template answers.
    """
    stop = prompt_format.stop if stop is None else tuple(stop)
    unknown = sorted(set(sets) - set(SET_NAMES))
    if unknown:
        raise ValueError(f"unknown evaluation sets {unknown}; use any of {list(SET_NAMES)}")
    reports = {
        name: evaluate_set(scorer, name, records, max_new_tokens=max_new_tokens, stop=stop,
                           prompt_format=prompt_format, answer_suffix=answer_suffix)
        for name, records in sets.items()
    }
    return {
        "sets": reports,
        "model_utility": _model_utility(reports),
        "forget_quality": _forget_quality(reports, reference_forget_truth_ratios),
        "settings": {"max_new_tokens": max_new_tokens, "stop": list(stop), "prompt_format": prompt_format.name,
                     "answer_suffix": answer_suffix},
    }


def evaluate_set(
    scorer: Scorer,
    name: str,
    records: Sequence[Record],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stop: Sequence[str] | None = None,
    prompt_format: PromptFormat = QA_FORMAT,
    answer_suffix: str = "",
) -> dict[str, Any]:
    """Per-sample and mean metrics of one set (see the module docstring for the formulas)."""
    if not records:
        raise ValueError(f"evaluation set {name!r} is empty")
    requests = _build_requests(name, records, prompt_format, answer_suffix)
    scores = scorer.answer_scores([p for p, _ in requests.pairs], [a for _, a in requests.pairs])
    stop = prompt_format.stop if stop is None else stop
    generations = scorer.generate([prompt_format.prompt(r["question"]) for r in records], max_new_tokens, stop)
    samples = [
        _sample_metrics(name, record, generation, scores, requests, i)
        for i, (record, generation) in enumerate(zip(records, generations))
    ]
    return _aggregate(name, samples)


def forget_truth_ratios(report: Mapping[str, Any]) -> list[float]:
    """The per-sample forget-set truth ratios R of a report from :func:`evaluate_tofu` (to use a
    retain model's report as the forget-quality reference)."""
    try:
        samples = report["sets"]["forget"]["samples"]
    except KeyError:
        raise ValueError("the reference report has no forget set; evaluate the retain model on it") from None
    return [float(s["truth_ratio"]) for s in samples]


def _build_requests(name: str, records: Sequence[Record], fmt: PromptFormat, suffix: str = "") -> _Requests:
    pairs: list[tuple[str, str]] = []

    def add(prompt: str, text: str) -> int:
        pairs.append((prompt, fmt.answer(text) + suffix))
        return len(pairs) - 1

    answer, true, perturbed = [], [], []
    for i, record in enumerate(records):
        prompt = fmt.prompt(record["question"])
        wrong = record.get("perturbed_answer") or []
        if isinstance(wrong, str) or not wrong:
            raise ValueError(f"{name}[{i}]: perturbed_answer must be a non-empty list of strings")
        answer.append(add(prompt, record["answer"]))
        paraphrase = None if name in OPTION_SETS else record.get("paraphrased_answer")
        true.append(add(prompt, paraphrase) if paraphrase else answer[-1])
        perturbed.append([add(prompt, w) for w in wrong])
    return _Requests(pairs, answer, true, perturbed)


def _sample_metrics(
    name: str,
    record: Record,
    generation: str,
    scores: list[AnswerScores],
    requests: _Requests,
    i: int,
) -> dict[str, Any]:
    gold = scores[requests.answer[i]]
    wrong = [scores[j].logprobs for j in requests.perturbed[i]]
    sample: dict[str, Any] = {
        "question": record["question"],
        "answer": record["answer"],
        "generation": generation,
        "probability": tofu_metrics.answer_probability(gold.logprobs),
        "rouge_l_recall": tofu_metrics.rouge_l_recall(generation, record["answer"]),
        "truth_ratio": tofu_metrics.truth_ratio(scores[requests.true[i]].logprobs, wrong),
        "extraction_strength": (
            tofu_metrics.extraction_strength(gold.greedy) if gold.greedy is not None else None
        ),
    }
    if name in OPTION_SETS:
        sample["normalized_probability"] = tofu_metrics.normalized_probability(gold.logprobs, wrong)
    return sample


def _aggregate(name: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over samples. ``probability`` is the number that enters model utility: the
    normalised one on real authors / world facts (the plain mean stays as ``probability_raw``)."""
    ratios = [s["truth_ratio"] for s in samples]
    es = [s["extraction_strength"] for s in samples]
    raw_probability = tofu_metrics.mean([s["probability"] for s in samples])
    out: dict[str, Any] = {
        "n": len(samples),
        "probability": raw_probability,
        "rouge_l_recall": tofu_metrics.mean([s["rouge_l_recall"] for s in samples]),
        "truth_ratio": (
            tofu_metrics.truth_ratio_forget_score(ratios)
            if name == "forget"
            else tofu_metrics.truth_ratio_retain_score(ratios)
        ),
        "truth_ratio_form": "mean(min(R, 1/R))" if name == "forget" else "mean(max(0, 1 - R))",
        "extraction_strength": None if None in es else tofu_metrics.mean(es),
    }
    if name in OPTION_SETS:
        out["probability_raw"] = raw_probability
        out["probability"] = tofu_metrics.mean([s["normalized_probability"] for s in samples])
    out["samples"] = samples
    return out


def _model_utility(reports: Mapping[str, Mapping[str, Any]]) -> float | None:
    if not {"retain", "real_authors", "world_facts"} <= set(reports):
        return None
    values = {}
    for key in tofu_metrics.MODEL_UTILITY_KEYS:
        set_name, metric = key.split("/")
        values[key] = reports[set_name][metric]
    return tofu_metrics.model_utility(values)


def _forget_quality(
    reports: Mapping[str, Mapping[str, Any]], reference: Sequence[float] | None
) -> float | None:
    if reference is None or "forget" not in reports:
        return None
    return tofu_metrics.forget_quality([s["truth_ratio"] for s in reports["forget"]["samples"]], reference)


# ---------------------------------------------------------------------------------------------
# head isolation


@dataclass(frozen=True)
class IsolationTable:
    """``probability[v][d]`` = mean answer probability p̄ of view ``views[v]`` on the QA pairs of
    sub-domain ``domains[d]`` (with "retain" as one of the domains). A well-isolated bundle has a
    low value only where a view forgets that domain, and the original model's value elsewhere."""

    views: list[str]
    domains: list[str]
    probability: list[list[float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "views": self.views,
            "domains": self.domains,
            "probability": {
                v: dict(zip(self.domains, row)) for v, row in zip(self.views, self.probability)
            },
        }


def isolation_matrix(
    scorers_by_view: Mapping[str, Scorer], qa_by_subdomain: Mapping[str, Sequence[Record]],
    prompt_format: PromptFormat = QA_FORMAT,
) -> IsolationTable:
    """Answer probability of every view on every sub-domain's QA (records: question, answer)."""
    if not scorers_by_view or not qa_by_subdomain:
        raise ValueError("the isolation matrix needs at least one view and one sub-domain")
    rows = [
        [_mean_probability(scorer, records, prompt_format) for records in qa_by_subdomain.values()]
        for scorer in scorers_by_view.values()
    ]
    return IsolationTable(list(scorers_by_view), list(qa_by_subdomain), rows)


def _mean_probability(scorer: Scorer, records: Sequence[Record], fmt: PromptFormat) -> float:
    prompts = [fmt.prompt(r["question"]) for r in records]
    answers = [fmt.answer(r["answer"]) for r in records]
    return tofu_metrics.mean([tofu_metrics.answer_probability(lp) for lp in scorer.answer_logprobs(prompts, answers)])
