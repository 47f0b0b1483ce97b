"""A baseline run: GradAscent, GradDiff or NPO (`train.baselines.baseline_steps`) on a PEFT LoRA or on
every parameter, for the same budget as ALTER.

A LoRA baseline is exported as a bundle: shared A = lora_A, retain head 0, one forget head
"forget" = lora_B, so the view {forget: 1} is exactly the baseline's LoRA. A full-parameter
baseline is a whole model, written as a Hugging Face folder (`model/`). Loading, data order,
meters, checkpoints and the report are `train.training_run`'s.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from alter_serve.core.bundle import AlterBundle
from alter_serve.core.manifest import BaseModelRef, Heads, Manifest
from train.answer_probability import model_forward
from train.baselines.baseline_steps import BaselineSteps, Reference, make_full_model, make_lora_model
from train.run_report import baseline_summary
from train.runtime import count_trainable
from train.training_run import TrainingRun

BASELINE_HEAD = "forget"
FULL_MODEL_DIR = "model"  # a full-parameter baseline's unlearned model


class BaselineRun(TrainingRun):
    """A baseline (`method` grad_ascent, grad_diff or npo; `peft` lora or full) trained as the config says."""

    def summary(self, evals: dict[str, Any]) -> dict[str, Any]:
        return baseline_summary(evals)

    def _load_dtype(self) -> torch.dtype:
        """Full-parameter training keeps fp32 master weights; a LoRA's base stays in the compute dtype."""
        return torch.float32 if self.config.peft == "full" else self.compute_dtype

    def train(self) -> tuple[dict[str, Any], AlterBundle | None]:
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


def _load_named(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
