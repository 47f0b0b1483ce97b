"""Scoring for the unlearning benchmark: one view's TOFU report, the validity gates, one table row.

A view is scored once (`score_view`, and `holdout_nll` apart, as the holdout set can change
without the evaluation sets) into a compact result that keeps what later comparisons need:
per-question forget truth ratios (forget quality is a KS test against retain-a's), forget and
holdout answer NLLs (the membership figures), and the nine model-utility terms. Everything
else (FQ, its CI, the privacy leak) is computed from those arrays against the references
(`row_for`), so no view is ever scored twice.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.evaluation import tofu_metrics
from train.data.unlearn_split import UnlearnSplit

# The gates' thresholds (see benchmarks.unlearn_bench).
G1_FULL_FORGET_ROUGE = 0.8
G2_FULL_FQ_MAX = 1e-4
G3_NOISE_FQ_MIN = 0.2
G4_MU_RATIO = (0.95, 1.05)
G4_MIN_TERM = 0.1
G5_FULL_MAX = 1e-3
G5_RETAIN_MIN = 0.05


def view_scorer(model_dir: str | Path, bundle_dir: str | Path | None, view: str, *, batch_size: int, bf16: bool,
                progress: bool):
    """A LocalScorer of one view (`original` for a plain model), under bf16 autocast if asked."""
    import torch

    from train.evaluation.bundle_views import local_view_scorers

    scorer = local_view_scorers(str(model_dir), str(bundle_dir) if bundle_dir else None, [view], device="cpu",
                                batch_size=batch_size, progress=progress)[view]
    if bf16:
        inner = scorer.mode

        @contextlib.contextmanager
        def mode():
            with inner(), torch.autocast("cpu", dtype=torch.bfloat16):
                yield
        scorer.mode = mode
    return scorer


def score_view(scorer: Any, split: UnlearnSplit, fmt: Any, *, max_new_tokens: int) -> dict[str, Any]:
    """TOFU metrics of one view, compact (`compact_report`); EOS scored after every answer."""
    from train.evaluation.tofu_eval import evaluate_tofu

    report = evaluate_tofu(scorer, split.eval_sets, max_new_tokens=max_new_tokens, prompt_format=fmt,
                           answer_suffix=scorer.tokenizer.eos_token)
    return compact_report(report, split)


def holdout_nll(scorer: Any, split: UnlearnSplit, fmt: Any) -> list[float]:
    """Mean answer NLL (EOS scored) of every scored holdout answer under one view."""
    eos = scorer.tokenizer.eos_token
    logprobs = scorer.answer_logprobs([fmt.prompt(r["question"]) for r in split.holdout],
                                      [fmt.answer(r["answer"]) + eos for r in split.holdout])
    return [tofu_metrics.mean_nll(lp) for lp in logprobs]


def compact_report(report: Mapping[str, Any], split: UnlearnSplit) -> dict[str, Any]:
    sets = report["sets"]
    forget = sets["forget"]["samples"]
    per_head: dict[str, list[float]] = {}
    for record, sample in zip(split.eval_sets["forget"], forget):
        per_head.setdefault(record["subdomain"], []).append(sample["probability"])
    terms = {key: sets[key.split("/")[0]][key.split("/")[1]] for key in tofu_metrics.MODEL_UTILITY_KEYS}
    return {
        "model_utility": report["model_utility"],
        "mu_terms": terms,
        "sets": {name: {k: v for k, v in summary.items() if k != "samples"} for name, summary in sets.items()},
        "forget_truth_ratios": [s["truth_ratio"] for s in forget],
        "forget_nll": [-math.log(max(s["probability"], 1e-300)) for s in forget],
        "forget_rouge": [s["rouge_l_recall"] for s in forget],
        "head_probability": {head: tofu_metrics.mean(values) for head, values in per_head.items()},
        "examples": [{"question": s["question"], "answer": s["answer"], "generation": s["generation"]}
                     for s in forget[:5]],
    }


# ---- comparisons -----------------------------------------------------------------------------------------


def forget_quality_of(view: Mapping[str, Any], reference: Mapping[str, Any], resamples: int,
                      seed: int = 0) -> dict[str, float]:
    """FQ (KS p-value), D, and the bootstrap interval of FQ, of `view` against `reference`."""
    a, b = view["forget_truth_ratios"], reference["forget_truth_ratios"]
    low, high = tofu_metrics.forget_quality_interval(a, b, resamples, seed=seed)
    return {"fq": tofu_metrics.forget_quality(a, b), "ks_d": tofu_metrics.ks_statistic(a, b), "fq_low": low, "fq_high": high}


def nll_ks_pvalue(view: Mapping[str, Any]) -> float:
    """KS p-value of forget vs holdout answer NLL: small when the forget answers still look trained."""
    from scipy import stats

    return float(stats.ks_2samp(view["forget_nll"], view["holdout_nll"]).pvalue)


def membership(view: Mapping[str, Any]) -> float:
    return tofu_metrics.membership_auc(view["forget_nll"], view["holdout_nll"])


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    detail: str


def validity_gates(full: Mapping[str, Any], retain_a: Mapping[str, Any], retain_b: Mapping[str, Any],
                   resamples: int) -> list[Gate]:
    """G1–G5 on the reference models (see benchmarks.unlearn_bench)."""
    full_rouge = full["sets"]["forget"]["rouge_l_recall"]
    fq_full = forget_quality_of(full, retain_a, resamples)
    fq_noise = forget_quality_of(retain_b, retain_a, resamples)
    mu_ratio = retain_a["model_utility"] / full["model_utility"] if full["model_utility"] else math.inf
    low_terms = {k: v for k, v in full["mu_terms"].items() if v < G4_MIN_TERM}
    ks_full, ks_retain = nll_ks_pvalue(full), nll_ks_pvalue(retain_a)
    return [
        Gate("G1", full_rouge >= G1_FULL_FORGET_ROUGE,
             f"full-model forget ROUGE-L {full_rouge:.3f} ≥ {G1_FULL_FORGET_ROUGE}"),
        Gate("G2", fq_full["fq"] <= G2_FULL_FQ_MAX,
             f"FQ(full vs retain-a) {fq_full['fq']:.3g} (D {fq_full['ks_d']:.3f}) ≤ {G2_FULL_FQ_MAX:g}"),
        Gate("G3", fq_noise["fq"] >= G3_NOISE_FQ_MIN,
             f"FQ(retain-b vs retain-a) {fq_noise['fq']:.3g} (D {fq_noise['ks_d']:.3f}, CI "
             f"{fq_noise['fq_low']:.3g}–{fq_noise['fq_high']:.3g}) ≥ {G3_NOISE_FQ_MIN}"),
        Gate("G4", G4_MU_RATIO[0] <= mu_ratio <= G4_MU_RATIO[1] and not low_terms,
             f"MU(retain-a)/MU(full) {mu_ratio:.3f} in [{G4_MU_RATIO[0]}, {G4_MU_RATIO[1]}]; full-model MU terms "
             f"below {G4_MIN_TERM}: {sorted(low_terms) or 'none'}"),
        Gate("G5", ks_full <= G5_FULL_MAX and ks_retain >= G5_RETAIN_MIN,
             f"forget-vs-holdout NLL KS p: full {ks_full:.3g} ≤ {G5_FULL_MAX:g}, retain-a {ks_retain:.3g} ≥ "
             f"{G5_RETAIN_MIN}"),
    ]


def row_for(label: str, view: Mapping[str, Any], references: Mapping[str, Mapping[str, Any]],
            resamples: int) -> dict[str, Any]:
    """One table row: the view against retain-a (FQ, privacy leak) and full (MU ratio)."""
    retain_a, full = references["retain-a"], references["full"]
    fq = forget_quality_of(view, retain_a, resamples)
    forget_p = view["sets"]["forget"]["probability"]
    return {
        "method": label, **fq,
        "model_utility": view["model_utility"],
        "mu_vs_full": view["model_utility"] / full["model_utility"] if full["model_utility"] else None,
        "forget_rouge": view["sets"]["forget"]["rouge_l_recall"],
        "forget_probability": forget_p,
        "forget_probability_vs_retain_a": forget_p / retain_a["sets"]["forget"]["probability"],
        "privacy_leak": tofu_metrics.privacy_leak(membership(view), membership(retain_a)),
        "mu_terms": view["mu_terms"],
    }


# ---- isolation ---------------------------------------------------------------------------------------------

ISOLATION_OWN_MAX = 0.2      # a head's own sub-domain: answer probability ≤ 0.2× full
ISOLATION_OTHER_MIN = 0.9    # every other sub-domain keeps ≥ 0.9×
ISOLATION_KEEP_MIN = 0.95    # retain, real authors, world facts keep ≥ 0.95×
ISOLATION_STACKED_MIN = 0.8  # the all-heads view keeps ≥ 0.8 of each head's single-head log-drop


def isolation_table(model_dir: str | Path, bundle_dir: str | Path, split: UnlearnSplit, fmt: Any, *,
                    batch_size: int, bf16: bool, progress: bool) -> dict[str, Any]:
    """Mean answer probability of the original model, every single-head view and the served
    all-heads view on each forget sub-domain, retain, real authors and world facts, with each
    view's ratio to the original model and the isolation targets checked."""
    import torch

    from train.evaluation.bundle_views import CALIBRATED_PREFIX, local_view_scorers

    heads = split.heads
    views = {"original": "original", **{f"forget-{h}": h for h in heads},
             "served (all heads)": CALIBRATED_PREFIX + "+".join(heads)}
    scorers = local_view_scorers(str(model_dir), str(bundle_dir), list(views.values()), device="cpu",
                                 batch_size=batch_size, progress=progress)
    domains = {**split.forget_by_head(), "retain": split.eval_sets["retain"],
               "real_authors": split.eval_sets["real_authors"], "world_facts": split.eval_sets["world_facts"]}
    probability: dict[str, dict[str, float]] = {}
    for label, view in views.items():
        scorer = scorers[view]
        eos = scorer.tokenizer.eos_token
        row = {}
        for domain, records in domains.items():
            with (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
                logprobs = scorer.answer_logprobs([fmt.prompt(r["question"]) for r in records],
                                                  [fmt.answer(r["answer"]) + eos for r in records])
            row[domain] = tofu_metrics.mean([tofu_metrics.answer_probability(lp) for lp in logprobs])
        probability[label] = row
    base = probability["original"]
    ratio = {label: {d: row[d] / base[d] for d in row} for label, row in probability.items()}
    return {"views": list(views), "domains": list(domains), "probability": probability, "ratio": ratio,
            "checks": isolation_checks(ratio, heads)}


def isolation_checks(ratio: Mapping[str, Mapping[str, float]], heads: Sequence[str]) -> dict[str, Any]:
    """The isolation targets, each with the worst value found and whether it is met."""
    own = {h: ratio[f"forget-{h}"][h] for h in heads}
    other = {f"{h} on {d}": ratio[f"forget-{h}"][d] for h in heads for d in heads if d != h}
    keep = {f"{view} on {d}": ratio[view][d] for view in ratio if view != "original"
            for d in ("retain", "real_authors", "world_facts")}
    stacked = {}
    for h in heads:
        single = -math.log(max(own[h], 1e-300))
        both = -math.log(max(ratio["served (all heads)"][h], 1e-300))
        stacked[h] = both / single if single > 0 else math.inf

    def check(values: Mapping[str, float], bound: float, at_least: bool) -> dict[str, Any]:
        worst_key = (min if at_least else max)(values, key=values.get) if values else None
        worst = values[worst_key] if worst_key else None
        met = all((v >= bound) if at_least else (v <= bound) for v in values.values())
        return {"bound": bound, "worst": worst, "where": worst_key, "met": met}

    return {"own_subdomain_max": check(own, ISOLATION_OWN_MAX, False),
            "other_subdomains_min": check(other, ISOLATION_OTHER_MIN, True),
            "retain_ra_wf_min": check(keep, ISOLATION_KEEP_MIN, True),
            "stacked_log_drop_min": check(stacked, ISOLATION_STACKED_MIN, True)}
