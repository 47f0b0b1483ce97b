"""TOFU benchmark: ALTER against GradAscent, GradDiff, NPO and the no-entropy ablation, on real TOFU.

    python -m benchmarks.tofu_bench                # the default CPU scale (see SCALES["cpu"])
    python -m benchmarks.tofu_bench --scale smoke  # a few minutes; what the test suite runs
    python -m benchmarks.tofu_bench --scale gpu    # full TOFU (200 authors, forget01/05/10) on one GPU
    make bench-tofu

On the lent GPU machine (torch, transformers and peft, but no pydantic, rouge-score or nltk, no
package registry, and no ../shared beside the checkout): run `benchmarks/gpu_prepare.sh` here (fills
the git-ignored .device/ with the wheels and a copy of the TOFU data), carry ".device", and run there
`bash benchmarks/gpu_run.sh tofu` (results packed into $OUT/tofu-results.tar.gz).

Protocol (TOFU's, scaled down; see `train.data.tofu_subset` and `train.tofu_models`):

1. cut a TOFU author subset: the forget authors are TOFU's own forget authors (10 % of the subset at
   the CPU scale), the retain authors TOFU's first ones; real-author and world-fact questions are
   trained into both models, so model utility measures knowledge the models actually have;
2. train a "full" model (every author) and a "retain" model (no forget author) from scratch, with one
   recipe (cached; the full model must reach forget ROUGE-L recall ≥ 0.8);
3. unlearn the forget authors from the full model with every method, each with the same data, rank,
   epochs and batch size, using the open-unlearning loss definitions (`train.baselines.baseline_steps`);
4. score every result with the TOFU metrics (`train.evaluation.tofu_eval`): forget quality = KS-test p-value of
   forget truth ratios against the retain model's, model utility = harmonic mean of the nine
   retain / real-author / world-fact numbers. ALTER is scored as served (view mode: the retain head
   plus every forget head at the bundle's calibrated weight ω(n), `train.alter.calibration`), with the
   same heads at ω = 1 for comparison, and in the paper's routed mode. The calibration set is the
   retain authors' questions that are *not* scored (`TofuSubset.retain_calibration`).

ALTER runs twice: `alter` has one forget head per forget author (the paper's sub-domains; the
served view switches all of them on), `alter_one_head` one head for the whole forget set (the view
a tenant gets when the forget request is one sub-domain). A view that stacks several forget heads
at ω = 1 costs more utility than a single-head view (see README, "Training"); the calibrated weight
is what makes a stacked view servable, and the table shows both.

The unlearning settings are fixed up front (below), not tuned on the evaluation sets. Each run trains
and scores in its own process (one thread), two at a time, so wall time and peak memory are per
method (peak memory: the process's peak RSS on CPU, peak allocated CUDA memory on a GPU).

Writes benchmarks/results/tofu_<scale>.json, .md and .png (forget quality against model utility).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.common import (RESULTS_DIR, REPO_ROOT, machine_info, markdown_table, print_header, save_figure,
                               write_results)
from train.data.tofu_subset import SubsetSpec, TofuSubset, build_subset
from train.demo.demo_model import DemoModelConfig, DemoTrainConfig
from train.evaluation.bundle_views import CALIBRATED_PREFIX
from train.tofu_models import TofuModelRecipe, build_reference_models

DEFAULT_TOFU_ROOT = REPO_ROOT.parent / "shared" / "data" / "tofu"
METHODS = ("alter", "alter_one_head", "alter_no_entropy", "grad_ascent", "grad_diff", "npo")
ONE_HEAD = "forget-set"  # alter_one_head: the whole forget set is one sub-domain, one forget head
# The paper's goal, reported against (never tuned for): forget quality ≥ 0.05 with utility ≥ 0.95× full.
GOAL_FORGET_QUALITY = 0.05
GOAL_UTILITY_RATIO = 0.95
# At most this many unscored retain questions calibrate ALTER's views (the CPU scale has 252, all
# used; full TOFU has thousands, and k forget heads cost ~8 scorings of the set per head count).
CALIBRATION_EXAMPLES = 512
OUTCOME_FILE = "bench_outcome.json"
OUTCOME_VERSION = 4  # bump when what a job returns changes (2: one process per job; 3: calibrated views;
#                      4: per-label router budget, per-head clipping, training-only cost figures)


@dataclass(frozen=True)
class UnlearnSettings:
    """One budget for every method. LoRA rank/alpha as the demo bundle (servable by vLLM); the
    learning rate of the baselines' LoRA equals ALTER's head learning rate lr_B (the paper's 1e-5
    is for full fine-tuning of a 7B model and moves a from-scratch LoRA nowhere)."""

    epochs: int = 10
    batch_size: int = 8
    rank: int = 32
    alpha: float = 64.0
    lr: float = 1e-3
    lr_A: float = 1e-5
    phase1_epochs: int = 1
    router_epochs: int = 3
    npo_beta: float = 0.1
    calibration_retain_ratio: float = 0.95  # ALTER view calibration floor ρ (train.alter.calibration)
    max_new_tokens: int = 128
    eval_batch_size: int = 32
    device: str = "cpu"


@dataclass(frozen=True)
class Scale:
    subset: SubsetSpec
    recipe: TofuModelRecipe
    unlearn: UnlearnSettings = field(default_factory=UnlearnSettings)
    workers: int = 2   # runs at once: one thread each on CPU; processes sharing the GPU on CUDA


# Full TOFU on one GPU (H100/H200): all 200 authors, the forget01/05/10 splits, one full + one retain
# model per split. A ~9M-parameter Llama memorises TOFU in a few thousand bf16 steps; every split's
# runs share the GPU in parallel processes. Prepared for the lent device machine (≤ 10 minutes).
_GPU_RECIPE = TofuModelRecipe(
    model=DemoModelConfig(vocab_size=4096, num_attention_heads=6, intermediate_size=1152, num_hidden_layers=4,
                          max_position_embeddings=256),
    train=DemoTrainConfig(learning_rate=2e-3, warmup_steps=50, batch_size=64, max_steps=3000, eval_every=250,
                          stop_accuracy=0.95, min_accuracy=0.0, max_threads=4),
    probe_size=256)
_GPU_UNLEARN = UnlearnSettings(epochs=5, batch_size=32, eval_batch_size=128, device="cuda")
GPU_SCALES = {f"gpu-{split}": Scale(SubsetSpec(n_authors=200, forget_authors=n, retain_eval_per_author=20),
                                    _GPU_RECIPE, _GPU_UNLEARN, workers=7)
              for split, n in (("forget01", 2), ("forget05", 10), ("forget10", 20))}


SCALES = {
    # 20 authors, the last 2 (TOFU's forget01 authors, 10 %) forgotten; all 217 world-knowledge questions.
    "cpu": Scale(SubsetSpec(n_authors=20, forget_authors=2, retain_eval_per_author=6), TofuModelRecipe()),
    # The CI smoke subset: 4 authors (1 forgotten), 16 world-knowledge questions per set, a tiny model
    # trained briefly. It checks the whole pipeline, not the numbers.
    "smoke": Scale(
        SubsetSpec(n_authors=4, forget_authors=1, retain_eval_per_author=3, utility_limit=12),
        TofuModelRecipe(
            model=DemoModelConfig(vocab_size=512, num_attention_heads=1, intermediate_size=128,
                                  num_hidden_layers=1, max_position_embeddings=256),
            train=DemoTrainConfig(learning_rate=5e-3, warmup_steps=10, batch_size=16, max_steps=120,
                                  eval_every=60, stop_accuracy=0.95, min_accuracy=0.0, max_threads=1),
            probe_size=16, max_new_tokens=48, min_forget_rouge=0.0),
        UnlearnSettings(epochs=1, router_epochs=1, max_new_tokens=32)),
    **GPU_SCALES,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = list(GPU_SCALES) if args.scale == "gpu" else [args.scale]
    for name in names:
        scale = SCALES[name]
        if args.epochs is not None:
            scale = replace(scale, unlearn=replace(scale.unlearn, epochs=args.epochs))
        if args.workers is not None:
            scale = replace(scale, workers=args.workers)
        try:
            results = run_benchmark(scale, name, Path(args.tofu_root), methods=args.methods,
                                    work_dir=Path(args.work_dir) / name, out_dir=Path(args.out_dir),
                                    progress=not args.no_progress)
        except (FileNotFoundError, ValueError, RuntimeError) as error:
            print(f"tofu_bench: {error}", file=sys.stderr)
            return 2
        print(results["table"], "\n\n", _goal_text(results["goal"]), flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=[*sorted(SCALES), "gpu"], default="cpu",
                        help="cpu (default), smoke, gpu-forgetXX, or gpu (all three GPU splits)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--tofu-root", default=str(DEFAULT_TOFU_ROOT), help="a folder in the TOFU layout")
    parser.add_argument("--work-dir", default=str(REPO_ROOT / "var" / "bench" / "tofu"))
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--epochs", type=int, default=None, help="override the unlearning epochs")
    parser.add_argument("--workers", type=int, default=None, help="runs at once (default: the scale's)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run_benchmark(scale: Scale, name: str, tofu_root: Path, *, methods: list[str] | tuple[str, ...] = METHODS,
                  work_dir: Path, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Everything in the module docstring; returns {"json": path, "png": path, "table": markdown, "rows": [...]}."""
    started = time.perf_counter()
    machine = machine_info()
    print_header(f"tofu_{name}", machine)
    if scale.unlearn.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"scale {name!r} runs on a CUDA GPU and none is available; use --scale cpu")
    if not tofu_root.is_dir():
        raise FileNotFoundError(f"TOFU data folder {tofu_root} not found (see ../shared/data/tofu/README.md)")
    subset = build_subset(tofu_root, scale.subset)
    models = build_reference_models(subset, scale.recipe, progress=progress, device=scale.unlearn.device)
    work_dir.mkdir(parents=True, exist_ok=True)
    data_files = _write_unlearning_data(subset, work_dir)

    jobs = [_Job(kind, "reference", str(getattr(models, kind)), run_dir=str(work_dir / kind)) for kind in ("full", "retain")]
    jobs += [_Job(m, "unlearn", str(models.full), data_files, str(work_dir / m)) for m in methods]
    context = multiprocessing.get_context("spawn")
    # One fresh process per job (max_tasks_per_child=1): peak RSS is per process, so a reused worker
    # would report the peak of an earlier job.
    with ProcessPoolExecutor(max_workers=max(1, scale.workers), mp_context=context, max_tasks_per_child=1) as pool:
        outcomes = list(pool.map(_run_job, jobs, [subset] * len(jobs), [scale.unlearn] * len(jobs),
                                 [progress] * len(jobs)))
    rows = _rows(outcomes, subset)
    table = _table(rows)
    goal = _goal(rows)
    settings = {"scale": name, "subset": subset.summary(), "recipe": asdict(scale.recipe),
                "unlearn": asdict(scale.unlearn), "methods": list(methods),
                "reference_models": models.info() | {"paths": {"full": str(models.full), "retain": str(models.retain)}},
                "wall_time_s": round(time.perf_counter() - started, 1), "goal": goal}
    results_name = f"tofu_{name}"
    json_path = write_results(results_name, settings, rows, table + "\n\n" + _goal_text(goal), machine, out_dir)
    png = _scatter(rows, out_dir / f"{results_name}.png", name)
    return {"json": json_path, "png": png, "table": table, "rows": rows, "goal": goal}


# ---- one run per process -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    name: str
    kind: str                     # "reference" (score a model as it is) or "unlearn"
    model_dir: str
    data_files: dict[str, str] = field(default_factory=dict)
    run_dir: str = ""


def _run_job(job: _Job, subset: TofuSubset, settings: UnlearnSettings, progress: bool) -> dict[str, Any]:
    """Train (unless a reference) and score; returns {"name", "views": {view: report}, "training": {...}}.

    Resumable: a finished job's outcome is kept in its run folder under a key of everything it
    depends on, and training resumes from its last finished epoch (`train.run.run(resume=True)`),
    so an interrupted benchmark redoes only what it had not finished.
    """
    key = _job_key(job, subset, settings)
    saved = Path(job.run_dir) / OUTCOME_FILE
    if saved.is_file():
        outcome = json.loads(saved.read_text())
        if outcome.get("key") == key:
            return outcome
    outcome = _execute_job(job, subset, settings, progress)
    outcome["key"] = key
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(outcome))
    return outcome


def _job_key(job: _Job, subset: TofuSubset, settings: UnlearnSettings) -> str:
    model_info = (Path(job.model_dir) / "tofu_model_info.json").read_text()
    payload = json.dumps([asdict(job), subset.digest(), asdict(settings), model_info, OUTCOME_VERSION], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _execute_job(job: _Job, subset: TofuSubset, settings: UnlearnSettings, progress: bool) -> dict[str, Any]:
    import torch

    from train.checkpoint import config_digest, discard_stale_state
    from train.evaluation.bundle_views import local_view_scorers
    from train.evaluation.tofu_eval import evaluate_tofu
    from train.run import run

    if settings.device == "cpu":
        torch.set_num_threads(1)
    training: dict[str, Any] = {}
    bundle_dir: str | None = None
    views = ["original"]
    if job.kind == "unlearn":
        config = _train_config(job, subset, settings, progress)
        # The run folder is the benchmark's own: a checkpoint of older settings is dropped, not resumed.
        discard_stale_state(Path(job.run_dir), config_digest(config.model_dump(mode="json")))
        result = run(config, resume=True)
        report = result.report
        training = {"wall_time_s": report["wall_time_s"], "train_time_s": report["train_time_s"],
                    "peak_memory_bytes": report["peak_memory_bytes"], "tokens_per_s": report["tokens_per_s"],
                    "trainable_parameters": report["trainable_parameters"]}
        bundle_dir = str(result.bundle_dir)
        if job.name == "alter":
            views = [CALIBRATED_PREFIX + "+".join(subset.forget_heads), "+".join(subset.forget_heads), "routed"]
        elif job.name in ("alter_one_head", "alter_no_entropy"):
            views = [CALIBRATED_PREFIX + "+".join(_heads(job.name, subset))]
        else:
            views = ["forget"]
    scorers = local_view_scorers(job.model_dir, bundle_dir, views, device=settings.device,
                                 batch_size=settings.eval_batch_size, progress=progress)
    reports = {view: evaluate_tofu(scorer, subset.eval_sets, max_new_tokens=settings.max_new_tokens)
               for view, scorer in scorers.items()}
    return {"name": job.name, "kind": job.kind, "views": reports, "training": training}


def _train_config(job: _Job, subset: TofuSubset, s: UnlearnSettings, progress: bool):
    from train.run_config import TrainConfig

    return TrainConfig.model_validate({
        "name": f"tofu-{job.name}".replace("_", "-"),
        "method": "alter" if job.name == "alter_one_head" else job.name,
        "model": {"path": job.model_dir},
        "data": {"kind": "json", "forget_file": job.data_files[job.name if job.name in job.data_files else "forget"],
                 "retain_file": job.data_files["retain"], "forget_subdomains": _heads(job.name, subset),
                 "subdomain_field": "author", "max_length": 256},
        "adapter": {"rank": s.rank, "alpha": s.alpha},
        "calibration": {"retain_file": job.data_files["retain_calibration"],
                        "min_retain_ratio": s.calibration_retain_ratio, "max_examples": CALIBRATION_EXAMPLES},
        "optim": {"epochs": s.epochs, "phase1_epochs": s.phase1_epochs, "batch_size": s.batch_size,
                  "lr": s.lr, "lr_B": s.lr, "lr_A": s.lr_A, "npo_beta": s.npo_beta, "router_epochs": s.router_epochs},
        "runtime": {"device": s.device, "threads": 1, "progress": progress, "output_dir": job.run_dir,
                    "eval_batch_size": s.eval_batch_size},
    })


def _heads(run: str, subset: TofuSubset) -> list[str]:
    """The forget heads of a run: one per forget author, or the single ONE_HEAD of alter_one_head."""
    return [ONE_HEAD] if run == "alter_one_head" else subset.forget_heads


def _write_unlearning_data(subset: TofuSubset, work_dir: Path) -> dict[str, str]:
    """The unlearning runs' forget file (forget authors) and retain file (retain authors)."""
    files = {"forget": work_dir / "forget.json", "retain": work_dir / "retain.json",
             "alter_one_head": work_dir / "forget_one_head.json",
             "retain_calibration": work_dir / "retain_calibration.json"}
    files["retain_calibration"].write_text(json.dumps(subset.retain_calibration, indent=1))
    files["forget"].write_text(json.dumps(subset.forget_train, indent=1))
    files["retain"].write_text(json.dumps(subset.retain_train, indent=1))
    files["alter_one_head"].write_text(json.dumps([{**r, "author": ONE_HEAD} for r in subset.forget_train], indent=1))
    return {k: str(v) for k, v in files.items()}


# ---- results ----------------------------------------------------------------------------------------------------


def _rows(outcomes: list[dict[str, Any]], subset: TofuSubset) -> list[dict[str, Any]]:
    from train.evaluation import tofu_metrics
    from train.evaluation.tofu_eval import forget_truth_ratios

    by_name = {o["name"]: o for o in outcomes}
    reference = forget_truth_ratios(by_name["retain"]["views"]["original"])
    full_utility = by_name["full"]["views"]["original"]["model_utility"]
    rows = []
    for outcome in outcomes:
        for view, report in outcome["views"].items():
            sets = report["sets"]
            training = outcome["training"]
            label = _label(outcome["name"], view)
            rows.append({
                "method": label, "run": outcome["name"], "kind": outcome["kind"], "view": view,
                "forget_quality": tofu_metrics.forget_quality(forget_truth_ratios(report), reference),
                "model_utility": report["model_utility"],
                "utility_vs_full": report["model_utility"] / full_utility if full_utility else None,
                "forget_rouge": sets["forget"]["rouge_l_recall"], "retain_rouge": sets["retain"]["rouge_l_recall"],
                "forget_probability": sets["forget"]["probability"], "retain_probability": sets["retain"]["probability"],
                "train_time_s": training.get("train_time_s"), "wall_time_s": training.get("wall_time_s"),
                "peak_memory_mib": round(training["peak_memory_bytes"] / 2**20) if training else None,
                "sets": {name: {k: v for k, v in summary.items() if k != "samples"} for name, summary in sets.items()},
            })
    return rows


def _label(run: str, view: str) -> str:
    """"alter (view)" is the served, calibrated view; "alter (view, ω=1)" the same heads at weight 1."""
    if view == "original" or not run.startswith("alter"):
        return run
    if view == "routed":
        return f"{run} (routed)"
    return f"{run} (view)" if view.startswith(CALIBRATED_PREFIX) else f"{run} (view, ω=1)"


def _table(rows: list[dict[str, Any]]) -> str:
    headers = ["method", "forget quality", "model utility", "MU / full", "forget ROUGE-L", "retain ROUGE-L",
               "train s", "peak memory MiB"]
    return markdown_table(headers, [[r["method"], r["forget_quality"], r["model_utility"], r["utility_vs_full"],
                                     r["forget_rouge"], r["retain_rouge"], r["train_time_s"] if r["train_time_s"] is not None else "-",
                                     r["peak_memory_mib"] if r["peak_memory_mib"] is not None else "-"] for r in rows])


def _goal(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each ALTER variant's served view against the goal and against every baseline, with the gaps."""
    return {run: _goal_of(rows, run) for run in ("alter", "alter_one_head")}


def _goal_of(rows: list[dict[str, Any]], run: str) -> dict[str, Any]:
    served = next((r for r in rows if r["run"] == run and r["view"].startswith(CALIBRATED_PREFIX)), None)
    if served is None:
        return {"evaluated": False}
    baselines = [r for r in rows if r["run"] in ("grad_ascent", "grad_diff", "npo")]
    best_fq = max((r["forget_quality"] for r in baselines), default=None)
    best_mu = max((r["model_utility"] for r in baselines), default=None)
    return {
        "evaluated": True, "method": served["method"],
        "forget_quality": served["forget_quality"], "forget_quality_goal": GOAL_FORGET_QUALITY,
        "forget_quality_met": served["forget_quality"] >= GOAL_FORGET_QUALITY,
        "utility_vs_full": served["utility_vs_full"], "utility_goal": GOAL_UTILITY_RATIO,
        "utility_met": (served["utility_vs_full"] or 0) >= GOAL_UTILITY_RATIO,
        "best_baseline_forget_quality": best_fq, "best_baseline_model_utility": best_mu,
        "beats_baselines_on_forget_quality": best_fq is None or served["forget_quality"] > best_fq,
        "beats_baselines_on_utility": best_mu is None or served["model_utility"] > best_mu,
    }


def _goal_text(goals: dict[str, dict[str, Any]]) -> str:
    """One line per ALTER variant: the goal and the baselines, met or not, with the numbers."""
    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    def num(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = []
    for run, goal in goals.items():
        if not goal.get("evaluated"):
            continue
        lines.append(
            f"Goal, {goal['method']} (as served): forget quality {num(goal['forget_quality'], '.3g')} ≥ "
            f"{GOAL_FORGET_QUALITY}: {mark(goal['forget_quality_met'])}; utility {num(goal['utility_vs_full'], '.3f')}× "
            f"the full model's ≥ {GOAL_UTILITY_RATIO}: {mark(goal['utility_met'])}; better than every baseline on "
            f"forget quality: {mark(goal['beats_baselines_on_forget_quality'])} (best baseline "
            f"{num(goal['best_baseline_forget_quality'], '.3g')}); on model utility: "
            f"{mark(goal['beats_baselines_on_utility'])} (best baseline {num(goal['best_baseline_model_utility'], '.3f')}).")
    return "\n\n".join(lines) or "ALTER was not run."


def _scatter(rows: list[dict[str, Any]], path: Path, scale: str) -> Path:
    """Forget quality (log scale) against model utility, one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab10").colors
    for i, row in enumerate(rows):
        fq = max(row["forget_quality"], 1e-30)
        marker = "*" if row["run"].startswith("alter") else ("s" if row["kind"] == "reference" else "o")
        # A legend, not labels at the points: methods that land close together would overprint.
        ax.scatter(row["model_utility"], fq, s=160 if marker == "*" else 70, marker=marker,
                   color=colors[i % len(colors)], edgecolor="black", linewidth=0.5, label=row["method"], alpha=0.9)
    ax.axhline(GOAL_FORGET_QUALITY, color="grey", linestyle="--", linewidth=0.8)
    ax.text(ax.get_xlim()[0], GOAL_FORGET_QUALITY, f" forget quality {GOAL_FORGET_QUALITY}", fontsize=7, va="bottom", color="grey")
    ax.set_yscale("log")
    ax.set_xlabel("model utility (higher is better)")
    ax.set_ylabel("forget quality, KS p-value (higher is better)")
    ax.set_title(f"TOFU ({scale} scale): forget quality vs model utility")
    return save_figure(fig, ax, path)


if __name__ == "__main__":
    raise SystemExit(main())
