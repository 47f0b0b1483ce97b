"""The GPU training benchmark runs end to end on CPU with --tiny and prints well-formed JSON lines."""

from __future__ import annotations

import json

from benchmarks.gpu_train_bench import FULL, METHODS, main


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
    # Tokens per step: ALTER trains 2 forget batches + 1 retain batch; NPO one of each (2 x 96 tokens each).
    assert by_method["alter"]["tokens_per_step"] == 3 * 2 * 96
    assert by_method["lora_npo"]["tokens_per_step"] == 2 * 2 * 96
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
    from benchmarks.gpu_train_bench import TINY, alter_step_fn, npo_step_fn

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
    step, _, (_, reference, _) = npo_step_fn(TINY, cpu, null, False, True, 1.0)
    step()
    assert calls == [(1.0, True), (1.0, False)]
    assert {p.dtype for p in reference.frozen.parameters()} == {torch.float32}  # CPU compute dtype
    assert not any(p.requires_grad for p in reference.frozen.parameters())
