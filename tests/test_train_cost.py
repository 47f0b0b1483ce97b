"""The CPU training-cost benchmark runs ALTER and a baseline in their own processes on the same
data and epochs, and reports the target's ratio (total wall time against LoRA-GradDiff's)."""

from __future__ import annotations

import pytest

from benchmarks.train_cost import methods_in_subprocesses


def test_methods_run_on_the_same_epochs_and_report_the_ratio_to_grad_diff(demo_model_dir) -> None:
    rows = {r["method"]: r for r in methods_in_subprocesses(["alter", "lora_grad_diff"], demo_model_dir,
                                                            epochs=1, threads=1, rounds=1)}
    alter, grad_diff = rows["alter"], rows["lora_grad_diff"]
    # One ALTER step is one batch per forget head (2) + one retain batch; one GradDiff step one
    # forget + one retain batch: one epoch over the same forget set is half as many ALTER steps.
    assert alter["steps"] * 2 == grad_diff["steps"] > 0
    for row in rows.values():
        assert row["setup_s"] >= 0 and row["train_s"] > 0 and row["peak_rss_bytes"] > row["rss_after_load_bytes"] > 0
        assert row["total_s"] == pytest.approx(row["setup_s"] + row["train_s"], abs=2e-3)
    assert grad_diff["total_vs_lora_grad_diff"] == 1.0
    assert alter["total_vs_lora_grad_diff"] == pytest.approx(alter["total_s"] / grad_diff["total_s"], rel=1e-2)
    assert alter["trainable_parameters"] > grad_diff["trainable_parameters"]  # three heads against one B
