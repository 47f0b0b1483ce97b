"""The training report: its headline summary against the base model, `report.json` (written with
`train.files.write_json`) and a loss-curve PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

REPORT_FILE = "report.json"
LOSS_PLOT_FILE = "loss_curve.png"


def plot_losses(history: dict[str, list[float]], path: Path, title: str) -> Path:
    """One panel per phase; each series is a loss per optimizer step (moving average of 5 drawn over it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {name: values for name, values in history.items() if values}
    phases = sorted({name.split("/")[0] for name in series}) or ["(none)"]
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.5), dpi=110, squeeze=False)
    for ax, phase in zip(axes[0], phases):
        for name, values in series.items():
            if name.split("/")[0] != phase:
                continue
            clean = [v for v in values if v is not None and math.isfinite(v)]
            (line,) = ax.plot(clean, alpha=0.35, linewidth=0.8)
            ax.plot(_moving_average(clean, 5), color=line.get_color(), label=name.split("/", 1)[-1])
        ax.set_title(phase)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def alter_summary(evals: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers of an ALTER run against the base model.

    ALTER is scored as served, in static views: view "forget-<d>" (B_r + B_d) on sub-domain d's
    forget data and on the retain data, for every head; the headline is the worst head (smallest
    forget drop, smallest retain ratio). The all-heads view and the routed model are reported too.
    """
    base = evals["base"]
    per_view = {head: _change(base, evals[f"view:forget-{head}"], base["forget"][head],
                              evals[f"view:forget-{head}"]["forget"][head]) for head in base["forget"]}
    all_view = evals["view:forget-all"]
    summary = {
        "scored_as": "static views as served: view forget-<d> on sub-domain d and on the retain set (worst head)",
        "forget_drop_factor": min(v["forget_drop_factor"] for v in per_view.values()),
        "retain_ratio": min(v["retain_ratio"] for v in per_view.values()),
        "per_view": per_view,
        "all_heads_view": _change(base, all_view, base["forget_all"], all_view["forget_all"]),
    }
    calibrated = evals.get("view:forget-all-calibrated")
    if calibrated is not None:
        # Per head too: a stacked view must forget every one of its sub-domains, not just on average.
        summary["all_heads_view_calibrated"] = {
            **_change(base, calibrated, base["forget_all"], calibrated["forget_all"]),
            "per_head_forget_drop_factor": {h: _ratio(base["forget"][h], calibrated["forget"][h]) for h in base["forget"]}}
    if "routed" in evals:
        summary["routed"] = _change(base, evals["routed"], base["forget_all"], evals["routed"]["forget_all"])
    return summary


def baseline_summary(evals: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers of a baseline against the base model: the trained model on all forget
    data and on the retain data."""
    base, model = evals["base"], evals["model"]
    return {"scored_as": "model", **_change(base, model, base["forget_all"], model["forget_all"])}


def _ratio(after: float, before: float) -> float:
    return after / max(before, 1e-12)


def _change(base: dict[str, Any], after: dict[str, Any], forget_before: float, forget_after: float) -> dict[str, float]:
    return {
        "forget_probability_before": forget_before, "forget_probability_after": forget_after,
        "forget_drop_factor": _ratio(forget_before, forget_after),
        "retain_probability_before": base["retain"], "retain_probability_after": after["retain"],
        "retain_ratio": _ratio(after["retain"], base["retain"]),
    }


def _moving_average(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out
