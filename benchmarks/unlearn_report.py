"""The unlearning benchmark's results: table (median over seeds, with the range), goal checks,
the FQ–MU plot and the isolation heatmaps.

Writes `<out>/unlearn_<scale>.json` (every row per seed, the gates, the isolation matrices, each
stage's measured time and CPU) and `.md`, plus `unlearn_<scale>_pareto.png` and
`unlearn_<scale>_isolation.png`.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table, save_figure, write_results
from benchmarks.unlearn_eval import row_for

GOAL_FQ = 0.05
GOAL_MU = 0.95
GOAL_ROUGE_MARGIN = 0.05
SERVED = ("alter", "served")
OMEGA_VIEW = "all heads, ω="  # + the weight: the view label of every forget head at one weight


def omega_label(omega: float) -> str:
    """The result label of the view with every forget head at weight ω."""
    return f"{OMEGA_VIEW}{omega:g}"


def write_report(scale_name: str, scale: Any, split: Any, references: Mapping[str, Mapping[str, Any]],
                 gates: list[dict[str, Any]], views: list[dict[str, Any]], isolation: Mapping[str, Any],
                 cache: Any, machine: dict[str, Any], out_dir: Path, name: str | None = None) -> Path:
    """The report of one run, as `<out_dir>/<name>.json|md` (default name `unlearn_<scale>`), with
    the plots of what it scored. A run stopped by a failed gate writes its references and gates alone
    (no `views`)."""
    resamples = scale.evaluation.bootstrap
    rows = [{**row_for(name, scores, references, resamples), "method": name, "view": "reference", "seed": None}
            for name, scores in references.items()]
    for view in views:
        row = row_for(view["method"], view["scores"], references, resamples)
        rows.append({**row, "view": view["view"], "seed": view["seed"], **view["training"]})
    summary = summarize(rows)
    goals = goal_checks(summary, references)
    table = summary_table(summary)
    gate_lines = "\n".join(f"- {g['name']} {'PASS' if g['passed'] else 'FAIL'}: {g['detail']}" for g in gates)
    text = f"Validity gates:\n\n{gate_lines}\n\n{table}\n\n{goal_text(goals)}"
    name = name or f"unlearn_{scale_name}"
    settings = {"scale": scale_name, "split": split.summary(), "finetune": asdict(scale.finetune),
                "evaluation": asdict(scale.evaluation), "gates": gates, "goals": goals,
                "isolation": dict(isolation), "stages": cache.timings()}
    path = write_results(name, settings, [_strip(r) for r in rows], text, machine, out_dir)
    if views:
        pareto_plot(rows, out_dir / f"{name}_pareto.png", scale_name)
    if isolation:
        isolation_heatmaps(isolation, out_dir / f"{name}_isolation.png")
    print(text, flush=True)
    return path


def _strip(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "scores"}


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (method, view): the median over seeds of each figure, with its min and max."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["view"]), []).append(row)
    out = []
    for (method, view), members in groups.items():
        entry: dict[str, Any] = {"method": method, "view": view, "seeds": [m["seed"] for m in members]}
        for key in ("fq", "ks_d", "fq_low", "fq_high", "model_utility", "mu_vs_full", "forget_rouge",
                    "forget_probability_vs_retain_a", "privacy_leak", "train_time_s"):
            values = [m[key] for m in members if m.get(key) is not None]
            if values:
                entry[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        out.append(entry)
    return out


def _cell(entry: Mapping[str, Any], key: str) -> str:
    value = entry.get(key)
    if value is None:
        return "-"
    fmt = (lambda v: f"{v:.3g}") if key in ("fq", "fq_low", "fq_high") else (lambda v: f"{v:.3f}")
    if key == "train_time_s":
        fmt = lambda v: f"{v:.0f}"  # noqa: E731
    if value["min"] == value["max"]:
        return fmt(value["median"])
    return f"{fmt(value['median'])} [{fmt(value['min'])}–{fmt(value['max'])}]"


def summary_table(summary: Sequence[Mapping[str, Any]]) -> str:
    headers = ["method", "view", "seeds", "FQ", "KS D", "MU", "MU / full", "forget ROUGE-L",
               "forget p / retain-a", "privacy leak %", "train s"]
    return markdown_table(headers, [[e["method"], e["view"], len(e["seeds"]), _cell(e, "fq"), _cell(e, "ks_d"),
                                     _cell(e, "model_utility"), _cell(e, "mu_vs_full"), _cell(e, "forget_rouge"),
                                     _cell(e, "forget_probability_vs_retain_a"), _cell(e, "privacy_leak"),
                                     _cell(e, "train_time_s")] for e in summary])


def goal_checks(summary: Sequence[Mapping[str, Any]], references: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The issue's targets for ALTER's served all-heads view (median over seeds)."""
    served = next((e for e in summary if (e["method"], e["view"]) == SERVED), None)
    if served is None or "fq" not in served:
        return {"evaluated": False}
    retain_rouge = references["retain-a"]["sets"]["forget"]["rouge_l_recall"]
    fq = served["fq"]["median"]
    # No ratio when the full model's utility is 0 (a smoke-scale model): then the goal is not met.
    mu = served["mu_vs_full"]["median"] if "mu_vs_full" in served else None
    rivals = [e for e in summary if e["method"] in ("lora-npo", "full-npo") and e["view"] != "reference"
              and "mu_vs_full" in e and e["mu_vs_full"]["median"] >= GOAL_MU]
    best_rival = max((e["fq"]["median"] for e in rivals), default=None)
    return {
        "evaluated": True, "seeds": len(served["seeds"]),
        "fq": fq, "fq_met": fq >= GOAL_FQ,
        "mu_vs_full": mu, "mu_met": mu is not None and mu >= GOAL_MU,
        "forget_rouge": served["forget_rouge"]["median"], "retain_a_forget_rouge": retain_rouge,
        "rouge_met": served["forget_rouge"]["median"] <= retain_rouge + GOAL_ROUGE_MARGIN,
        "best_npo_fq_at_mu_goal": best_rival,
        "ahead_of_npo": best_rival is None or fq > best_rival,
    }


def goal_text(goals: Mapping[str, Any]) -> str:
    if not goals.get("evaluated"):
        return "Goals: ALTER's served view was not scored in this run."

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    rival = goals["best_npo_fq_at_mu_goal"]
    return (f"Goals for ALTER's served all-heads view (median of {goals['seeds']} seed(s)): "
            f"FQ {goals['fq']:.3g} ≥ {GOAL_FQ}: {mark(goals['fq_met'])}; MU {_ratio(goals['mu_vs_full'])}× full ≥ "
            f"{GOAL_MU}: {mark(goals['mu_met'])}; forget ROUGE-L {goals['forget_rouge']:.3f} ≤ retain-a's "
            f"{goals['retain_a_forget_rouge']:.3f} + {GOAL_ROUGE_MARGIN}: {mark(goals['rouge_met'])}; ahead of "
            f"LoRA-NPO and full NPO at MU ≥ {GOAL_MU}× (best {'none there' if rival is None else f'{rival:.3g}'}): "
            f"{mark(goals['ahead_of_npo'])}.")


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def pareto_plot(rows: Sequence[Mapping[str, Any]], path: Path, scale: str) -> Path:
    """Forget quality (log) against utility relative to the full model, one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    labels = list(dict.fromkeys(f"{r['method']} ({r['view']})" for r in rows))
    colors = plt.get_cmap("tab10").colors
    for i, label in enumerate(labels):
        points = [r for r in rows if f"{r['method']} ({r['view']})" == label]
        marker = "s" if points[0]["view"] == "reference" else ("*" if points[0]["method"].startswith("alter") else "o")
        ax.scatter([p["mu_vs_full"] or 0.0 for p in points], [max(p["fq"], 1e-30) for p in points], label=label,
                   marker=marker, s=140 if marker == "*" else 60, color=colors[i % len(colors)],
                   edgecolor="black", linewidth=0.5, alpha=0.9)
    for curve in _omega_curves(rows).values():
        ax.plot([p["mu_vs_full"] or 0.0 for p in curve], [max(p["fq"], 1e-30) for p in curve], color="grey",
                linewidth=0.8, alpha=0.7, zorder=0)
    ax.axhline(GOAL_FQ, color="grey", linestyle="--", linewidth=0.8)
    ax.axvline(GOAL_MU, color="grey", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("model utility / full model's (higher is better)")
    ax.set_ylabel("forget quality, KS p-value vs retain-a (higher is better)")
    ax.set_title(f"Unlearning on SmolLM2-135M ({scale}): forget quality vs utility, one point per seed")
    return save_figure(fig, ax, path)


def _omega_curves(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], list[Mapping[str, Any]]]:
    """(method, seed) → its rows with every forget head at one weight ω (the ω sweep, ω = 1 and the
    served view, which is all heads at the calibrated ω), ordered by utility: a trade-off curve.
    Only runs with at least three such points."""
    curves: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["view"] == "served" or row["view"].startswith(OMEGA_VIEW):
            curves.setdefault((row["method"], row["seed"]), []).append(row)
    return {key: sorted(points, key=lambda p: p["mu_vs_full"] or 0.0)
            for key, points in curves.items() if len(points) >= 3}


def isolation_heatmaps(isolation: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """One heatmap per ALTER run: answer probability of each view on each domain ÷ the full model's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = list(isolation)
    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 4.5), squeeze=False)
    for ax, run in zip(axes[0], runs):
        table = isolation[run]
        views = [v for v in table["views"] if v != "original"]
        values = np.array([[table["ratio"][v][d] for d in table["domains"]] for v in views])
        image = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.2, aspect="auto")
        ax.set_xticks(range(len(table["domains"])), table["domains"], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(views)), views, fontsize=7)
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(f"{run}: answer probability ÷ full model", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
