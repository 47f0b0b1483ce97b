"""Benchmark — training cost on CPU: ALTER vs the baselines on the same data and steps.

    python -m benchmarks.train_cost [--model-dir DIR] [--epochs 3] [--rounds 3] [--threads 2] [--methods ...]
    python -m benchmarks.train_cost --model-dir var/models/smollm2-135m-instruct --name train_cost_cpu_smollm2 \
        --methods alter,lora_grad_diff,full_npo --heads ""      # a real 135M model (alter-train import-smollm2)

Part 1, "methods": `--epochs` unlearning epochs (default 3, the paper's) on the demo model and data (forget = two synthetic genres,
one ALTER forget head each; retain = the other genres), batch 8, for

    alter            ALTER Phase II, fused (train.alter.fused_step: per step, one forward/backward over
                     a batch of every forget head + a retain batch), after its one-off setup
                     (entropy pass + data-driven head init, timed apart)
    alter_sequential the same Phase II step the sequential way (train.alter.alter_steps: one IHL step per
                     forget head + one retain step), the reference the fused step replaces
    lora_grad_ascent / lora_grad_diff / lora_npo    PEFT LoRA, same rank and targets as ALTER
    full_grad_diff / full_npo                       all parameters

Each method runs in its own subprocess, so its peak RSS (resource.ru_maxrss) is its own; the
"training overhead" column is peak RSS minus the RSS after the model and data were loaded.
"total s" = setup + train, and "total / GradDiff" is issue #17's CPU ratio (target: ALTER ≤ 0.8× LoRA-GradDiff).
The methods run `--rounds` times, in alternating order, and each row is the round with the median
total: this machine's background load drifts, and a single pass per method measured the drift.
"tokens" counts the batches a method trains on per step (NPO's reference pass is extra work). Every
step ends as the trainer's does (`train.optim.optimizer_step`: gradient clipping at 1.0, per head
for ALTER, then AdamW).

Part 2, "head mixing": one forward+backward of a mid-size Llama (hidden 512, 4 layers, batch 8 x 128)
with H heads active, rank 8 on all linear layers:

    asym_view      AlterLinear, view mode: heads collapse to B_V, then one rank-r matmul on A x
    asym_routed    AlterLinear, routed mode: per-token ω, one [H·r] matmul on (ω ⊗ A x)
    peft_per_head  PEFT with H LoRA adapters active at once (each its own A x and B)

Results: benchmarks/results/train_cost_cpu.json (+ .md); numbers are medians (see common.py).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_info, markdown_table, print_header, summarize, time_call, write_results

METHODS = ("alter", "alter_sequential", "lora_grad_ascent", "lora_grad_diff", "lora_npo", "full_grad_diff", "full_npo")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FORGET = ["mystery", "fantasy"]
RANK, ALPHA, BATCH = 8, 16.0, 8
GRAD_CLIP = 1.0  # the trainer's default optim.grad_clip; every step is train.optim.optimizer_step, as there


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


# ---- part 1: one method, in a child process ---------------------------------------------------


def run_method(method: str, model_dir: Path, data_dir: Path, epochs: int, threads: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.data.synthetic import SyntheticTofu
    from train.examples import encode_records

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    data = SyntheticTofu.load(data_dir)
    forget = {h: encode_records(tokenizer, data.by_subdomain(h), i + 1) for i, h in enumerate(FORGET)}
    retain = encode_records(tokenizer, data.split(FORGET)[1])
    rss_loaded = _current_rss_bytes()
    if method in ("alter", "alter_sequential"):
        result = _alter_epochs(model, tokenizer, forget, retain, epochs, fused=method == "alter")
    else:
        result = _baseline_epochs(method, model, tokenizer, forget, retain, epochs)
    return {"method": method, **result, "rss_after_load_bytes": rss_loaded, "peak_rss_bytes": _rss_bytes(),
            "training_overhead_bytes": _rss_bytes() - rss_loaded}


def _alter_epochs(model, tokenizer, forget, retain, epochs: int, fused: bool = True) -> dict[str, Any]:
    import contextlib

    from train.alter.alter_steps import AlterStepConfig, AlterSteps
    from train.alter.entropy import example_entropies
    from train.examples import epoch_batches, with_entropies
    from train.alter.fused_step import FusedPhase2
    from train.alter.head_init import init_heads
    from train.alter.modeling import inject
    from train.optim import optimizer_step

    pad = tokenizer.pad_token_id
    started = time.perf_counter()
    every = [*retain, *[e for ex in forget.values() for e in ex]]
    every = with_entropies(every, example_entropies(model, [e.input_ids for e in every], 1.5, 32, pad))
    retain, offset = every[: len(retain)], len(retain)
    for head, examples in forget.items():
        forget[head], offset = every[offset: offset + len(examples)], offset + len(examples)
    alter = inject(model, TARGETS, RANK, ALPHA, FORGET)

    def init_batches(examples):
        for b in epoch_batches(examples, 32, pad):
            yield b.input_ids, b.attention_mask, b.labels != -100
    init_heads(alter, {"retain": init_batches(retain), **{h: init_batches(ex) for h, ex in forget.items()}})
    setup_s = time.perf_counter() - started
    for p in alter.lora_A_parameters():
        p.requires_grad_(False)
    params = alter.lora_B_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    rng = random.Random(0)
    steps = AlterSteps(alter, AlterStepConfig(threshold=1.2), rng, contextlib.nullcontext)
    fused_step = FusedPhase2(alter, steps.config, rng, contextlib.nullcontext, pad) if fused else None
    per_epoch = math.ceil(max(len(ex) for ex in forget.values()) / BATCH)
    alter.train()
    tokens, n_steps, started = 0, 0, time.perf_counter()
    for _ in range(epochs):
        forget_batches = {h: epoch_batches(ex, BATCH, pad, rng) for h, ex in forget.items()}
        retain_batches = epoch_batches(retain, BATCH, pad, rng)
        for i in range(per_epoch):
            batch_of = {head: batches[i % len(batches)] for head, batches in forget_batches.items()}
            retain_batch = retain_batches[i % len(retain_batches)]
            if fused_step is not None:
                fused_step.step(batch_of, retain_batch)
            else:
                for head, batch in batch_of.items():
                    steps.forget(batch, head)
                steps.retain(retain_batch)
            tokens += sum(batch.num_tokens for batch in (*batch_of.values(), retain_batch))
            optimizer_step(optimizer, params, GRAD_CLIP, per_head=True)
            n_steps += 1
    wall = time.perf_counter() - started
    return {"setup_s": round(setup_s, 3), "train_s": round(wall, 3), "steps": n_steps, "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "trainable_parameters": sum(p.numel() for p in params)}


def _baseline_epochs(method: str, model, tokenizer, forget, retain, epochs: int) -> dict[str, Any]:
    import contextlib

    from train.baselines.baseline_steps import BaselineSteps, Reference, make_full_model, make_lora_model
    from train.examples import epoch_batches
    from train.optim import optimizer_step

    peft, loss = method.split("_", 1)
    pad = tokenizer.pad_token_id
    started = time.perf_counter()
    model = make_lora_model(model, RANK, ALPHA, TARGETS) if peft == "lora" else make_full_model(model)
    reference = Reference(model, "lora" if peft == "lora" else "full", needed=loss == "npo")
    setup_s = time.perf_counter() - started
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    steps = BaselineSteps(model, loss, reference, contextlib.nullcontext)
    rng = random.Random(0)
    all_forget = [e for ex in forget.values() for e in ex]
    model.train()
    tokens, n_steps, started = 0, 0, time.perf_counter()
    for _ in range(epochs):
        retain_batches = epoch_batches(retain, BATCH, pad, rng)
        for i, batch in enumerate(epoch_batches(all_forget, BATCH, pad, rng)):
            other = retain_batches[i % len(retain_batches)]
            steps.step(batch, other)
            optimizer_step(optimizer, params, GRAD_CLIP)
            tokens += batch.num_tokens + (other.num_tokens if steps.uses_retain() else 0)
            n_steps += 1
    wall = time.perf_counter() - started
    return {"setup_s": round(setup_s, 3), "train_s": round(wall, 3), "steps": n_steps, "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "trainable_parameters": sum(p.numel() for p in params)}


def methods_in_subprocesses(methods: list[str], model_dir: Path, epochs: int, threads: int,
                            rounds: int = 1, data_dir: Path | None = None) -> list[dict]:
    """Per method, the run with the median total time over `rounds` (alternating order)."""
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for round_ in range(rounds):
        for method in (methods if round_ % 2 == 0 else methods[::-1]):
            command = [sys.executable, "-m", "benchmarks.train_cost", "--one", method, "--model-dir", str(model_dir),
                       "--data", str(data_dir or _default_data(model_dir)), "--epochs", str(epochs),
                       "--threads", str(threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["total_s"] = round(result["setup_s"] + result["train_s"], 3)
            runs[method].append(result)
            print(f"  round {round_ + 1} {method}: {result['setup_s']:.2f} s setup + {result['train_s']:.2f} s train, "
                  f"{result['tokens_per_s']:.0f} tokens/s", flush=True)
    results = []
    for method, done in runs.items():
        ordered = sorted(done, key=lambda r: r["total_s"])
        results.append({**ordered[len(ordered) // 2], "totals_s": [r["total_s"] for r in done]})
    reference = next((r["total_s"] for r in results if r["method"] == "lora_grad_diff"), None)
    for r in results:
        r["total_vs_lora_grad_diff"] = round(r["total_s"] / reference, 3) if reference else None
    return results


# ---- part 2: head mixing --------------------------------------------------------------------------


def head_mixing(heads_list: list[int], threads: int, repeats: int) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.alter.modeling import inject

    torch.set_num_threads(threads)
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=64)
    ids = torch.randint(0, 1024, (8, 128), generator=torch.Generator().manual_seed(0))
    rows = []
    for heads in heads_list:
        torch.manual_seed(0)
        alter = inject(LlamaForCausalLM(config), TARGETS, RANK, ALPHA, [f"d{i}" for i in range(heads - 1)])
        route = torch.ones(*ids.shape, heads)

        def asym(mode: str):
            def run() -> None:
                alter.zero_grad(set_to_none=True)
                kwargs = {"routed": route} if mode == "routed" else {"forget": {h: 1.0 for h in alter.forget_heads}}
                with alter.mixing(mode, **kwargs):
                    alter(input_ids=ids).logits.float().mean().backward()
            return run
        rows.append({"impl": "asym_view", "heads": heads, **summarize(time_call(asym("view"), repeats, warmup=2))})
        rows.append({"impl": "asym_routed", "heads": heads, **summarize(time_call(asym("routed"), repeats, warmup=2))})
        rows.append({"impl": "peft_per_head", "heads": heads, **summarize(time_call(_peft_per_head(config, ids, heads), repeats, warmup=2))})
        print(f"  heads={heads}: " + ", ".join(f"{r['impl']} {r['median_s'] * 1000:.0f} ms" for r in rows[-3:]), flush=True)
    return rows


def _peft_per_head(config, ids: torch.Tensor, heads: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(LlamaForCausalLM(config), lora, adapter_name="h0")
    for i in range(1, heads):
        model.add_adapter(f"h{i}", lora)
    model.base_model.set_adapter([f"h{i}" for i in range(heads)])  # all heads active: Σ_h B_h A_h x

    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids).logits.float().mean().backward()
    return run


# ---- entry ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="demo model folder (default: build it)")
    parser.add_argument("--data", type=Path, default=None,
                        help="synthetic-TOFU folder (default: the model folder's data/, else the default generated set)")
    parser.add_argument("--name", default="train_cost_cpu", help="results name: benchmarks/results/NAME.json")
    parser.add_argument("--epochs", type=int, default=3, help="unlearning epochs (default: the paper's 3)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per method; the median is reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--heads", default="2,4,8", help="head counts for the mixing benchmark (incl. retain); '' skips it")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_method(args.one, args.model_dir, args.data, args.epochs, args.threads)))
        return None
    if args.model_dir is None:
        from train.demo.demo_model import build_demo_model

        args.model_dir = build_demo_model(progress=False)
    data_dir = args.data or _default_data(Path(args.model_dir))
    torch.set_num_threads(args.threads)
    machine = machine_info()
    print_header(args.name, machine)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    print(f"methods ({args.epochs} epochs each, own process, {args.rounds} rounds):", flush=True)
    method_rows = methods_in_subprocesses(methods, Path(args.model_dir), args.epochs, args.threads, args.rounds,
                                          data_dir)
    heads = [int(h) for h in args.heads.split(",") if h.strip()]
    if heads:
        print("head mixing (forward+backward):", flush=True)
    mixing_rows = head_mixing(heads, args.threads, args.repeats)
    table = _tables(method_rows, mixing_rows)
    print("\n" + table)
    settings = {"model_dir": str(args.model_dir), "data": str(data_dir), "epochs": args.epochs, "rounds": args.rounds,
                "threads": args.threads, "batch": BATCH,
                "rank": RANK, "alpha": ALPHA, "targets": TARGETS, "forget_heads": FORGET}
    return write_results(args.name, settings, [{"part": "methods", **r} for r in method_rows]
                         + [{"part": "head_mixing", **r} for r in mixing_rows], table, machine)


def _default_data(model_dir: Path) -> Path:
    """The model folder's data/ (the demo model's training data), else the default synthetic set,
    generated once into var/cache (a pretrained model has none of its own)."""
    if (model_dir / "data").is_dir():
        return model_dir / "data"
    from train.data.synthetic import generate

    folder = Path("var/cache/train_cost_data")
    if not folder.is_dir():
        generate().save(folder)
    return folder


def _tables(method_rows: list[dict], mixing_rows: list[dict]) -> str:
    mib = 2**20
    first = markdown_table(
        ["method", "setup s", "train s", "total s", "total / GradDiff", "steps", "tokens/s", "trainable params",
         "peak RSS MiB", "overhead MiB"],
        [[r["method"], r["setup_s"], r["train_s"], r["total_s"], r["total_vs_lora_grad_diff"] or "-", r["steps"],
          r["tokens_per_s"], r["trainable_parameters"], round(r["peak_rss_bytes"] / mib),
          round(r["training_overhead_bytes"] / mib)] for r in method_rows])
    if not mixing_rows:
        return first
    second = markdown_table(["implementation", "heads", "median ms", "min ms"],
                            [[r["impl"], r["heads"], r["median_s"] * 1000, r["min_s"] * 1000] for r in mixing_rows])
    return first + "\n\n" + second


if __name__ == "__main__":
    main(sys.argv[1:])
