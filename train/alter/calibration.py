"""View calibration: the head weight ω(n) for a served view that switches n forget heads on.

Each forget head B_d is trained to erase its own sub-domain while the retain head keeps utility.
Stacking n heads at weight 1,

    B_V = B_r + Σ_{d ∈ V} B_d,

adds n independently trained perturbations, and their sum damages the retain set far more than
any one of them (demo model, both heads at ω = 1: retain answer probability × 0.05). Shrinking
the forget weights trades forgetting against utility, and the response is sharply non-linear
(demo: retain × 0.38 at ω = 0.9, × 0.85 at 0.8, × 0.96 at 0.75, where each forget set still
drops 6–9×).
Any ω still collapses exactly into one rank-r LoRA, so a calibrated view costs nothing to serve.

Calibration picks, for every head count n = 1..k,

    ω(n) = max { ω ∈ [0, ω(n−1)] :  P_V(ω)(retain_cal) ≥ ρ · P_base(retain_cal) },   ω(0) = 1,
    V(ω) = {retain: 1, forget: {d: ω for d in S}},  |S| = n,

where P is the mean answer probability and `retain_cal` is a retain *calibration* set (never an
evaluation set). ω(n) is found by bisection (the retain probability falls monotonically in ω in
practice; both ends are checked first, so ω(n) = ω(n−1) when that already meets the bound and 0
when even the retain head alone does not). The cap ω(n−1) makes the weights non-increasing in n,
as the bundle format requires (more heads never get a larger weight). For n < k the head sets S
are a few random subsets, and the smallest ω wins, so the bound holds for those sets with margin
for others.
The result goes into the bundle manifest (`alter_serve.core.manifest.Calibration`) and is what a
"calibrated" view uses.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from alter_serve.core.manifest import Calibration

from train.examples import Example
from train.alter.modeling import AlterModel
from train.answer_probability import mean_answer_probability, model_forward


@dataclass(frozen=True)
class CalibrationSettings:
    min_retain_ratio: float = 0.95   # ρ
    steps: int = 6                   # bisection steps: ω to within 2⁻⁶
    subsets_per_count: int = 2       # random head sets tried per count n < k


Score = Callable[[Sequence[Example]], float]  # mean answer probability in the current mode


def calibrate_views(
    alter: AlterModel,
    retain: Sequence[Example],
    score: Score,
    settings: CalibrationSettings = CalibrationSettings(),
    seed: int = 0,
) -> Calibration:
    """ω(n) for n = 1..k forget heads (see the module docstring). `score(examples)` returns the mean
    answer probability of the model in its current mixing mode."""
    if not 0.0 < settings.min_retain_ratio <= 1.0:
        raise ValueError(f"min_retain_ratio must be in (0, 1], got {settings.min_retain_ratio}")
    heads = list(alter.forget_heads)
    with alter.mixing("off"):
        base = score(retain)
    if not (math.isfinite(base) and base > 0.0):
        raise ValueError(f"the base model's retain answer probability is {base}; a ratio to it is undefined, "
                         "so the views cannot be calibrated on this retain set")
    floor = settings.min_retain_ratio * base

    def retain_at(subset: Sequence[str], omega: float) -> float:
        with alter.mixing("view", retain=1.0, forget={h: omega for h in subset}):
            return score(retain)

    rng = random.Random(seed)
    weights: dict[int, float] = {}
    ratios: dict[int, float] = {}
    ceiling = 1.0
    for count in range(1, len(heads) + 1):
        found = [_largest_weight(subset, retain_at, floor, settings.steps, ceiling)
                 for subset in _subsets(heads, count, settings.subsets_per_count, rng)]
        omega, kept = min(found)
        weights[count], ratios[count] = omega, kept / base
        ceiling = omega
    return Calibration(min_retain_ratio=settings.min_retain_ratio, weights=weights,
                       retain_ratio={n: round(r, 6) for n, r in ratios.items()}, retain_examples=len(retain))


def _largest_weight(subset: Sequence[str], retain_at: Callable[[Sequence[str], float], float],
                    floor: float, steps: int, ceiling: float = 1.0) -> tuple[float, float]:
    """(ω, retain probability at ω): the largest ω on the bisection grid of [0, ceiling] with
    retain ≥ floor."""
    at_top = retain_at(subset, ceiling)
    if at_top >= floor or ceiling == 0.0:
        return ceiling, at_top
    low, low_value = 0.0, retain_at(subset, 0.0)
    high = ceiling
    for _ in range(steps):
        middle = (low + high) / 2
        value = retain_at(subset, middle)
        if value >= floor:
            low, low_value = middle, value
        else:
            high = middle
    return low, low_value


def _subsets(heads: list[str], count: int, tries: int, rng: random.Random) -> list[list[str]]:
    """All heads for count k; otherwise up to `tries` distinct random sets of `count` heads."""
    if count == len(heads):
        return [list(heads)]
    chosen: dict[tuple[str, ...], None] = {}
    for _ in range(tries * 4):
        chosen[tuple(sorted(rng.sample(heads, count)))] = None
        if len(chosen) == tries:
            break
    return [list(s) for s in chosen]


def answer_probability_scorer(alter: AlterModel, pad_id: int, batch_size: int, device) -> Score:
    """`score` for `calibrate_views`: mean answer probability of `alter` in its current mode."""
    forward = model_forward(alter)
    return lambda examples: mean_answer_probability(forward, examples, pad_id, batch_size, device)
