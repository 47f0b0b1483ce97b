"""Statistics of an A/B experiment: per-arm summaries and tests of each arm against the control arm.

All the statistics come from numpy and scipy; this module only chooses them and shapes the result:

- latency and time to first token: mean, p50 and p95 (`numpy.percentile`, linear interpolation);
- error rate: errors / requests with a Wilson score interval (`scipy.stats.binomtest(...).proportion_ci`),
  which stays inside [0, 1] and behaves at 0 or n errors, unlike the normal approximation;
- feedback: mean rating with a Student-t confidence interval (`scipy.stats.t.interval`, standard error
  from `scipy.stats.sem`);
- arm vs control, feedback: Welch's t-test (`scipy.stats.ttest_ind(equal_var=False)`), which does not
  assume the two arms' ratings have the same variance;
- arm vs control, error rate: Pearson's chi-square test of the 2×2 table errors/successes × arm/control
  (`scipy.stats.chi2_contingency`, no continuity correction: the two-proportion z-test squared), or
  Fisher's exact test (`scipy.stats.fisher_exact`) when an expected cell count is below 5, where the
  chi-square approximation is poor.

Every value that cannot be computed (no data, too few samples, zero variance) is None with a `note`
saying why, never NaN: the report is served as strict JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from .records import ArmSamples, ExperimentInfo, ProbeResult

DEFAULT_CONFIDENCE = 0.95
MIN_EXPECTED_FOR_CHI2 = 5.0


@dataclass(frozen=True)
class Distribution:
    """Mean, median and 95th percentile of a sample (None when it is empty)."""

    n: int
    mean: float | None
    p50: float | None
    p95: float | None


@dataclass(frozen=True)
class Estimate:
    """A mean (or proportion) with its confidence interval [low, high] at the report's level."""

    n: int
    mean: float | None
    low: float | None
    high: float | None
    std: float | None = None


@dataclass(frozen=True)
class TestResult:
    """One significance test of an arm against the control arm. `difference` = arm − control
    (mean rating, or error rate); `significant` = p_value < 1 − confidence."""

    test: str
    statistic: float | None
    p_value: float | None
    difference: float | None
    significant: bool | None
    note: str | None = None


@dataclass(frozen=True)
class Comparison:
    feedback: TestResult
    errors: TestResult


@dataclass(frozen=True)
class ProbeSummary:
    """The latest offline probe of an arm; `stale` when the arm's view or its version has changed since."""

    metrics: Mapping[str, float | None]
    view: str
    view_version: str | None
    samples: int
    source: str | None
    created_at: object
    stale: bool


@dataclass(frozen=True)
class ArmReport:
    arm: str
    view: str | None
    weight: float | None
    control: bool
    requests: int
    errors: int
    error_rate: Estimate
    latency_ms: Distribution
    ttft_ms: Distribution
    prompt_tokens: int
    completion_tokens: int
    feedback: Estimate
    probe: ProbeSummary | None
    vs_control: Comparison | None  # None for the control arm itself


@dataclass(frozen=True)
class ExperimentReport:
    experiment: str
    alias: str
    status: str
    control_arm: str
    tenants: tuple[str, ...]
    confidence: float
    arms: tuple[ArmReport, ...]


# ---- single-sample summaries ------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def distribution(values: Sequence[float]) -> Distribution:
    """n, mean, p50 and p95 of `values`."""
    if not values:
        return Distribution(0, None, None, None)
    data = np.asarray(values, dtype=float)
    p50, p95 = np.percentile(data, [50, 95])
    return Distribution(len(data), float(data.mean()), float(p50), float(p95))


def mean_interval(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> Estimate:
    """Mean with a Student-t confidence interval; the interval needs at least two values."""
    if not values:
        return Estimate(0, None, None, None)
    data = np.asarray(values, dtype=float)
    mean = float(data.mean())
    if len(data) < 2:
        return Estimate(1, mean, None, None)
    sem = float(sps.sem(data))
    std = float(data.std(ddof=1))
    if sem == 0.0:
        return Estimate(len(data), mean, mean, mean, std)
    low, high = sps.t.interval(confidence, df=len(data) - 1, loc=mean, scale=sem)
    return Estimate(len(data), mean, float(low), float(high), std)


def proportion_interval(successes: int, trials: int, confidence: float = DEFAULT_CONFIDENCE) -> Estimate:
    """successes / trials with a Wilson score interval."""
    if trials <= 0:
        return Estimate(0, None, None, None)
    ci = sps.binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return Estimate(trials, successes / trials, float(ci.low), float(ci.high))


# ---- tests against the control arm ------------------------------------------------------------------


def welch_test(arm: Sequence[float], control: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> TestResult:
    """Welch's t-test of two arms' ratings (arm − control)."""
    name = "welch_t"
    if len(arm) < 2 or len(control) < 2:
        return TestResult(name, None, None, None, None, "needs at least 2 ratings in both arms")
    a, c = np.asarray(arm, dtype=float), np.asarray(control, dtype=float)
    difference = float(a.mean() - c.mean())
    if a.var(ddof=1) == 0.0 and c.var(ddof=1) == 0.0:
        return TestResult(name, None, None, difference, None, "all ratings are equal within each arm")
    result = sps.ttest_ind(a, c, equal_var=False)
    p_value = _finite(result.pvalue)
    significant = None if p_value is None else p_value < 1.0 - confidence
    return TestResult(name, _finite(result.statistic), p_value, difference, significant)


def error_rate_test(errors: int, requests: int, control_errors: int, control_requests: int,
                    confidence: float = DEFAULT_CONFIDENCE) -> TestResult:
    """Chi-square (or Fisher's exact, for small expected counts) test of two arms' error rates."""
    if requests <= 0 or control_requests <= 0:
        return TestResult("chi2", None, None, None, None, "needs at least 1 request in both arms")
    table = np.array([[errors, requests - errors], [control_errors, control_requests - control_errors]])
    difference = errors / requests - control_errors / control_requests
    expected = sps.contingency.expected_freq(table)
    if expected.min() < MIN_EXPECTED_FOR_CHI2:
        statistic, p_value = sps.fisher_exact(table)
        name = "fisher_exact"
    else:
        statistic, p_value, _, _ = sps.chi2_contingency(table, correction=False)
        name = "chi2"
    p_value = _finite(p_value)
    significant = None if p_value is None else p_value < 1.0 - confidence
    return TestResult(name, _finite(statistic), p_value, float(difference), significant)


# ---- the report ---------------------------------------------------------------------------------------


def _probe_summary(probe: ProbeResult | None, view: str | None, view_version: str | None) -> ProbeSummary | None:
    if probe is None:
        return None
    stale = probe.view != view or probe.view_version != view_version
    return ProbeSummary(dict(probe.metrics), probe.view, probe.view_version, probe.samples, probe.source,
                        probe.created_at, stale)


def arm_report(samples: ArmSamples, control: ArmSamples | None, *, is_control: bool, probe: ProbeSummary | None,
               confidence: float = DEFAULT_CONFIDENCE) -> ArmReport:
    """Summaries of one arm, and its tests against `control` (None for the control arm itself)."""
    comparison = None
    if control is not None and not is_control:
        comparison = Comparison(
            feedback=welch_test(samples.ratings, control.ratings, confidence),
            errors=error_rate_test(samples.errors, samples.requests, control.errors, control.requests, confidence),
        )
    feedback = mean_interval(samples.ratings, confidence)
    if feedback.n != samples.feedback_count:  # more ratings than sampled: keep the exact count
        feedback = Estimate(samples.feedback_count, feedback.mean, feedback.low, feedback.high, feedback.std)
    return ArmReport(
        arm=samples.arm, view=samples.view, weight=samples.weight, control=is_control,
        requests=samples.requests, errors=samples.errors,
        error_rate=proportion_interval(samples.errors, samples.requests, confidence),
        latency_ms=distribution(samples.latency_ms), ttft_ms=distribution(samples.ttft_ms),
        prompt_tokens=samples.prompt_tokens, completion_tokens=samples.completion_tokens,
        feedback=feedback, probe=probe, vs_control=comparison,
    )


def experiment_report(experiment: ExperimentInfo, arms: Sequence[ArmSamples], probes: Sequence[ProbeResult],
                      view_versions: Mapping[str, str | None], confidence: float = DEFAULT_CONFIDENCE) -> ExperimentReport:
    """The full report: every arm (control included) with its summaries, latest probe and tests.

    `probes` may hold several results per arm; the newest (highest id) counts. `view_versions` maps
    a view name to its current composed content hash (None for "original")."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence {confidence} must be in [0.5, 1)")
    latest: dict[str, ProbeResult] = {}
    for probe in sorted(probes, key=lambda p: p.id):
        latest[probe.arm] = probe
    control = next((a for a in arms if a.arm == experiment.control_arm), None)
    reports = tuple(
        arm_report(a, control, is_control=a.arm == experiment.control_arm, confidence=confidence,
                   probe=_probe_summary(latest.get(a.arm), a.view, view_versions.get(a.view or "")))
        for a in arms
    )
    return ExperimentReport(experiment.name, experiment.alias, experiment.status, experiment.control_arm,
                            experiment.tenants, confidence, reports)
