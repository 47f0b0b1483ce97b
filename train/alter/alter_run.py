"""An ALTER run: Phase I (shared A), Phase II (the heads), the router, view calibration, the bundle.

The phases, losses and the isolation rules are documented in `train.alter.alter_steps`; Phase II's
fused step (every head in one forward/backward, `optim.fused_step`, the default) in
`train.alter.fused_step`; the head initialisation in `train.alter.head_init`; the router in
`train.alter.router`; the calibration in `train.alter.calibration`. Loading, data order, meters,
checkpoints and the report are `train.training_run`'s.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from alter_serve.core.bundle import AlterBundle
from alter_serve.core.manifest import Calibration, EntropySpec
from alter_serve.core.names import RETAIN_HEAD, ROUTER_PREFIX, router_tensor_name
from alter_serve.core.views import View, calibrated_view
from train.alter.alter_steps import AlterStepConfig, AlterSteps, answer_mask_without_eos
from train.alter.calibration import CalibrationSettings, answer_probability_scorer, calibrate_views
from train.alter.entropy import EntropySplit, cached_example_entropies, check_reachable_threshold, plot_entropy_histogram
from train.alter.fused_step import FusedPhase2
from train.alter.head_init import init_heads
from train.alter.modeling import AlterModel, inject, to_bundle
from train.alter.router import EntropyRouter, routed_forward, train_router
from train.answer_probability import model_forward
from train.checkpoint import save_state
from train.examples import Batch, Example, answer_token_values, answer_tokens, encode_records, epoch_batches
from train.examples import sample_by_tokens, with_entropies
from train.objectives import sequence_mean_nll
from train.run_report import alter_summary
from train.runtime import PhaseMeter
from train.training_run import TrainingRun, resolve_model_dir
from train.unlearning_data import read_records

ENTROPY_PLOT_FILE = "entropy_hist.png"


class AlterRun(TrainingRun):
    """ALTER (`method` alter, or alter_no_entropy without the entropy split) trained as the config says."""

    def _check_model(self) -> None:
        """An absolute threshold above the largest S_q this vocabulary allows leaves Phase I empty."""
        cfg = self.config.entropy
        if self.config.method == "alter" and cfg.split == "threshold":
            check_reachable_threshold(cfg.threshold, cfg.q, int(self.model.config.vocab_size))

    def summary(self, evals: dict[str, Any]) -> dict[str, Any]:
        return alter_summary(evals)

    def _trainable_state(self, model: AlterModel) -> dict[str, torch.Tensor]:
        return model.adapter_state()

    # ---- the run -----------------------------------------------------------------------------
    def train(self) -> tuple[dict[str, Any], AlterBundle]:
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


def count_trainable_adapter(alter: AlterModel) -> int:
    return sum(p.numel() for p in [*alter.lora_A_parameters(), *alter.lora_B_parameters()])


def _set_trainable(params, flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)
