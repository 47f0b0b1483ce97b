"""What every training run shares, ALTER or baseline: loading, data order, meters, checkpoints, the report.

`TrainingRun` loads the base model, its tokenizer and the run's records (the forget set grouped by
head, `train.unlearning_data`), encodes them, and restores the checkpoint when resuming. A kind of
run subclasses it with `train()` and `summary()`: `train.alter.alter_run.AlterRun` and
`train.baselines.baseline_run.BaselineRun`. `execute()` trains, then writes the report, the loss
curve and the bundle (`train.run` lists the files).

Cost accounting in the report. `phases` holds each checkpointed phase (phase1, phase2, router;
baseline) with its steps, tokens, wall time, tokens/s and peak memory. The headline numbers are
the *training* phases' only (phase1 + phase2, or baseline; not the router, which trains on
cached features and no adapter):

    train_time_s        their wall time;   tokens_per_s   their tokens / train_time_s
    peak_memory_bytes   the largest of their peaks

Everything else is in `stages` (load, entropy, head_init, evaluation, calibration: wall time and
peak each), and `wall_time_s` is the whole run after loading. Peak memory is measured per phase
or stage (the window restarts at each start; `peak_memory_scope` says what the number is on this
device; see `train.runtime`).

Data order. Every pass over a data set is shuffled by its own RNG seeded with (seed, what, pass),
so the order of an epoch is a function of the seed and the epoch alone; with the steps' RNG
restored from the checkpoint, a resumed run trains exactly as the uninterrupted run would.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from alter_serve.core.bundle import AlterBundle
from alter_serve.core.fingerprint import fingerprint
from alter_serve.core.names import RETAIN_HEAD
from train.answer_probability import mean_answer_probability, model_forward
from train.checkpoint import TrainState, config_digest, load_state, save_state
from train.run_config import TrainConfig
from train.examples import Batch, Example, answer_tokens, encode_records, epoch_batches
from train.files import write_json
from train.optim import lr_factor, optimizer_step, set_lr
from train.run_report import LOSS_PLOT_FILE, REPORT_FILE, plot_losses
from train.runtime import PhaseMeter, autocast, peak_memory_scope, resolve_device, seed_everything, weight_dtype
from train.subdomains import mean_hidden_states
from train.unlearning_data import load_unlearning_data

BUNDLE_DIR = "bundle"
TRAINING_PHASES = ("phase1", "phase2", "baseline")  # what train_time_s, tokens_per_s and peak_memory_bytes cover


@dataclass
class RunResult:
    run_dir: Path
    report: dict[str, Any]
    bundle_dir: Path | None


def resolve_model_dir(path: str) -> Path:
    if path == "demo":
        from train.demo.demo_model import build_demo_model

        return build_demo_model()
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.path {path!r} is not a Hugging Face model folder (no config.json)")
    return folder


class TrainingRun:
    def __init__(self, config: TrainConfig, resume: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.rng = seed_everything(config.runtime.seed)  # the steps' random views (data order: _order)
        self.device = resolve_device(config.runtime.device)
        self.stages: dict[str, PhaseMeter] = {}
        self._pending: list[tuple[str, torch.Tensor]] = []  # losses not yet read back from the device
        self.run_dir = config.output_path()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model_dir = resolve_model_dir(config.model.path)
        with self._stage("load"):
            self.fingerprint = fingerprint(self.model_dir)
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            self.compute_dtype = weight_dtype(config.model.dtype, self.device)
            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self._load_dtype())
            self.model = self.model.to(self.device).eval()
            self._check_model()
            self.data = load_unlearning_data(config.data, self.model_dir, config.runtime.seed, self._embed)
            self.truncated: dict[str, int] = {}
            self.retain_examples = self._encode(RETAIN_HEAD, self.data.retain, 0)
            self.forget_examples = {head: self._encode(head, records, i + 1)
                                    for i, (head, records) in enumerate(self.data.forget.items())}
        digest = config_digest(config.model_dump(mode="json"))
        self.state = (load_state(self.run_dir, digest) if resume else None) or TrainState(digest)
        if resume and self.state.done:
            self.state.restore_rng(self.rng)
        self.autocast = lambda: autocast(self.device, config.runtime.bf16, config.runtime.cpu_bf16)

    def _encode(self, name: str, records, head: int) -> list[Example]:
        """Encoded examples of one set, without those whose answer `max_length` cut off entirely
        (nothing to train on; scored, they would count as probability 1): counted in the report."""
        encoded = encode_records(self.tokenizer, records, head, self.config.data.max_length, self.config.data.fmt)
        kept = [e for e in encoded if answer_tokens(e) > 0]
        dropped = len(encoded) - len(kept)
        if dropped:
            self.truncated[name] = dropped
            warnings.warn(f"{dropped} of {len(encoded)} {name!r} examples have no answer token within "
                          f"data.max_length = {self.config.data.max_length} (the prompt fills it); they are left out",
                          stacklevel=2)
        if not kept:
            raise ValueError(f"no {name!r} example has an answer token within data.max_length = "
                             f"{self.config.data.max_length}; raise it")
        return kept

    # ---- what a kind of run adds ------------------------------------------------------------
    def train(self) -> tuple[dict[str, Any], AlterBundle | None]:
        """Train; return the report's method-specific part (with "eval": the trained model's
        scores when runtime.report_eval is on) and the bundle to save, if any."""
        raise NotImplementedError

    def summary(self, evals: dict[str, Any]) -> dict[str, Any]:
        """The headline numbers of `evals` ("base" and what `train` scored), for the report and the bundle."""
        raise NotImplementedError

    def _load_dtype(self) -> torch.dtype:
        """The dtype the base model is loaded in."""
        return self.compute_dtype

    def _check_model(self) -> None:
        """Refuse a configuration the loaded base model cannot train, before the data is loaded."""

    def _trainable_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The weights an epoch's checkpoint keeps: every parameter that trains."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    # ---- top level -------------------------------------------------------------------------
    def execute(self) -> RunResult:
        started = time.perf_counter()
        scored = self.config.runtime.report_eval
        before = self.evaluate(model_forward(self.model)) if scored else None
        report, bundle = self.train()
        if scored:
            report["eval"] = {"base": before, **report.pop("eval")}
            report["summary"] = self.summary(report["eval"])
        else:
            report["summary"] = {"scored_as": "not scored (runtime.report_eval is off)"}
        report.update(self._header(time.perf_counter() - started))
        if bundle is not None:
            bundle.manifest.training["metrics"] = report["summary"]
            bundle_dir = bundle.save(self.run_dir / BUNDLE_DIR)
            report["bundle"] = {"path": str(bundle_dir), "content_hash": bundle.content_hash()}
        write_json(self.run_dir / REPORT_FILE, report)
        plot_losses(self.state.history, self.run_dir / LOSS_PLOT_FILE, f"{self.config.name} ({self.config.method})")
        return RunResult(self.run_dir, report, self.run_dir / BUNDLE_DIR if bundle is not None else None)

    def _header(self, wall_s: float) -> dict[str, Any]:
        meters = self.state.meters
        training = [m for phase, m in meters.items() if phase in TRAINING_PHASES]
        tokens = sum(m.get("tokens", 0) for m in training)
        train_s = sum(m.get("wall_s", 0.0) for m in training)
        return {
            "name": self.config.name, "method": self.config.method,
            "peft": "asym_lora" if self.config.is_alter else self.config.peft,
            "base_model": {"path": str(self.model_dir), "fingerprint": self.fingerprint},
            "data": {"digest": self.data.digest, "heads": {h: len(r) for h, r in self.data.forget.items()},
                     "retain": len(self.data.retain), "truncated_examples": dict(self.truncated)},
            "device": str(self.device), "threads": torch.get_num_threads(),
            "wall_time_s": round(wall_s, 3), "train_time_s": round(train_s, 3),
            "tokens_per_s": round(tokens / train_s, 1) if train_s > 0 else None,
            "peak_memory_bytes": max((m.get("peak_memory_bytes", 0) for m in training), default=0),
            "peak_memory_scope": peak_memory_scope(self.device),
            "phases": meters,
            "stages": {name: {"wall_s": round(m.wall_s, 3), "peak_memory_bytes": m.peak_memory_bytes}
                       for name, m in self.stages.items()},
            "losses": self.state.history,
            "config": self.config.model_dump(mode="json"),
        }

    # ---- evaluation --------------------------------------------------------------------------
    def evaluate(self, forward) -> dict[str, Any]:
        """Mean answer probability on the retain set, each forget sub-domain, and all forget data."""
        score = lambda examples: mean_answer_probability(  # noqa: E731
            forward, examples, self.pad_id, self.config.runtime.eval_batch_size, self.device)
        with self._stage("evaluation"):
            forget = {head: score(examples) for head, examples in self.forget_examples.items()}
            return {"retain": score(self.retain_examples), "forget": forget, "forget_all": score(self._all_forget())}

    # ---- data helpers ----------------------------------------------------------------------
    def _embed(self, records) -> torch.Tensor:
        examples = encode_records(self.tokenizer, records, 0, self.config.data.max_length, self.config.data.fmt)
        return mean_hidden_states(self.model, examples, self.pad_id, self.config.runtime.eval_batch_size, self.device)

    def _rng(self, *what: object) -> random.Random:
        """An RNG of its own for (seed, *what): str seeds hash the same in every process."""
        return random.Random(":".join(str(part) for part in (self.config.runtime.seed, *what)))

    def _order(self, examples: list[Example], stream: str, index: int,
               batch_size: int | None = None) -> list[Batch]:
        """Pass `index` over `examples` as host batches (of optim.batch_size unless given), shuffled
        by (seed, stream, index) alone.

        Host batches: the steps read token counts and masks on them (no device sync) and copy each
        batch to the device asynchronously."""
        return epoch_batches(examples, batch_size or self.config.optim.batch_size, self.pad_id,
                             self._rng(stream, index))

    def _stream(self, examples: list[Example], stream: str, start: int = 0,
                batch_size: int | None = None) -> Iterator[Batch]:
        """Passes 0, 1, … over `examples` back to back (see `_order`), from batch `start` on, so a
        resumed run picks a cycling stream up where the interrupted one was."""
        per_pass = math.ceil(len(examples) / (batch_size or self.config.optim.batch_size))
        index, skip = divmod(start, per_pass)
        while True:
            yield from self._order(examples, stream, index, batch_size)[skip:]
            index, skip = index + 1, 0

    def _all_forget(self) -> list[Example]:
        return [e for examples in self.forget_examples.values() for e in examples]

    # ---- loop plumbing -----------------------------------------------------------------------
    def _optimizer(self, phase: str, params, lr: float) -> torch.optim.Optimizer:
        optimizer = torch.optim.AdamW(list(params), lr=lr, weight_decay=self.config.optim.weight_decay,
                                      eps=self.config.optim.adam_eps)
        if phase in self.state.optimizer:
            optimizer.load_state_dict(self.state.optimizer[phase])
        return optimizer

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, params, per_head: bool = False,
                        schedule: tuple[float, int, int, int] | None = None) -> None:
        """Clip (per head for the stacked ALTER heads: `clip_head_grad_norms`), step, clear grads.

        `schedule` = (base lr, step, total steps, steps per epoch) applies `optim.lr_schedule`."""
        if schedule is not None:
            base, step, total, per_epoch = schedule
            warmup = round(self.config.optim.warmup_epochs * per_epoch)
            set_lr(optimizer, base * lr_factor(step, total, warmup, self.config.optim.lr_schedule))
        optimizer_step(optimizer, list(params), self.config.optim.grad_clip, per_head)

    def _meter(self, phase: str) -> PhaseMeter:
        meter = PhaseMeter(phase, self.device)
        saved = self.state.meters.get(phase)
        if saved:
            meter.tokens, meter.steps, meter.wall_s = saved["tokens"], saved["steps"], saved["wall_s"]
            meter.peak_memory_bytes = saved.get("peak_memory_bytes", 0)
        return meter

    def _stage(self, name: str) -> PhaseMeter:
        """The meter of a non-training stage (wall time and peak memory, summed over its uses)."""
        return self.stages.setdefault(name, PhaseMeter(name, self.device))

    def _bar(self, desc: str, total: int, phase: str, per_epoch: int) -> tqdm:
        done = min(total, self.state.epochs_done(phase) * per_epoch)
        return tqdm(total=total, initial=done, desc=desc, unit="step", disable=not self.config.runtime.progress)

    def _log(self, series: str, value: torch.Tensor) -> None:
        """Queue a detached 0-dim loss; `_flush_losses` reads the queue back in one transfer."""
        self._pending.append((series, value))

    def _flush_losses(self) -> None:
        if not self._pending:
            return
        values = torch.stack([v.float() for _, v in self._pending]).tolist()  # one device → host copy
        for (series, _), value in zip(self._pending, values):
            self.state.history.setdefault(series, []).append(value)
        self._pending.clear()

    def _end_epoch(self, phase: str, epoch: int, model, optimizer, meter: PhaseMeter) -> None:
        self._flush_losses()
        self.state.done[phase] = epoch + 1
        self.state.weights = self._trainable_state(model)
        self.state.optimizer[phase] = optimizer.state_dict()
        # The meter (with the phase's peak so far) goes into the checkpoint, so a resumed run still
        # reports the whole phase.
        self.state.meters[phase] = meter.summary()
        self.state.capture_rng(self.rng)
        save_state(self.run_dir, self.state)
