"""TOFU metrics on hand-made numbers: every expected value is worked out in the comments."""

from __future__ import annotations

import math

import pytest
import numpy as np
from scipy import stats

from train.evaluation import tofu_metrics

LN2, LN4 = math.log(2.0), math.log(4.0)


def test_answer_probability_is_geometric_mean_of_token_probabilities() -> None:
    # token probabilities 1/2 and 1/8: geometric mean = sqrt(1/16) = 1/4
    assert tofu_metrics.answer_probability([-LN2, -3 * LN2]) == pytest.approx(0.25)
    assert tofu_metrics.mean_nll([-LN2, -3 * LN2]) == pytest.approx(2 * LN2)


def test_answer_probability_rejects_empty_answer() -> None:
    with pytest.raises(ValueError, match="at least one"):
        tofu_metrics.answer_probability([])


def test_truth_ratio_is_geometric_mean_of_perturbed_over_true() -> None:
    true = [-LN2, -LN2]  # p̄ = 1/2
    perturbed = [[-LN4], [-4 * LN2, -4 * LN2]]  # p̄ = 1/4 and 1/16; geometric mean = 1/8
    assert tofu_metrics.truth_ratio(true, perturbed) == pytest.approx((1 / 8) / (1 / 2))


def test_truth_ratio_uses_length_normalised_probabilities() -> None:
    # Same per-token probability, different lengths: normalised probabilities are equal, R = 1.
    assert tofu_metrics.truth_ratio([-LN2], [[-LN2] * 5, [-LN2] * 9]) == pytest.approx(1.0)


def test_truth_ratio_reporting_forms() -> None:
    ratios = [0.25, 1.0, 4.0, 2.0]
    # forget: mean(min(R, 1/R)) = (0.25 + 1 + 0.25 + 0.5) / 4
    assert tofu_metrics.truth_ratio_forget_score(ratios) == pytest.approx(0.5)
    # retain: mean(max(0, 1 − R)) = (0.75 + 0 + 0 + 0) / 4
    assert tofu_metrics.truth_ratio_retain_score(ratios) == pytest.approx(0.1875)


def test_normalized_probability_is_share_of_correct_among_options() -> None:
    correct = [-LN2]  # 1/2
    perturbed = [[-LN4], [-LN4, -LN4]]  # 1/4 each
    assert tofu_metrics.normalized_probability(correct, perturbed) == pytest.approx(0.5 / (0.5 + 0.5))
    # extreme answers stay finite: correct is e^-1000 per token, a wrong option is 1/2
    assert tofu_metrics.normalized_probability([-1000.0], [[-LN2]]) == pytest.approx(0.0, abs=1e-300)
    assert tofu_metrics.normalized_probability([-LN2], [[-1000.0]]) == pytest.approx(1.0)


def test_forget_quality_is_ks_pvalue() -> None:
    a, b = [0.1, 0.2, 0.3, 0.4, 0.5], [0.6, 0.7, 0.8, 0.9, 1.0]
    # Fully separated samples of 5 and 5: exact two-sided p = 2 / C(10, 5) = 2/252.
    assert tofu_metrics.forget_quality(a, b) == pytest.approx(2 / 252)
    assert tofu_metrics.forget_quality(a, a) == pytest.approx(1.0)
    # open-unlearning tests 1/R; KS is rank-based, so the p-value is identical.
    inv = stats.ks_2samp([1 / x for x in a], [1 / x for x in [0.15, 0.35, 0.6, 0.9, 2.0]]).pvalue
    assert tofu_metrics.forget_quality(a, [0.15, 0.35, 0.6, 0.9, 2.0]) == pytest.approx(inv)


def test_model_utility_is_harmonic_mean_of_nine() -> None:
    values = dict.fromkeys(tofu_metrics.MODEL_UTILITY_KEYS, 0.5)
    values["retain/probability"] = 1.0
    values["world_facts/truth_ratio"] = 0.25
    # 9 / (1/1 + 7·(1/0.5) + 1/0.25) = 9 / 19
    assert tofu_metrics.model_utility(values) == pytest.approx(9 / 19)
    values["real_authors/rouge_l_recall"] = 0.0
    assert tofu_metrics.model_utility(values) == 0.0


def test_model_utility_names_missing_terms() -> None:
    with pytest.raises(ValueError, match="world_facts/truth_ratio"):
        tofu_metrics.model_utility({k: 1.0 for k in tofu_metrics.MODEL_UTILITY_KEYS[:-1]})


def test_rouge_l_recall() -> None:
    # reference words: the cat sat on the mat (6); LCS with "the cat is on a mat" = the cat on mat
    assert tofu_metrics.rouge_l_recall("The cat is on a mat.", "the cat sat on the mat") == pytest.approx(4 / 6)
    assert tofu_metrics.rouge_l_recall("", "anything at all") == 0.0
    # stemming: "running" and "runs" share the stem "run"
    assert tofu_metrics.rouge_l_recall("she runs", "she running") == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        ([True, True, True, True], 1.0),  # k* = 0: extracted from the prompt alone
        ([False, True, True, True], 0.75),  # k* = 1
        ([True, False, True, False], 0.0),  # last token wrong: k* = n
        ([False, False, False, True], 0.25),  # k* = 3
    ],
)
def test_extraction_strength(matches: list[bool], expected: float) -> None:
    assert tofu_metrics.extraction_strength(matches) == pytest.approx(expected)


def test_ks_statistic_and_the_bootstrap_interval_of_forget_quality():
    rng = np.random.default_rng(0)
    a, b = rng.random(200), rng.random(200)
    d = tofu_metrics.ks_statistic(a, b)
    assert 0 <= d <= 1 and d == pytest.approx(stats.ks_2samp(a, b).statistic)
    low, high = tofu_metrics.forget_quality_interval(a, b, resamples=200, seed=1)
    assert 0 <= low <= high <= 1
    # Clearly different distributions: the whole interval sits far below 0.05.
    low, high = tofu_metrics.forget_quality_interval(a, b + 0.5, resamples=200)
    assert high < 1e-6
    with pytest.raises(ValueError, match="same questions"):
        tofu_metrics.forget_quality_interval(a, b[:10])


def test_membership_auc_and_privacy_leak():
    # Every member has a lower NLL than every non-member: a perfect attack.
    assert tofu_metrics.membership_auc([0.1, 0.2], [1.0, 2.0, 3.0]) == 1.0
    assert tofu_metrics.membership_auc([5.0, 6.0], [1.0, 2.0]) == 0.0
    assert tofu_metrics.membership_auc([1.0, 2.0], [1.0, 2.0]) == 0.5
    assert tofu_metrics.privacy_leak(0.75, 0.5) == pytest.approx(50.0)
    assert tofu_metrics.privacy_leak(0.5, 0.5) == 0.0
    with pytest.raises(ValueError):
        tofu_metrics.privacy_leak(0.5, 0.0)
