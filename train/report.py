"""The training report's files: `report.json` (written with `train.files.write_json`) and a loss-curve PNG."""

from __future__ import annotations

import math
from pathlib import Path

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


def _moving_average(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out
