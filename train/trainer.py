"""Training runs: ALTER (Phase I + Phase II + router) and the baselines, with checkpoints and reports.

`run(config)` writes, under the run folder (`runtime.output_dir`, default `runs/<name>`):

    bundle/              the ALTER bundle (AlterBundle.save; manifest.base_model.fingerprint is the
                         fingerprint of the base model folder). LoRA baselines are exported as a
                         bundle too: shared A = lora_A, retain head 0, one forget head "forget" = lora_B,
                         so the view {forget: 1} is exactly the baseline's LoRA.
    report.json          losses, wall time, tokens/s, peak memory, trainable parameters, entropy split,
                         answer probabilities before/after (per view, routed, per sub-domain)
    loss_curve.png       loss per optimizer step, one panel per phase
    entropy_hist.png     base-model token entropies with the threshold (ALTER)
    model/               a full-parameter baseline's unlearned model (Hugging Face folder)
    checkpoint/state.pt  the state after the last finished epoch (`run(..., resume=True)` continues)

The phases, losses and the isolation rules are documented in `train.alter.alter_steps`; Phase II's fused
step (every head in one forward/backward, `optim.fused_step`, the default) in `train.alter.fused_step`;
the head initialisation in `train.alter.head_init`; the router in `train.alter.router`.

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
from alter_serve.core.manifest import BaseModelRef, Calibration, EntropySpec, Heads, Manifest
from alter_serve.core.names import RETAIN_HEAD, ROUTER_PREFIX, router_tensor_name
from alter_serve.core.views import View, calibrated_view

from train.alter.alter_steps import AlterStepConfig, AlterSteps, answer_mask_without_eos
from train.baselines.baseline_steps import BaselineSteps, Reference, make_full_model, make_lora_model
from train.alter.calibration import CalibrationSettings, answer_probability_scorer, calibrate_views
from train.checkpoint import TrainState, config_digest, load_state, save_state
from train.config import TrainConfig
from train.alter.entropy import EntropySplit, cached_example_entropies, check_reachable_threshold, plot_entropy_histogram
from train.examples import (
    Batch,
    Example,
    answer_token_values,
    answer_tokens,
    encode_records,
    epoch_batches,
    sample_by_tokens,
    with_entropies,
)
from train.alter.fused_step import FusedPhase2
from train.alter.head_init import init_heads
from train.alter.modeling import AlterModel, inject, to_bundle
from train.objectives import sequence_mean_nll
from train.optim import lr_factor, optimizer_step, set_lr
from train.files import write_json
from train.report import LOSS_PLOT_FILE, REPORT_FILE, plot_losses
from train.alter.router import EntropyRouter, routed_forward, train_router
from train.runtime import (
    PhaseMeter,
    autocast,
    count_trainable,
    peak_memory_scope,
    resolve_device,
    seed_everything,
    torch_threads,
    weight_dtype,
)
from train.answer_probability import mean_answer_probability, model_forward
from train.subdomains import mean_hidden_states
from train.unlearning_data import load_unlearning_data, read_records

BUNDLE_DIR = "bundle"
ENTROPY_PLOT_FILE = "entropy_hist.png"
BASELINE_HEAD = "forget"
FULL_MODEL_DIR = "model"  # a full-parameter baseline's unlearned model
TRAINING_PHASES = ("phase1", "phase2", "baseline")  # what train_time_s, tokens_per_s and peak_memory_bytes cover


@dataclass
class RunResult:
    run_dir: Path
    report: dict[str, Any]
    bundle_dir: Path | None


def run(config: TrainConfig, resume: bool = False) -> RunResult:
    """Train as `config` says; see the module docstring for what is written where."""
    with torch_threads(config.runtime.threads):
        return Trainer(config, resume).execute()


def resolve_model_dir(path: str) -> Path:
    if path == "demo":
        from train.demo_model import build_demo_model

        return build_demo_model()
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.path {path!r} is not a Hugging Face model folder (no config.json)")
    return folder


class Trainer:
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
            dtype = torch.float32 if config.peft == "full" and not config.is_alter else self.compute_dtype
            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).to(self.device).eval()
            self._check_threshold()
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

    def _check_threshold(self) -> None:
        """An absolute threshold above the largest S_q this vocabulary allows leaves Phase I empty."""
        cfg = self.config.entropy
        if self.config.method == "alter" and cfg.split == "threshold":
            check_reachable_threshold(cfg.threshold, cfg.q, int(self.model.config.vocab_size))

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
    # ---- top level -------------------------------------------------------------------------
    def execute(self) -> RunResult:
        started = time.perf_counter()
        scored = self.config.runtime.report_eval
        before = self.evaluate(model_forward(self.model)) if scored else None
        if self.config.is_alter:
            report, bundle = self.train_alter()
        else:
            report, bundle = self.train_baseline()
        if scored:
            report["eval"] = {"base": before, **report.pop("eval")}
            report["summary"] = _summary(report["eval"], self.config.is_alter)
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

    def _evaluate_alter(self, alter: AlterModel, router: EntropyRouter | None,
                        calibration: Calibration | None = None) -> dict[str, Any]:
        heads = alter.forget_heads
        views = {"retain-only": {}, "forget-all": {h: 1.0 for h in heads}}
        views.update({f"forget-{h}": {h: 1.0} for h in heads})
        if calibration is not None:
            stacked = View(name="forget-all", forget=views["forget-all"])
            views["forget-all-calibrated"] = calibrated_view(stacked, calibration).forget
        results = {}
        alter.eval()
        for name, forget in views.items():
            with alter.mixing("view", forget=forget):
                results[f"view:{name}"] = self.evaluate(model_forward(alter))
        if router is not None:
            def routed(batch: Batch) -> torch.Tensor:
                return routed_forward(alter, router, batch.input_ids, batch.attention_mask).logits
            results["routed"] = self.evaluate(routed)
        return results

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

    # ---- entropies -------------------------------------------------------------------------
    def _attach_entropies(self) -> float:
        """Compute (or load) base-model entropies for every example; return the split threshold."""
        cfg = self.config.entropy
        every = [*self.retain_examples, *self._all_forget()]
        with self._stage("entropy"):
            values = cached_example_entropies(
                self.model, [e.input_ids for e in every], self.fingerprint, Path(self.config.runtime.cache_dir) / "entropy",
                cfg.q, self.config.runtime.eval_batch_size, self.pad_id, self.device)
        every = with_entropies(every, values)
        self.retain_examples = every[: len(self.retain_examples)]
        offset = len(self.retain_examples)
        for head, examples in self.forget_examples.items():
            self.forget_examples[head] = every[offset: offset + len(examples)]
            offset += len(examples)
        answer_entropies = answer_token_values(every)
        threshold = EntropySplit(cfg.q, cfg.threshold, cfg.split, cfg.quantile).resolve_threshold(answer_entropies)
        self.entropy_stats = {
            "q": cfg.q, "split": cfg.split, "threshold": threshold, "tokens": int(answer_entropies.numel()),
            "high_fraction": float((answer_entropies > threshold).float().mean()) if answer_entropies.numel() else 0.0,
            "mean": float(answer_entropies.mean()) if answer_entropies.numel() else 0.0,
        }
        if cfg.histogram:
            plot_entropy_histogram(answer_entropies, threshold, self.run_dir / ENTROPY_PLOT_FILE, cfg.q,
                                   f"{self.config.name}: answer-token entropy")
        return threshold

    # ---- ALTER ---------------------------------------------------------------------------------
    def train_alter(self) -> tuple[dict[str, Any], AlterBundle]:
        cfg = self.config
        use_entropy = cfg.method == "alter"
        threshold = self._attach_entropies()
        self.forget_target = self._never_learned_nll()
        alter = inject(self.model, cfg.adapter.target_modules, cfg.adapter.rank, cfg.adapter.alpha, self.data.heads)
        self._init_or_restore_heads(alter)
        if cfg.runtime.gradient_checkpointing:
            alter.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        step_config = AlterStepConfig(threshold, use_entropy, cfg.optim.beta, cfg.optim.gamma, cfg.optim.lam,
                                      cfg.optim.retain_view_head_prob, cfg.optim.retain_view_nonempty,
                                      forget_loss=cfg.optim.forget_loss, forget_tokens=cfg.optim.forget_tokens,
                                      forget_target=self.forget_target, retain_kl=cfg.optim.retain_kl,
                                      forget_anchor=cfg.optim.forget_anchor)
        steps = AlterSteps(alter, step_config, self.rng, self.autocast, self._forget_teacher())
        self._phase1(alter, steps)
        self._phase2(alter, steps)
        router = self._train_router(alter)
        with self._stage("calibration"):
            calibration = self._calibrate(alter)
        evals = self._evaluate_alter(alter, router, calibration) if cfg.runtime.report_eval else {}
        report = {"entropy": self.entropy_stats, "forget_target_nll": self.forget_target,
                  "trainable_parameters": {"total": count_trainable_adapter(alter),
                                           "phase1_A": sum(p.numel() for p in alter.lora_A_parameters()),
                                           "phase2_B": sum(p.numel() for p in alter.lora_B_parameters())},
                  "eval": evals}
        if calibration is not None:
            report["calibration"] = calibration.model_dump(mode="json")
        bundle = to_bundle(alter, str(self.model_dir), self.fingerprint,
                           entropy=EntropySpec(q=cfg.entropy.q, threshold=threshold),
                           router=router.to_tensors() if router else None,
                           router_spec=router.spec() if router else None,
                           training={"method": cfg.method, "config": cfg.model_dump(mode="json"),
                                     "data_digest": self.data.digest, "entropy": self.entropy_stats})
        bundle.manifest.calibration = calibration
        return report, bundle

    def _never_learned_nll(self) -> float | None:
        """τ of forget_loss bounded_nll: the configured value, or the mean over data.holdout_file of
        each answer's mean NLL (EOS left out, as the forget mask leaves it out) under the base model."""
        cfg = self.config
        if cfg.optim.forget_loss != "bounded_nll":
            return None
        if cfg.optim.forget_nll_target is not None:
            return cfg.optim.forget_nll_target
        examples = encode_records(self.tokenizer, read_records(cfg.data.holdout_file), 0, cfg.data.max_length,
                                  cfg.data.fmt)
        total, count = 0.0, 0
        with self._stage("never_learned_nll"), torch.no_grad():
            for batch in epoch_batches(examples, cfg.runtime.eval_batch_size, self.pad_id):
                batch = batch.to(self.device)
                with self.autocast():
                    logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                mean_nll, has = sequence_mean_nll(logits, batch.labels, answer_mask_without_eos(batch.labels))
                total += float(mean_nll[has].sum())
                count += int(has.sum())
        if count == 0:
            raise ValueError(f"data.holdout_file {cfg.data.holdout_file} has no answer to measure the never-learned NLL on")
        return total / count

    def _forget_teacher(self):
        """forget_loss kl_pre: the model before the forget data was learned, as a no-grad forward."""
        path = self.config.model.pretrained_path
        if self.config.optim.forget_loss != "kl_pre":
            return None
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(resolve_model_dir(path), dtype=self.compute_dtype)
        teacher = teacher.to(self.device).eval().requires_grad_(False)
        if teacher.config.vocab_size != self.model.config.vocab_size:
            raise ValueError(f"model.pretrained_path {path} has a vocabulary of {teacher.config.vocab_size}, the base "
                             f"model {self.model.config.vocab_size}: the teacher must share the tokenizer")
        return lambda batch: teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def _calibrate(self, alter: AlterModel) -> Calibration | None:
        """ω(n) for views of n forget heads, on the retain calibration set (train.alter.calibration)."""
        cfg = self.config.calibration
        if not cfg.enabled:
            return None
        if cfg.retain_file:
            examples = encode_records(self.tokenizer, read_records(cfg.retain_file), 0, self.config.data.max_length,
                                      self.config.data.fmt)
        else:
            examples = list(self.retain_examples)
        if len(examples) > cfg.max_examples:
            examples = random.Random(self.config.runtime.seed).sample(examples, cfg.max_examples)
        alter.eval()
        scorer = answer_probability_scorer(alter, self.pad_id, self.config.runtime.eval_batch_size, self.device)
        settings = CalibrationSettings(cfg.min_retain_ratio, cfg.steps, cfg.subsets_per_count)
        # Bisection stops early when ω = 1 already meets the floor, so the number of scorings is open.
        with tqdm(desc=f"View calibration ({len(examples)} retain examples)", unit="scoring",
                  disable=not self.config.runtime.progress) as bar:
            def score(batch_examples):
                bar.update(1)
                return scorer(batch_examples)
            calibration = calibrate_views(alter, examples, score, settings, self.config.runtime.seed)
            bar.set_postfix(omega=",".join(f"{n}:{w:.3f}" for n, w in calibration.weights.items()))
        return calibration

    def _init_or_restore_heads(self, alter: AlterModel) -> None:
        """Restore the checkpointed adapters, or initialise every head from its own data: a seeded
        random sample of its examples holding `adapter.init_tokens` answer tokens (the retain set
        for B_r, sub-domain d's forget set for B_d), spread over the set rather than its first rows."""
        if self.state.weights:
            alter.load_adapter_state({k: v for k, v in self.state.weights.items() if not k.startswith(ROUTER_PREFIX)})
            return
        budget = self.config.adapter.init_tokens

        def batches(head: str, examples: list[Example]):
            sample = sample_by_tokens(examples, budget, self._rng("head_init", head), answer_tokens)
            for b in epoch_batches(sample, self.config.runtime.eval_batch_size, self.pad_id):
                b = b.to(self.device)
                yield b.input_ids, b.attention_mask, b.labels != -100
        data = {RETAIN_HEAD: batches(RETAIN_HEAD, self.retain_examples)}
        data.update({head: batches(head, ex) for head, ex in self.forget_examples.items()})
        with self._stage("head_init"):
            init_heads(alter, data, self.config.adapter.init_scale, budget)

    def _phase1(self, alter: AlterModel, steps: AlterSteps) -> None:
        epochs = self.config.optim.phase1_epochs
        examples = [*self._all_forget(), *self.retain_examples]
        _set_trainable(alter.lora_A_parameters(), True)
        _set_trainable(alter.lora_B_parameters(), False)
        optimizer = self._optimizer("phase1", alter.lora_A_parameters(), self.config.optim.lr_A)
        meter = self._meter("phase1")
        per_epoch = math.ceil(len(examples) / self.config.optim.batch_size)
        bar = self._bar("Phase I (shared A, high-entropy tokens)", epochs * per_epoch, "phase1", per_epoch)
        alter.train()
        for epoch in range(self.state.epochs_done("phase1"), epochs):
            with meter:
                for batch in self._order(examples, "phase1", epoch):
                    loss = steps.phase1(batch)
                    if loss is not None:
                        self._optimizer_step(optimizer, alter.lora_A_parameters())
                        self._log("phase1/nll_high_entropy", loss)
                        meter.tokens += batch.num_tokens
                    meter.steps += 1
                    bar.update(1)
            self._end_epoch("phase1", epoch, alter, optimizer, meter)
        bar.close()
        _set_trainable(alter.lora_A_parameters(), False)

    def _phase2(self, alter: AlterModel, steps: AlterSteps) -> None:
        cfg = self.config.optim
        _set_trainable(alter.lora_B_parameters(), True)
        optimizer = self._optimizer("phase2", alter.lora_B_parameters(), cfg.lr_B)
        meter = self._meter("phase2")
        per_epoch = math.ceil(max(len(ex) for ex in self.forget_examples.values()) / cfg.batch_size)
        done = self.state.epochs_done("phase2")
        forget_iters = {head: self._stream(ex, f"phase2/{head}", done * per_epoch)
                        for head, ex in self.forget_examples.items()}
        retain_iter = self._stream(self.retain_examples, "phase2/retain", done * per_epoch)
        # Each forget head's retain anchor: its own stream of small retain batches (one per step).
        anchor_iters = ({head: self._stream(self.retain_examples, f"phase2/anchor/{head}", done * per_epoch,
                                            cfg.anchor_batch_size) for head in self.forget_examples}
                        if cfg.forget_anchor > 0 else {})
        bar = self._bar(f"Phase II (heads: {cfg.forget_loss} forget / NLL retain)", cfg.epochs * per_epoch, "phase2",
                        per_epoch)
        fused = (FusedPhase2(alter, steps.config, steps.rng, steps.autocast, self.pad_id,
                             forget_teacher=steps.forget_teacher) if cfg.fused_step else None)
        alter.train()
        for epoch in range(done, cfg.epochs):
            with meter:
                for _ in range(per_epoch):
                    if fused is not None:
                        self._fused_phase2_step(fused, optimizer, forget_iters, retain_iter, anchor_iters, meter,
                                                (cfg.lr_B, meter.steps, cfg.epochs * per_epoch, per_epoch))
                        bar.update(1)
                        continue
                    # The sequential reference step: one forward/backward per head.
                    for head, iterator in forget_iters.items():
                        batch = next(iterator)
                        anchor = next(anchor_iters[head]) if anchor_iters else None
                        parts = steps.forget(batch, head, anchor)
                        self._log(f"phase2/{self.config.optim.forget_loss}_{head}", parts[self.config.optim.forget_loss])
                        if anchor is not None:
                            self._log(f"phase2/anchor_{head}", parts["anchor"])
                            meter.tokens += anchor.num_tokens
                        meter.tokens += batch.num_tokens
                    batch = next(retain_iter)
                    parts = steps.retain(batch)
                    self._log("phase2/nll_retain", parts["nll"])
                    if "kl" in parts:
                        self._log("phase2/kl_retain", parts["kl"])
                    self._log("phase2/orth_retain", parts["orth"])
                    meter.tokens += batch.num_tokens
                    self._optimizer_step(optimizer, alter.lora_B_parameters(), per_head=True,
                                         schedule=(cfg.lr_B, meter.steps, cfg.epochs * per_epoch, per_epoch))
                    meter.steps += 1
                    bar.update(1)
            self._end_epoch("phase2", epoch, alter, optimizer, meter)
            retain = self.state.history.get("phase2/nll_retain", [])[-per_epoch:]
            bar.set_postfix(retain=f"{sum(retain) / max(len(retain), 1):.3f}")
        bar.close()
        _set_trainable(alter.lora_B_parameters(), False)

    def _fused_phase2_step(self, fused: FusedPhase2, optimizer: torch.optim.Optimizer,
                           forget_iters: dict[str, Iterator[Batch]], retain_iter: Iterator[Batch],
                           anchor_iters: dict[str, Iterator[Batch]], meter: PhaseMeter,
                           schedule: tuple[float, int, int, int]) -> None:
        """One Phase II optimizer step with every head in one forward/backward (train.alter.fused_step);
        logs the same series as the sequential step."""
        forget = {head: next(iterator) for head, iterator in forget_iters.items()}
        anchors = {head: next(iterator) for head, iterator in anchor_iters.items()}
        retain = next(retain_iter)
        losses = fused.step(forget, retain, anchors)
        for head in forget:
            self._log(f"phase2/{self.config.optim.forget_loss}_{head}", losses.per_head[head])
        for head, value in losses.anchor.items():
            self._log(f"phase2/anchor_{head}", value)
        self._log("phase2/nll_retain", losses.per_head[RETAIN_HEAD])
        if losses.retain_kl is not None:
            self._log("phase2/kl_retain", losses.retain_kl)
        self._log("phase2/orth_retain", losses.orthogonality[0])
        meter.tokens += sum(batch.num_tokens for batch in (*forget.values(), *anchors.values(), retain))
        self._optimizer_step(optimizer, fused.alter.lora_B_parameters(), per_head=True, schedule=schedule)
        meter.steps += 1

    def _train_router(self, alter: AlterModel) -> EntropyRouter | None:
        cfg = self.config
        if cfg.optim.router_epochs == 0:
            return None
        router = EntropyRouter(alter.config.hidden_size, len(alter.forget_heads), cfg.entropy.q,
                               self.entropy_stats["threshold"]).to(self.device)
        if router_tensor_name("weight") in self.state.weights:
            router.weight.data.copy_(self.state.weights[router_tensor_name("weight")])
            return router
        # One token budget per label, each filled from a seeded sample of that label's examples.
        budget = cfg.optim.router_tokens_per_label
        labelled = {RETAIN_HEAD: self.retain_examples, **self.forget_examples}  # Example.head: 0 retain, d head d
        batches = [(b.input_ids, b.attention_mask, b.head)
                   for name, examples in labelled.items()
                   for b in epoch_batches(sample_by_tokens(examples, budget, self._rng("router", name)),
                                          cfg.runtime.eval_batch_size, self.pad_id)]
        meter = self._meter("router")
        with meter:
            fit = train_router(alter, router, batches, cfg.optim.router_epochs, cfg.optim.router_lr,
                               tokens_per_label=budget, seed=cfg.runtime.seed)
        meter.steps, meter.tokens = fit.steps, sum(fit.tokens.values())
        self.state.history["router/cross_entropy"] = fit.history
        self.state.weights = {**alter.adapter_state(), router_tensor_name("weight"): router.weight.detach()}
        names = list(labelled)
        self.state.meters["router"] = {**meter.summary(),
                                       "tokens_per_label": {names[label]: n for label, n in fit.tokens.items()}}
        self.state.done["router"] = cfg.optim.router_epochs
        save_state(self.run_dir, self.state)
        return router

    # ---- baselines -----------------------------------------------------------------------------
    def train_baseline(self) -> tuple[dict[str, Any], AlterBundle | None]:
        cfg = self.config
        if cfg.peft == "lora":
            model = make_lora_model(self.model, cfg.adapter.rank, cfg.adapter.alpha, cfg.adapter.target_modules)
        else:
            model = make_full_model(self.model)
        # The frozen NPO reference only runs forward passes: it is kept in the compute dtype.
        reference = Reference(model, cfg.peft, needed=cfg.method == "npo", dtype=self._reference_dtype())
        if cfg.runtime.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainable = [p for p in model.parameters() if p.requires_grad]
        if self.state.weights:
            _load_named(model, self.state.weights)
        steps = BaselineSteps(model, cfg.method, reference, self.autocast, cfg.optim.beta, cfg.optim.gamma, cfg.optim.npo_beta)
        optimizer = self._optimizer("baseline", trainable, cfg.optim.lr)
        forget = self._all_forget()
        per_epoch = math.ceil(len(forget) / cfg.optim.batch_size)
        done = self.state.epochs_done("baseline")
        retain_iter = self._stream(self.retain_examples, "baseline/retain", done * per_epoch)
        meter = self._meter("baseline")
        bar = self._bar(f"{cfg.method} ({cfg.peft})", cfg.optim.epochs * per_epoch, "baseline", per_epoch)
        model.train()
        for epoch in range(done, cfg.optim.epochs):
            with meter:
                for batch in self._order(forget, "baseline/forget", epoch):
                    retain = next(retain_iter)
                    self._log(f"baseline/{cfg.method}", steps.step(batch, retain)["loss"])
                    self._optimizer_step(optimizer, trainable,
                                         schedule=(cfg.optim.lr, meter.steps, cfg.optim.epochs * per_epoch, per_epoch))
                    meter.tokens += batch.num_tokens + (retain.num_tokens if steps.uses_retain() else 0)
                    meter.steps += 1
                    bar.update(1)
            self._end_epoch("baseline", epoch, model, optimizer, meter)
        bar.close()
        model.eval()
        report = {"trainable_parameters": {"total": count_trainable(model)},
                  "eval": {"model": self.evaluate(model_forward(model))} if cfg.runtime.report_eval else {}}
        bundle = self._lora_bundle(model) if cfg.peft == "lora" else None
        if cfg.peft == "full":
            report["model_dir"] = str(self._save_full_model(model))
        return report, bundle

    def _save_full_model(self, model: torch.nn.Module) -> Path:
        """A full-parameter baseline is a whole model: written as a Hugging Face folder (safetensors)."""
        target = self.run_dir / FULL_MODEL_DIR
        model.save_pretrained(target, safe_serialization=True)
        self.tokenizer.save_pretrained(target)
        return target

    def _reference_dtype(self) -> torch.dtype:
        """bf16 where the forward runs under bf16 autocast, else the configured weight dtype."""
        if self.device.type == "cuda" and self.config.runtime.bf16:
            return torch.bfloat16
        return self.compute_dtype

    def _lora_bundle(self, peft_model) -> AlterBundle:
        """A LoRA baseline as a bundle: A = lora_A, retain head 0, forget head "forget" = lora_B."""
        cfg = self.config
        lora_a, lora_b = {}, {}
        for name, param in peft_model.named_parameters():
            for kind, store in (("lora_A", lora_a), ("lora_B", lora_b)):
                marker = f".{kind}.default.weight"
                if name.endswith(marker):
                    module = name[len("base_model.model."): -len(marker)]
                    store[module] = param.detach().float().cpu().contiguous()
        manifest = Manifest(
            base_model=BaseModelRef(name_or_path=str(self.model_dir), fingerprint=self.fingerprint),
            rank=cfg.adapter.rank, alpha=cfg.adapter.alpha, target_modules=sorted(cfg.adapter.target_modules),
            heads=Heads(forget=[BASELINE_HEAD]),
            training={"method": f"lora_{cfg.method}", "config": cfg.model_dump(mode="json"), "data_digest": self.data.digest})
        retain = {m: torch.zeros_like(b) for m, b in lora_b.items()}
        return AlterBundle(manifest, lora_a, retain, {BASELINE_HEAD: lora_b})

    # ---- shared loop plumbing --------------------------------------------------------------------
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
        if isinstance(model, AlterModel):
            self.state.weights = model.adapter_state()
        else:
            self.state.weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        self.state.optimizer[phase] = optimizer.state_dict()
        # The meter (with the phase's peak so far) goes into the checkpoint, so a resumed run still
        # reports the whole phase.
        self.state.meters[phase] = meter.summary()
        self.state.capture_rng(self.rng)
        save_state(self.run_dir, self.state)


def count_trainable_adapter(alter: AlterModel) -> int:
    return sum(p.numel() for p in [*alter.lora_A_parameters(), *alter.lora_B_parameters()])


def _set_trainable(params, flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


def _load_named(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def _ratio(after: float, before: float) -> float:
    return after / max(before, 1e-12)


def _change(base: dict[str, Any], after: dict[str, Any], forget_before: float, forget_after: float) -> dict[str, float]:
    return {
        "forget_probability_before": forget_before, "forget_probability_after": forget_after,
        "forget_drop_factor": _ratio(forget_before, forget_after),
        "retain_probability_before": base["retain"], "retain_probability_after": after["retain"],
        "retain_ratio": _ratio(after["retain"], base["retain"]),
    }


def _summary(evals: dict[str, Any], is_alter: bool) -> dict[str, Any]:
    """Headline numbers against the base model.

    ALTER is scored as served, in static views: view "forget-<d>" (B_r + B_d) on sub-domain d's
    forget data and on the retain data, for every head; the headline is the worst head (smallest
    forget drop, smallest retain ratio). The all-heads view and the routed model are reported too.
    A baseline is scored as the trained model on all forget data and the retain data.
    """
    base = evals["base"]
    if not is_alter:
        model = evals["model"]
        return {"scored_as": "model", **_change(base, model, base["forget_all"], model["forget_all"])}
    per_view = {head: _change(base, evals[f"view:forget-{head}"], base["forget"][head],
                              evals[f"view:forget-{head}"]["forget"][head]) for head in base["forget"]}
    all_view = evals["view:forget-all"]
    summary = {
        "scored_as": "static views as served: view forget-<d> on sub-domain d and on the retain set (worst head)",
        "forget_drop_factor": min(v["forget_drop_factor"] for v in per_view.values()),
        "retain_ratio": min(v["retain_ratio"] for v in per_view.values()),
        "per_view": per_view,
        "all_heads_view": _change(base, all_view, base["forget_all"], all_view["forget_all"]),
    }
    calibrated = evals.get("view:forget-all-calibrated")
    if calibrated is not None:
        # Per head too: a stacked view must forget every one of its sub-domains, not just on average.
        summary["all_heads_view_calibrated"] = {
            **_change(base, calibrated, base["forget_all"], calibrated["forget_all"]),
            "per_head_forget_drop_factor": {h: _ratio(base["forget"][h], calibrated["forget"][h]) for h in base["forget"]}}
    if "routed" in evals:
        summary["routed"] = _change(base, evals["routed"], base["forget_all"], evals["routed"]["forget_all"])
    return summary
