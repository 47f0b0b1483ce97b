"""Evaluation reports on disk: JSON (everything, per sample), Markdown (the summary table) and PNG
(a grouped bar chart; a heatmap for the isolation matrix).

Figures are drawn on a bare ``matplotlib.figure.Figure`` (no pyplot), so no GUI backend or
global figure state is involved and this works in servers and threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from train.evaluation.tofu_eval import IsolationTable
from train.files import write_json

# (report key, column title) of the summary table and bar chart, in order.
SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    ("probability", "Probability"),
    ("rouge_l_recall", "ROUGE-L recall"),
    ("truth_ratio", "Truth ratio"),
    ("extraction_strength", "Extraction strength"),
)


def write_reports(report: Mapping[str, Any], out_dir: str | Path, stem: str = "report") -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``; return the paths."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"{stem}.json", root / f"{stem}.md", root / f"{stem}.png"]
    write_json(paths[0], report, strict=True)  # a NaN or infinity is a bug upstream
    write_markdown(report, paths[1])
    write_bar_chart(report, paths[2])
    return paths


def summary_markdown(report: Mapping[str, Any]) -> str:
    """One row per set, one column per metric, then model utility and forget quality."""
    header = "| set | n | " + " | ".join(title for _, title in SUMMARY_METRICS) + " |"
    lines = [header, "|" + "---|" * (len(SUMMARY_METRICS) + 2)]
    for name, s in report["sets"].items():
        cells = " | ".join(_fmt(s.get(key)) for key, _ in SUMMARY_METRICS)
        lines.append(f"| {name} | {s['n']} | {cells} |")
    lines += [
        "",
        f"- model utility: {_fmt(report.get('model_utility'))}",
        f"- forget quality (KS p-value vs retain model): {_fmt(report.get('forget_quality'))}",
        "",
        "Probability is normalised over the answer options on real_authors and world_facts. "
        "Truth ratio: mean(min(R, 1/R)) on forget, mean(max(0, 1 - R)) elsewhere; "
        "R = geometric mean of perturbed-answer probabilities / paraphrased-answer probability.",
    ]
    return "\n".join(lines) + "\n"


def write_markdown(report: Mapping[str, Any], path: str | Path, title: str = "TOFU evaluation") -> None:
    Path(path).write_text(f"# {title}\n\n" + summary_markdown(report))


def write_bar_chart(report: Mapping[str, Any], path: str | Path) -> None:
    """Grouped bars: one group per set, one bar per metric (all metrics lie in [0, 1])."""
    sets = list(report["sets"])
    fig = Figure(figsize=(1.9 * len(sets) + 3, 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(SUMMARY_METRICS)
    for k, (key, title) in enumerate(SUMMARY_METRICS):
        values = [report["sets"][s].get(key) for s in sets]
        xs = [i + (k - (len(SUMMARY_METRICS) - 1) / 2) * width for i in range(len(sets))]
        # A metric the backend could not produce is left out, not drawn as 0.
        drawn = [(x, v) for x, v in zip(xs, values) if v is not None]
        ax.bar([x for x, _ in drawn], [v for _, v in drawn], width, label=title)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(
        f"model utility {_fmt(report.get('model_utility'))}   "
        f"forget quality {_fmt(report.get('forget_quality'))}"
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.savefig(path, dpi=120)


def isolation_markdown(table: IsolationTable) -> str:
    """The isolation matrix as a Markdown table (rows: views, columns: sub-domains)."""
    lines = ["| view | " + " | ".join(table.domains) + " |", "|" + "---|" * (len(table.domains) + 1)]
    for view, row in zip(table.views, table.probability):
        lines.append(f"| {view} | " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_isolation_heatmap(table: IsolationTable, path: str | Path) -> None:
    """Heatmap of mean answer probability, view × sub-domain, each cell annotated."""
    fig = Figure(figsize=(1.3 * len(table.domains) + 2.5, 0.7 * len(table.views) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(table.probability, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(table.domains)), table.domains)
    ax.set_yticks(range(len(table.views)), table.views)
    ax.set_xlabel("QA of sub-domain")
    ax.set_ylabel("view")
    for r, row in enumerate(table.probability):
        for c, value in enumerate(row):
            # Dark text on the bright end of viridis, light text on the dark end.
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", color="black" if value > 0.6 else "white")
    fig.colorbar(image, ax=ax, label="answer probability")
    ax.set_title("head isolation")
    fig.savefig(path, dpi=120)


def write_isolation_reports(table: IsolationTable, out_dir: str | Path, stem: str = "isolation") -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` for an isolation matrix."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"{stem}.json", root / f"{stem}.md", root / f"{stem}.png"]
    write_json(paths[0], table.to_dict(), strict=True)
    paths[1].write_text("# Head isolation (mean answer probability)\n\n" + isolation_markdown(table))
    write_isolation_heatmap(table, paths[2])
    return paths


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"
