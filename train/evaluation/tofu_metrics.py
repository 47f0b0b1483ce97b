"""TOFU unlearning metrics on plain numbers (no model, no tokenizer).

Definitions follow open-unlearning (locuslab/open-unlearning, ``src/evals/metrics``); every
function here states its exact formula. Inputs are per-token log-probabilities of an answer
given its prompt, ``ℓ_1 … ℓ_n`` (natural log), as produced by :mod:`train.evaluation.scorers`.

Notation used throughout:

    L̄(a)  = −(1/n) Σ_i ℓ_i              mean answer-token NLL of answer a
    p̄(a)  = exp(−L̄(a))                 length-normalised answer probability

Everything works in log space until the last step, so long answers never underflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
from rouge_score import rouge_scorer
from scipy import special, stats

# The nine numbers whose harmonic mean is TOFU's model utility (open-unlearning key names in
# brackets): retain_Q_A_Prob, retain_Q_A_ROUGE, retain_Truth_Ratio, ra_Q_A_Prob_normalised,
# ra_Q_A_ROUGE, ra_Truth_Ratio, wf_Q_A_Prob_normalised, wf_Q_A_ROUGE, wf_Truth_Ratio.
MODEL_UTILITY_KEYS: tuple[str, ...] = (
    "retain/probability",
    "retain/rouge_l_recall",
    "retain/truth_ratio",
    "real_authors/probability",
    "real_authors/rouge_l_recall",
    "real_authors/truth_ratio",
    "world_facts/probability",
    "world_facts/rouge_l_recall",
    "world_facts/truth_ratio",
)


def mean_nll(logprobs: Sequence[float]) -> float:
    """L̄ = −(1/n) Σ_i ℓ_i, the mean negative log-likelihood over the answer tokens."""
    if len(logprobs) == 0:
        raise ValueError("an answer needs at least one scored token; got an empty list")
    return -float(np.mean(np.asarray(logprobs, dtype=np.float64)))


def answer_probability(logprobs: Sequence[float]) -> float:
    """p̄ = exp(−L̄): the geometric-mean per-token probability of one answer (TOFU "Prob")."""
    return math.exp(-mean_nll(logprobs))


def normalized_probability(
    correct_logprobs: Sequence[float], perturbed_logprobs: Sequence[Sequence[float]]
) -> float:
    """p̄(correct) / (p̄(correct) + Σ_j p̄(perturbed_j)).

    open-unlearning's ``probability_w_options``, used for real authors and world facts: the
    correct answer's share of the probability mass among itself and its wrong options, so a
    model that is merely unsure of the phrasing is not punished. The ratio is computed as
    1 / (1 + Σ_j exp(L̄_c − L̄_j)) to stay finite for very unlikely answers.
    """
    if not perturbed_logprobs:
        raise ValueError("normalized probability needs at least one perturbed answer")
    l_correct = mean_nll(correct_logprobs)
    log_rel = np.array([l_correct - mean_nll(lp) for lp in perturbed_logprobs])
    # p = 1 / (1 + Σ_j exp(L̄_c − L̄_j)) = sigmoid(−logsumexp_j(L̄_c − L̄_j)), overflow-free.
    return float(special.expit(-special.logsumexp(log_rel)))


def truth_ratio(
    true_logprobs: Sequence[float], perturbed_logprobs: Sequence[Sequence[float]]
) -> float:
    """R = (Π_j p̄(perturbed_j))^(1/m) / p̄(true)  =  exp(L̄(true) − (1/m) Σ_j L̄(perturbed_j)).

    The geometric mean of the m length-normalised perturbed-answer probabilities divided by the
    length-normalised probability of the true answer (the paraphrased answer on forget/retain,
    the answer itself on real authors/world facts). This is open-unlearning's per-sample
    ``truth_ratio`` value (``wrong_prob / correct_prob`` with ``wrong_prob = exp(−mean_j L̄_j)``),
    minus its 1e-10 guard, which log space makes unnecessary. R < 1: the model prefers the truth.
    """
    if not perturbed_logprobs:
        raise ValueError("truth ratio needs at least one perturbed answer")
    mean_perturbed_nll = float(np.mean([mean_nll(lp) for lp in perturbed_logprobs]))
    return math.exp(mean_nll(true_logprobs) - mean_perturbed_nll)


def truth_ratio_forget_score(ratios: Sequence[float]) -> float:
    """mean_i min(R_i, 1/R_i) — open-unlearning's ``closer_to_1_better`` (reported for forget).

    On forgotten data the ideal model cannot tell true from false, R ≈ 1, score ≈ 1.
    """
    r = _nonempty_array(ratios, "truth ratios")
    return float(np.mean(np.minimum(r, 1.0 / r)))


def truth_ratio_retain_score(ratios: Sequence[float]) -> float:
    """mean_i max(0, 1 − R_i) — open-unlearning's ``true_better`` (retain, real authors, world
    facts; the form that enters model utility). Higher means the truth is preferred."""
    r = _nonempty_array(ratios, "truth ratios")
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def forget_quality(unlearned_ratios: Sequence[float], retain_model_ratios: Sequence[float]) -> float:
    """p-value of the two-sample Kolmogorov–Smirnov test between the per-sample forget-set truth
    ratios R of the unlearned model and of the retain (never-saw-the-forget-set) model.

    ``scipy.stats.ks_2samp(unlearned, retain_model).pvalue``. open-unlearning feeds 1/R instead of
    R; KS depends on ranks only and x ↦ 1/x is strictly monotone, so the p-value is the same.
    High (→ 1): the unlearned model is statistically indistinguishable from the retain model.
    """
    a = _nonempty_array(unlearned_ratios, "unlearned truth ratios")
    b = _nonempty_array(retain_model_ratios, "retain-model truth ratios")
    return float(stats.ks_2samp(a, b).pvalue)


def model_utility(values: Mapping[str, float]) -> float:
    """Harmonic mean of the nine numbers in :data:`MODEL_UTILITY_KEYS`:
    (retain, real authors, world facts) × (probability, ROUGE-L recall, truth-ratio score).

    Probability is plain p̄ for retain and :func:`normalized_probability` for real authors and
    world facts; truth ratio is :func:`truth_ratio_retain_score` everywhere. A harmonic mean is 0
    as soon as one term is 0, so utility collapses if any capability collapses.
    """
    missing = [k for k in MODEL_UTILITY_KEYS if k not in values]
    if missing:
        raise ValueError(f"model utility needs all nine numbers; missing: {', '.join(missing)}")
    terms = np.array([values[k] for k in MODEL_UTILITY_KEYS], dtype=np.float64)
    if np.any(terms < 0):
        raise ValueError(f"model-utility terms must be >= 0, got {terms.tolist()}")
    # scipy's hmean warns and returns 0 on a zero term; say 0 directly.
    return 0.0 if np.any(terms == 0) else float(stats.hmean(terms))


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall = LCS(prediction, reference) / |reference| in rouge-score's tokens
    (lower-cased alphanumeric words, Porter-stemmed, as open-unlearning configures it)."""
    return float(_rouge_scorer().score(target=reference, prediction=prediction)["rougeL"].recall)


def extraction_strength(greedy_matches: Sequence[bool]) -> float:
    """ES = 1 − k*/n, where k* = min{k ∈ 0…n : the model greedily reproduces y_k … y_{n−1}
    after being given the prompt and the answer prefix y_0 … y_{k−1}} (Wang et al., 2025).

    ``greedy_matches[i]`` says whether the argmax next token at answer position i, teacher-forced
    on the gold prefix, equals the gold token y_i. The suffix from k is greedily reproduced iff all
    positions i ≥ k match, so k* = n − (length of the trailing run of matches) and
    ES = (trailing run)/n: 1 = the whole answer is extracted from the prompt alone, 0 = not even
    the last token. (open-unlearning's loop stops at k = n − 1 and so gives 1/n instead of 0 when
    nothing matches; here k = n, the empty suffix, is allowed.) EOS is not part of the answer.
    """
    n = len(greedy_matches)
    if n == 0:
        raise ValueError("extraction strength needs at least one answer token")
    run = 0
    for matched in reversed(greedy_matches):
        if not matched:
            break
        run += 1
    return run / n


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean over samples (how every per-sample metric is aggregated)."""
    return float(np.mean(_nonempty_array(values, "values")))


def _nonempty_array(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"{what}: need at least one value")
    return arr


@lru_cache(maxsize=1)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    # Building the scorer loads the stemmer; do it once per process.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def ks_statistic(unlearned_ratios: Sequence[float], retain_model_ratios: Sequence[float]) -> float:
    """D = sup_x |F_unlearned(x) − F_retain(x)|, the two-sample KS statistic behind
    :func:`forget_quality` (at n = m = 200, p ≥ 0.05 needs D ≤ ≈ 0.135)."""
    a = _nonempty_array(unlearned_ratios, "unlearned truth ratios")
    b = _nonempty_array(retain_model_ratios, "retain-model truth ratios")
    return float(stats.ks_2samp(a, b).statistic)


def forget_quality_interval(unlearned_ratios: Sequence[float], retain_model_ratios: Sequence[float],
                            resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`forget_quality` over the forget questions.

    Both models answer the same questions, so question i's pair (R_i unlearned, R_i retain) is
    resampled together: each resample draws n question indices with replacement and recomputes
    the KS p-value. The interval says how much of the p-value is the particular questions drawn."""
    a = _nonempty_array(unlearned_ratios, "unlearned truth ratios")
    b = _nonempty_array(retain_model_ratios, "retain-model truth ratios")
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same questions: {a.size} vs {b.size} truth ratios")
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for k in range(resamples):
        index = rng.integers(0, a.size, a.size)
        values[k] = stats.ks_2samp(a[index], b[index]).pvalue
    tail = (1.0 - level) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def membership_auc(member_nll: Sequence[float], nonmember_nll: Sequence[float]) -> float:
    """AUC of the loss attack: P(NLL of a member < NLL of a non-member), ties counting ½.

    Members are the forget answers, non-members the holdout authors' answers (never trained).
    0.5: the model cannot tell them apart, as for a model that never saw the forget set. It is the
    Mann–Whitney U statistic of (non-member, member) divided by n·m."""
    members = _nonempty_array(member_nll, "member NLLs")
    others = _nonempty_array(nonmember_nll, "non-member NLLs")
    u = stats.mannwhitneyu(others, members, alternative="two-sided").statistic
    return float(u / (members.size * others.size))


def privacy_leak(auc_model: float, auc_retain_model: float) -> float:
    """open-unlearning's privleak: (AUC_model − AUC_retain) / AUC_retain × 100. 0 is the retain
    model; positive: the forget set still looks like training data; negative: over-unlearned."""
    if auc_retain_model <= 0:
        raise ValueError("the retain model's AUC must be positive")
    return (auc_model - auc_retain_model) / auc_retain_model * 100.0
