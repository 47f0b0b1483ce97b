"""The GPU training benchmark runs end to end on CPU with --tiny and prints well-formed JSON lines."""

from __future__ import annotations

import json

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmarks.gpu_train_bench import FULL, METHODS, compare_to_targets, main

REPO = Path(__file__).resolve().parent.parent


def test_tiny_run_prints_a_summary_per_method(capsys) -> None:
    summaries = main(["--tiny", "--steps", "2", "--warmup", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    header = lines[0]
    assert header["benchmark"] == "gpu_train_bench" and header["device"] == "cpu"
    assert [s["method"] for s in summaries] == list(METHODS)
    for summary in summaries:
        assert summary["median_step_s"] > 0 and summary["tokens_per_s"] > 0 and summary["peak_memory_gib"] > 0
        assert summary["grad_clip"] == 1.0 and summary["host_syncs_per_step"] is None  # syncs: counted on CUDA
        steps = [l for l in lines if l.get("method") == summary["method"] and "step" in l]
        assert len(steps) == 2 and all(s["step_s"] > 0 for s in steps)
    by_method = {s["method"]: s for s in summaries}
    # Tokens per step: ALTER trains 2 forget batches + 1 retain batch (fused or not); NPO one of each
    # (2 x 96 tokens each).
    assert by_method["alter"]["tokens_per_step"] == by_method["alter_sequential"]["tokens_per_step"] == 3 * 2 * 96
    assert by_method["lora_npo"]["tokens_per_step"] == by_method["lora_graddiff"]["tokens_per_step"] == 2 * 2 * 96
    # Trainable parameters: ALTER's B heads (3 heads, rank 8), LoRA's A+B, and everything for full NPO.
    assert by_method["full_npo"]["trainable_parameters"] == header["parameters"]
    assert by_method["alter"]["trainable_parameters"] < by_method["full_npo"]["trainable_parameters"]


def test_the_full_configuration_is_the_1_39b_model() -> None:
    import torch

    from benchmarks.gpu_train_bench import make_model

    model = make_model(FULL, torch.device("meta"), torch.bfloat16)
    assert abs(sum(p.numel() for p in model.parameters()) - 1.39e9) < 0.01e9
    assert (FULL.hidden, FULL.layers, FULL.batch, FULL.seq) == (2048, 28, 8, 1024)


def test_each_method_takes_the_trainers_optimizer_step(monkeypatch) -> None:
    """Same clipping as the trainer (per head for ALTER), and full NPO's reference in the compute dtype."""
    import contextlib

    import torch

    import train.optim
    from benchmarks.gpu_train_bench import TINY, alter_step_fn, baseline_step_fn

    calls = []
    real = train.optim.optimizer_step

    def spy(*args, **kwargs):
        calls.append((args[2], kwargs.get("per_head", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(train.optim, "optimizer_step", spy)
    cpu = torch.device("cpu")
    null = contextlib.nullcontext
    step, _, _ = alter_step_fn(TINY, cpu, null, False, 2, 1.0)
    step()
    step, _, (_, reference, _) = baseline_step_fn(TINY, cpu, null, False, True, 1.0)
    step()
    assert calls == [(1.0, True), (1.0, False)]
    assert {p.dtype for p in reference.frozen.parameters()} == {torch.float32}  # CPU compute dtype
    assert not any(p.requires_grad for p in reference.frozen.parameters())


def test_the_ratios_are_alters_measure_over_the_others() -> None:
    summaries = [{"method": "alter", "median_step_s": 0.3, "s_per_1k_tokens": 0.02, "peak_memory_gib": 7.0},
                 {"method": "lora_graddiff", "median_step_s": 0.25, "s_per_1k_tokens": 0.025, "peak_memory_gib": 26.0},
                 {"method": "full_npo", "median_step_s": 0.5, "s_per_1k_tokens": 0.04, "peak_memory_gib": 20.0}]
    rows = {r["target"]: r for r in compare_to_targets(summaries)}
    assert rows["time per token vs LoRA-GradDiff"]["ratio"] == 0.8 and rows["time per token vs LoRA-GradDiff"]["met"]
    assert rows["time per token vs full-parameter NPO"]["ratio"] == 0.5
    assert rows["step time vs LoRA-GradDiff"]["ratio"] == 1.2 and not rows["step time vs LoRA-GradDiff"]["met"]
    assert rows["peak memory vs full-parameter NPO"]["ratio"] == 0.35 and rows["peak memory vs full-parameter NPO"]["met"]
    summaries[0]["peak_memory_gib"] = 7.2
    assert not {r["target"]: r for r in compare_to_targets(summaries)}["peak memory vs full-parameter NPO"]["met"]
    # A method that ran out of memory has no numbers: its targets are left out, not failed or met.
    assert [r["other"] for r in compare_to_targets([summaries[0], {"method": "full_npo", "error": "oom"}])] == []


def test_the_device_script_packs_the_results_into_out(tmp_path) -> None:
    """`benchmarks/gpu_run.sh train` as the lent GPU machine runs it, here with --tiny on CPU:
    one archive with gpu_train.json / .md, and the console log, in $OUT."""
    env = os.environ | {"OUT": str(tmp_path), "PYTHON": sys.executable, "NO_WHEELS": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_run.sh"), "train", "--tiny", "--steps", "1",
                           "--warmup", "0"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr + done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_train.log", "train-results.tar.gz"]
    with tarfile.open(tmp_path / "train-results.tar.gz") as archive:
        names = sorted(Path(n).name for n in archive.getnames() if n != ".")
        report = json.load(archive.extractfile("./gpu_train.json"))
    assert names == ["gpu_train.json", "gpu_train.md"]
    assert [r["method"] for r in report["results"]] == list(METHODS)
    assert [r["other"] for r in report["settings"]["comparison"]] == ["lora_graddiff", "full_npo", "lora_graddiff",
                                                                      "full_npo"]
    assert '"target": "time per token vs full-parameter NPO"' in (tmp_path / "gpu_train.log").read_text()
