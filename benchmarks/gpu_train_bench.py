"""GPU training-cost benchmark: ALTER vs LoRA-NPO vs full-parameter NPO on a ~1.39B Llama.

    python -m benchmarks.gpu_train_bench                # H100/H200: 1.39B model, batch 8 x 1024, bf16
    python -m benchmarks.gpu_train_bench --tiny         # the same code on CPU with a tiny model (tests)

Model: random-init LlamaForCausalLM, hidden 2048, 28 layers, 16 query / 8 key-value heads
(head_dim 128), MLP 5632, vocabulary 32000, tied embeddings: 1.39 B parameters. Random weights are
enough: the cost of a training step does not depend on what the weights are. Data are random token
ids with the first 64 positions of each sequence as the (unlabelled) prompt.

Methods, each one optimizer step exactly as the trainer runs it (the same step classes,
train.alter.alter_steps / train.baselines.baseline_steps, and the same optimizer step, train.optim.optimizer_step:
gradient clipping at --grad-clip, the trainer's default 1.0, then AdamW):

    alter     AsymLoRA rank 8 on q/k/v/o/gate/up/down, 2 forget heads, the fused Phase II step
              (train.alter.fused_step: every head's batch in one forward/backward, IHL → B_d only,
              NLL → B_r only), per-head clipping; frozen bf16 base
    alter_sequential  the same step the sequential way (train.alter.alter_steps: one forward/backward per
              forget head + one retain), the reference the fused step is measured against
    lora_graddiff  PEFT LoRA rank 8, same targets; GradDiff (ascent on a forget batch + NLL on a
              retain batch); frozen bf16 base
    lora_npo  PEFT LoRA rank 8, same targets; NPO on a forget batch (reference = adapter disabled)
              + NLL on a retain batch; frozen bf16 base
    full_npo  all parameters (fp32 master weights, AdamW), bf16 autocast; NPO + retain NLL; the
              reference is a frozen copy made directly in bf16 (train.baselines.baseline_steps.Reference with
              the trainer's compute dtype; no transient fp32 copy)

Batches are built on the host and handed to the steps, which copy them to the GPU asynchronously
(as in the trainer). Every step processes B x T tokens per batch; "tokens" counts the batches a step
trains on (ALTER: 2 forget + 1 retain batch; NPO: 1 forget + 1 retain batch; NPO's reference pass is
extra work, not counted). Output: one JSON line per timed step and one summary line per method with
the median step time, tokens/s and peak memory (CUDA: torch.cuda.max_memory_allocated since the
method started; CPU: the RSS high-water mark since then, see train.runtime). On CUDA the summary
also counts the host syncs of one extra, untimed step (torch.cuda.set_sync_debug_mode("warn"):
every blocking copy, .item() or device-to-host read in the step is one warning); a step that
never waits for the GPU counts 0.
Nothing but torch, transformers, peft and safetensors is needed (no vLLM).

With --out-dir it also writes gpu_train.json (machine, settings, every summary, and the ratios
below) and gpu_train.md. The targets (issue #17), the fused ALTER step against the others in one run:

    time per trained token  alter / lora_graddiff ≤ 0.8    alter / full_npo ≤ 0.7
    step time  alter / lora_graddiff ≤ 1.0 (stretch)       peak memory  alter / full_npo ≤ 0.35

ALTER's step trains on more tokens (2 forget + 1 retain batch against 2 batches), so the table
also gives time per trained token. On the lent GPU machine: `benchmarks/gpu_run.sh train`.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("alter", "alter_sequential", "lora_graddiff", "lora_npo", "full_npo")
# (name, ALTER's measure ÷ the other method's, at most): the cost targets of issue #17.
TARGETS_VS_ALTER = (("time per token vs LoRA-GradDiff", "s_per_1k_tokens", "lora_graddiff", 0.8),
                    ("time per token vs full-parameter NPO", "s_per_1k_tokens", "full_npo", 0.7),
                    ("step time vs LoRA-GradDiff", "median_step_s", "lora_graddiff", 1.0),
                    ("peak memory vs full-parameter NPO", "peak_memory_gib", "full_npo", 0.35))
PROMPT_TOKENS = 64


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int


FULL = Shape(hidden=2048, layers=28, heads=16, kv_heads=8, intermediate=5632, vocab=32000, batch=8, seq=1024)
TINY = Shape(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab=256, batch=2, seq=96)


def make_model(shape: Shape, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.hidden // shape.heads,
                         max_position_embeddings=max(2048, shape.seq), tie_word_embeddings=True)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model


def random_batch(shape: Shape, generator: torch.Generator, head: int = 0):
    """A host batch (the steps copy it to the device), unpadded like the trainer's full-length rows."""
    from train.examples import Batch

    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=generator)
    labels = ids.clone()
    labels[:, : min(PROMPT_TOKENS, shape.seq // 2)] = -100
    entropy = torch.rand(shape.batch, shape.seq - 1, generator=generator) * 2.0
    heads = torch.full((shape.batch,), head, dtype=torch.long)
    return Batch(ids, torch.ones_like(ids), labels, heads, entropy, padded=False)


# ---- one optimizer step per method -------------------------------------------------------------


def alter_step_fn(shape: Shape, device: torch.device, autocast: Callable, grad_ckpt: bool, heads: int,
                  grad_clip: float | None, fused: bool = True):
    from train.alter.alter_steps import AlterStepConfig, AlterSteps
    from train.alter.fused_step import FusedPhase2
    from train.alter.modeling import inject
    from train.optim import optimizer_step

    model = make_model(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    names = [f"d{i}" for i in range(heads)]
    alter = inject(model, TARGETS, 8, 16.0, names)
    with torch.no_grad():
        for layer in alter.layers.values():
            layer.lora_B.normal_(0, 0.01)  # non-zero heads, as after the data-driven initialisation
    for p in alter.lora_A_parameters():
        p.requires_grad_(False)  # Phase II: A is frozen
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    steps = AlterSteps(alter, AlterStepConfig(threshold=1.2), random.Random(0), autocast)
    fused_step = FusedPhase2(alter, steps.config, steps.rng, autocast, pad_id=0)
    params = alter.lora_B_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    def step() -> int:
        forget = {name: random_batch(shape, generator, head=i + 1) for i, name in enumerate(names)}
        retain = random_batch(shape, generator)
        if fused:
            fused_step.step(forget, retain)
        else:
            for name, batch in forget.items():
                steps.forget(batch, name)
            steps.retain(retain)
        optimizer_step(optimizer, params, grad_clip, per_head=True)
        return sum(batch.num_tokens for batch in (*forget.values(), retain))

    trainable = sum(p.numel() for p in params)
    return step, trainable, (alter, optimizer)


def baseline_step_fn(shape: Shape, device: torch.device, autocast: Callable, grad_ckpt: bool, full: bool,
                     grad_clip: float | None, loss: str = "npo"):
    from train.baselines.baseline_steps import BaselineSteps, Reference, make_full_model, make_lora_model
    from train.optim import optimizer_step

    on_cuda = device.type == "cuda"
    compute_dtype = torch.bfloat16 if on_cuda else torch.float32  # the trainer's, under bf16 autocast
    model = make_model(shape, device, torch.float32 if full else compute_dtype)
    model = make_full_model(model) if full else make_lora_model(model, 8, 16.0, TARGETS)
    # As the trainer does: the frozen reference is copied straight into the compute dtype.
    reference = Reference(model, "full" if full else "lora", needed=loss == "npo", dtype=compute_dtype)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    steps = BaselineSteps(model, loss, reference, autocast, npo_beta=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5 if full else 1e-4)
    generator = torch.Generator().manual_seed(0)

    def step() -> int:
        forget, retain = random_batch(shape, generator), random_batch(shape, generator)
        steps.step(forget, retain)
        optimizer_step(optimizer, params, grad_clip)
        return forget.num_tokens + retain.num_tokens

    return step, sum(p.numel() for p in params), (model, reference, optimizer)


# ---- measuring ------------------------------------------------------------------------------------


def count_host_syncs(step: Callable[[], int], device: torch.device) -> int | None:
    """Host syncs in one call of `step` (CUDA only: None elsewhere)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def bench_method(method: str, shape: Shape, device: torch.device, steps: int, warmup: int,
                 grad_ckpt: bool, heads: int, emit: Callable[[dict], None], grad_clip: float | None = 1.0) -> dict:
    from train.runtime import autocast as bf16_autocast, peak_memory_bytes, reset_peak_memory, synchronize

    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)
    autocast = lambda: bf16_autocast(device, True)  # noqa: E731
    torch.manual_seed(0)
    started = time.perf_counter()
    if method in ("alter", "alter_sequential"):
        step, trainable, keep = alter_step_fn(shape, device, autocast, grad_ckpt, heads, grad_clip,
                                              fused=method == "alter")
    else:
        loss = "grad_diff" if method == "lora_graddiff" else "npo"
        step, trainable, keep = baseline_step_fn(shape, device, autocast, grad_ckpt, method == "full_npo", grad_clip,
                                                 loss)
    setup_s = time.perf_counter() - started
    times, tokens = [], 0
    for index in range(warmup + steps):
        synchronize(device)
        t0 = time.perf_counter()
        tokens = step()
        synchronize(device)
        elapsed = time.perf_counter() - t0
        if index >= warmup:
            times.append(elapsed)
            emit({"method": method, "step": index - warmup, "step_s": round(elapsed, 4),
                  "tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1)})
    median = statistics.median(times)
    syncs = count_host_syncs(step, device)
    summary = {"method": method, "summary": True, "median_step_s": round(median, 4),
               "tokens_per_step": tokens, "tokens_per_s": round(tokens / median, 1),
               "s_per_1k_tokens": round(1000 * median / tokens, 5),
               "peak_memory_gib": round(peak_memory_bytes(device) / 2**30, 3), "trainable_parameters": trainable,
               "setup_s": round(setup_s, 2), "steps": steps, "warmup": warmup, "gradient_checkpointing": grad_ckpt,
               "grad_clip": grad_clip, "host_syncs_per_step": syncs}
    emit(summary)
    del step, keep
    gc.collect()
    return summary


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (for tests)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    parser.add_argument("--heads", type=int, default=2, help="ALTER forget heads")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing for every method")
    parser.add_argument("--grad-clip", type=float, default=1.0,
                        help="gradient clipping as the trainer's optim.grad_clip (default 1.0; 0: none)")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    parser.add_argument("--out-dir", default=None, help="also write gpu_train.json and gpu_train.md here")
    args = parser.parse_args(argv)
    shape = TINY if args.tiny else FULL
    shape = Shape(**{**shape.__dict__, **{k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v}})
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)

    n_params = sum(p.numel() for p in make_model(shape, torch.device("meta"), torch.bfloat16).parameters())
    header = {"benchmark": "gpu_train_bench", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "shape": shape.__dict__, "parameters": n_params, "methods": methods}
    emit(header)
    summaries = []
    for method in methods:
        try:
            summaries.append(bench_method(method, shape, device, steps, warmup, args.grad_ckpt, args.heads, emit,
                                          args.grad_clip or None))
        except torch.cuda.OutOfMemoryError as exc:  # report and go on with the next method
            emit({"method": method, "summary": True, "error": f"out of memory: {exc}"})
            gc.collect()
            torch.cuda.empty_cache()
    comparison = compare_to_targets(summaries)
    for row in comparison:
        emit({"target": row["target"], "ratio": row["ratio"], "at_most": row["at_most"], "met": row["met"]})
    if args.out_dir is not None:
        write_report(Path(args.out_dir), header | {"steps": steps, "warmup": warmup, "heads": args.heads,
                                                   "gradient_checkpointing": args.grad_ckpt,
                                                   "grad_clip": args.grad_clip or None},
                     summaries, comparison)
    return summaries


def compare_to_targets(summaries: list[dict]) -> list[dict]:
    """ALTER's time per token, step time and peak memory ÷ each other method's, against the targets of issue #17
    (`TARGETS_VS_ALTER`); a target whose methods did not both run is left out."""
    by_method = {s["method"]: s for s in summaries if "error" not in s}
    rows = []
    if "alter" not in by_method:
        return rows
    alter = by_method["alter"]
    for target, measure, other, at_most in TARGETS_VS_ALTER:
        if other in by_method:
            ratio = alter[measure] / by_method[other][measure]
            rows.append({"target": target, "measure": measure, "other": other, "ratio": round(ratio, 3),
                         "at_most": at_most, "met": ratio <= at_most})
    return rows


def write_report(out_dir: Path, settings: dict, summaries: list[dict], comparison: list[dict]) -> Path:
    """gpu_train.json (machine, settings, summaries, comparison) and gpu_train.md (two tables)."""
    from benchmarks.common import markdown_table, write_results

    methods = markdown_table(
        ["method", "s/step", "tokens/step", "tokens/s", "s per 1k tokens", "peak GiB", "host syncs/step",
         "trainable params"],
        [[s["method"], s["median_step_s"], s["tokens_per_step"], s["tokens_per_s"], s["s_per_1k_tokens"],
          s["peak_memory_gib"], "-" if s["host_syncs_per_step"] is None else s["host_syncs_per_step"],
          s["trainable_parameters"]]
         if "error" not in s else [s["method"], s["error"], "", "", "", "", "", ""] for s in summaries])
    targets = markdown_table(["ALTER ÷ other", "ratio", "target", "met"],
                             [[r["target"], r["ratio"], f"≤ {r['at_most']}", "yes" if r["met"] else "NO"]
                              for r in comparison])
    return write_results("gpu_train", settings | {"comparison": comparison}, summaries,
                         methods + "\n\n" + targets, out_dir=out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
