"""The TOFU benchmark: the author subset it cuts, and its smoke scale run end to end on real TOFU data.

The smoke scale trains a tiny full and retain model (cached under var/models), unlearns with every
method and scores every result with the TOFU metrics, in a few minutes. It checks the pipeline and
the bookkeeping, not the numbers: those come from `make bench-tofu` (README, "TOFU benchmark").
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.tofu_bench import DEFAULT_TOFU_ROOT as TOFU_ROOT
from benchmarks.tofu_bench import METHODS, SCALES
from train.data.tofu_subset import SubsetSpec, build_subset

from .gpu_image import env_without

REPO = Path(__file__).resolve().parents[1]


def test_subset_takes_tofus_own_forget_authors_and_no_overlap() -> None:
    subset = build_subset(TOFU_ROOT, SubsetSpec(n_authors=20, forget_authors=2, retain_eval_per_author=6))
    assert subset.forget_heads == ["author-198", "author-199"]
    assert len(subset.forget_train) == 40 and len(subset.retain_train) == 360
    assert {r["author"] for r in subset.retain_train} == {f"author-{i:03d}" for i in range(18)}
    forget_questions = {r["question"] for r in subset.forget_train}
    # The retain model never sees a forget question; the full model sees all of them.
    assert not forget_questions & {r["question"] for r in subset.retain_model_train}
    assert forget_questions <= {r["question"] for r in subset.full_train}
    # Every scored forget record has its truth-ratio material; retain eval is capped per author.
    assert {r["question"] for r in subset.eval_sets["forget"]} == forget_questions
    assert all(len(r["perturbed_answer"]) >= 3 for r in subset.eval_sets["forget"])
    assert len(subset.eval_sets["retain"]) == 18 * 6
    # ALTER's view calibration looks only at retain questions that are never scored.
    calibration = {r["question"] for r in subset.retain_calibration}
    assert len(calibration) == 360 - 18 * 6
    assert not calibration & {r["question"] for records in subset.eval_sets.values() for r in records}
    assert len(subset.eval_sets["real_authors"]) == 100 and len(subset.eval_sets["world_facts"]) == 117


@pytest.mark.parametrize("spec, message", [
    (SubsetSpec(n_authors=201, forget_authors=2), "n_authors"),
    (SubsetSpec(n_authors=2, forget_authors=2), "n_authors"),
    (SubsetSpec(n_authors=5, forget_authors=0), "forget_authors"),
    (SubsetSpec(n_authors=4, forget_authors=1, retain_eval_per_author=0), "retain_eval_per_author"),
])
def test_subset_rejects_impossible_specs(spec: SubsetSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_subset(TOFU_ROOT, spec)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The smoke scale through the CLI, with only what the GPU image has: the benchmark must never
    need the server's packages (vLLM, FastAPI, SQLAlchemy, ...), since the GPU run has none."""
    out, work = tmp_path_factory.mktemp("tofu-out"), tmp_path_factory.mktemp("tofu-work")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.tofu_bench", "--scale", "smoke", "--no-progress", "--tofu-root",
         str(TOFU_ROOT), "--work-dir", str(work), "--out-dir", str(out)],
        env=env_without(tmp_path_factory.mktemp("gpu-image")), cwd=REPO, capture_output=True, text=True,
        timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    payload = json.loads((out / "tofu_smoke.json").read_text())
    return {"json": out / "tofu_smoke.json", "png": out / "tofu_smoke.png", "rows": payload["results"],
            "goal": payload["settings"]["goal"]}


def test_smoke_run_writes_json_table_and_scatter(smoke: dict) -> None:
    payload = json.loads(Path(smoke["json"]).read_text())
    assert payload["benchmark"] == "tofu_smoke" and payload["machine"]["cpu_cores_usable"] >= 1
    assert payload["settings"]["subset"]["world_knowledge_trained"] is True
    assert Path(smoke["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = Path(smoke["json"]).with_suffix(".md").read_text()
    assert "| method | forget quality | model utility |" in table and "Goal, alter (view) (as served):" in table


def test_smoke_run_scores_every_method_and_both_alter_modes(smoke: dict) -> None:
    rows = {row["method"]: row for row in smoke["rows"]}
    expected = {"full", "retain", "alter (view)", "alter (view, ω=1)", "alter (routed)", "alter_one_head (view)",
                "alter_no_entropy (view)", "grad_ascent", "grad_diff", "npo"}
    assert set(rows) == expected and set(METHODS) <= {row["run"] for row in smoke["rows"]}
    for row in smoke["rows"]:
        assert 0.0 < row["forget_quality"] <= 1.0
        assert 0.0 <= row["model_utility"] <= 1.0
        assert 0.0 <= row["forget_rouge"] <= 1.0 and 0.0 <= row["retain_rouge"] <= 1.0
        assert set(row["sets"]) == {"forget", "retain", "real_authors", "world_facts"}
        if row["kind"] == "unlearn":
            assert row["train_time_s"] > 0 and row["peak_memory_mib"] > 0
    # The retain model's truth ratios are the reference: KS against itself gives p = 1 exactly.
    assert rows["retain"]["forget_quality"] == 1.0
    # Gradient ascent on the forget set must lower the forget answers' probability below the full model's.
    assert rows["grad_ascent"]["forget_probability"] < rows["full"]["forget_probability"]
    assert math.isfinite(rows["alter (view)"]["forget_probability"])


def test_smoke_goal_is_reported_against_the_baselines(smoke: dict) -> None:
    assert set(smoke["goal"]) == {"alter", "alter_one_head"}
    goal = smoke["goal"]["alter"]
    assert goal["evaluated"] is True and goal["forget_quality_goal"] == 0.05
    baselines = [r for r in smoke["rows"] if r["run"] in ("grad_ascent", "grad_diff", "npo")]
    assert goal["best_baseline_forget_quality"] == max(r["forget_quality"] for r in baselines)
    served = next(r for r in smoke["rows"] if r["method"] == "alter (view)")
    assert served["view"].startswith("calibrated:")  # the served view is the calibrated one
    assert goal["beats_baselines_on_forget_quality"] == (served["forget_quality"] > goal["best_baseline_forget_quality"])


@pytest.mark.parametrize("name, forget_authors", [("gpu-forget01", 2), ("gpu-forget05", 10), ("gpu-forget10", 20)])
def test_gpu_scales_cover_full_tofu(name: str, forget_authors: int) -> None:
    scale = SCALES[name]
    subset = build_subset(TOFU_ROOT, scale.subset)
    assert len(subset.full_train) == 4000 + 217
    assert len(subset.forget_train) == 20 * forget_authors == len(subset.eval_sets["forget"])
    assert len(subset.eval_sets["retain"]) == 400  # all of retain_perturbed.json
    assert scale.unlearn.device == "cuda"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message shown on a machine without a GPU")
def test_gpu_scale_without_a_gpu_is_a_clear_cli_error(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.tofu_bench import main

    assert main(["--scale", "gpu", "--no-progress"]) == 2
    assert "runs on a CUDA GPU and none is available" in capsys.readouterr().err


def test_the_gpu_image_environment_lacks_the_server_packages(tmp_path: Path) -> None:
    """The smoke run's environment really refuses what the GPU image lacks, and only that."""
    env = env_without(tmp_path)
    refused = subprocess.run([sys.executable, "-c", "import fastapi"], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "not installed on the GPU image" in refused.stderr
    allowed = subprocess.run([sys.executable, "-c", "import torch, transformers, peft, train.run"], env=env,
                             cwd=REPO, capture_output=True, text=True)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
