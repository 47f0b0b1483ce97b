"""Supervised fine-tuning of a whole pretrained model on question/answer records, resumable.

This is how the unlearning benchmark makes its reference models from a real pretrained model
(`benchmarks.unlearn_bench`): "full" learns every author, "retain" every author but the forget ones,
each on one fixed schedule, so that any difference between them is the forget data.

Every parameter trains (as TOFU fine-tunes its models), with AdamW and the loss

    L = −(1/N) Σ_t log p(y_t | y_<t)        over the answer tokens and the closing EOS

(`train.objectives.nll_loss`; the prompt is masked). The learning rate is `lr` throughout, after
a linear warm-up over `warmup_steps`. Epoch e visits the records in an order drawn from
(seed, e) alone, so a run resumed from its checkpoint after epoch e trains exactly as the
uninterrupted run would.

Files under `out_dir`:

    model/            the fine-tuned model (safetensors) and its tokenizer, written atomically
    finetune.json     schedule, record count, loss per epoch, wall time, tokens/s
    checkpoint.pt     weights + optimizer + finished epochs; removed once model/ is written
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from train.data.prompting import PromptFormat
from train.files import building_folder
from train.examples import epoch_batches, encode_records
from train.objectives import nll_loss
from train.runtime import autocast, seed_everything, torch_threads

MODEL_DIR = "model"
INFO_FILE = "finetune.json"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class FinetuneSchedule:
    """One schedule for every reference model (the defaults follow the CPU timing notes: SmolLM2-135M
    memorises 400 TOFU pairs to greedy ROUGE-L ≈ 0.97 in 8 epochs at lr 1e-4)."""

    epochs: int = 8
    lr: float = 1e-4
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup_steps: int = 10
    grad_clip: float = 1.0
    max_length: int = 256
    bf16: bool = True          # bf16 autocast (CPU too); weights and optimizer stay fp32
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.max_length < 8:
            raise ValueError(f"invalid fine-tune schedule {self}: epochs, batch_size ≥ 1, lr > 0, max_length ≥ 8")


def finetune(model_dir: str | Path, records: Sequence[dict[str, Any]], fmt: PromptFormat,
             schedule: FinetuneSchedule, out_dir: str | Path, *, desc: str = "fine-tune",
             progress: bool = True) -> Path:
    """Fine-tune the model in `model_dir` on `records` (question, answer) in prompt format `fmt`;
    returns `out_dir/model`. Resumes from `out_dir/checkpoint.pt` when it is there; does nothing
    when `out_dir/model` already exists."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    final = out / MODEL_DIR
    if (final / "config.json").is_file():
        return final
    if not records:
        raise ValueError("fine-tuning needs at least one record")
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(schedule.threads):
        seed_everything(schedule.seed)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        examples = encode_records(tokenizer, records, 0, schedule.max_length, fmt)
        optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
        per_epoch = math.ceil(len(examples) / schedule.batch_size)
        warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / max(1, schedule.warmup_steps)))
        state = _load_checkpoint(out / CHECKPOINT_FILE, model, optimizer, warmup)
        bar = tqdm(total=schedule.epochs * per_epoch, initial=state["epochs"] * per_epoch, desc=desc,
                   unit="step", disable=not progress)
        model.train()
        device = torch.device("cpu")
        for epoch in range(state["epochs"], schedule.epochs):
            started, losses, tokens = time.perf_counter(), [], 0
            for batch in epoch_batches(examples, schedule.batch_size, pad_id, random.Random(f"{schedule.seed}:{epoch}")):
                with autocast(device, schedule.bf16, cpu=True):
                    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                loss = nll_loss(logits, batch.labels)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
                optimizer.step()
                warmup.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                tokens += batch.num_tokens
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
            state["epochs"] = epoch + 1
            state["history"].append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "tokens": tokens,
                                     "wall_s": round(time.perf_counter() - started, 2)})
            _save_checkpoint(out / CHECKPOINT_FILE, model, optimizer, warmup, state)
        bar.close()
        model.eval()
        with building_folder(final, ".model-") as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    wall = sum(h["wall_s"] for h in state["history"])
    info = {"schedule": asdict(schedule), "records": len(records), "examples": len(examples),
            "prompt_format": fmt.name, "history": state["history"], "train_time_s": round(wall, 1),
            "tokens_per_s": round(sum(h["tokens"] for h in state["history"]) / wall, 1) if wall else None}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return final


def _load_checkpoint(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    if not path.is_file():
        return {"epochs": 0, "history": []}
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return {"epochs": int(saved["epochs"]), "history": json.loads(saved["history"])}


def _save_checkpoint(path: Path, model, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Written to a temporary file and renamed, so an interruption leaves the previous checkpoint."""
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "epochs": state["epochs"],
               "history": json.dumps(state["history"])}
    # torch.save names the archive after the file and refuses a name that starts with a dot.
    handle, tmp = tempfile.mkstemp(prefix="checkpoint-partial-", suffix=".pt", dir=path.parent)
    os.close(handle)
    torch.save(payload, tmp)
    os.replace(tmp, path)

