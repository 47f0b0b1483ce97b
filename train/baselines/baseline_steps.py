"""Baseline unlearning steps (open-unlearning definitions) on PEFT LoRA or on all parameters.

    GradAscent:  L = −NLL(forget)
    GradDiff:    L = γ · (−NLL(forget)) + α · NLL(retain)
    NPO:         L = γ · L_NPO(forget; π_ref, β_NPO) + α · NLL(retain)

γ and α are `optim.beta` and `optim.gamma` (the same forget/retain weights ALTER uses). The NPO
reference π_ref is the frozen base: the LoRA model with its adapter disabled, or, for
full-parameter training, a frozen copy made before the first step, in the compute dtype (bf16
under CUDA autocast: it only runs forward passes, so an fp32 copy would double the memory the
trainable fp32 weights already take, for the same bf16 matmuls).

Steps take batches anywhere (host batches best: the copy to the device is then asynchronous) and
return detached 0-dim tensors, so no step waits for the GPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

from train.examples import Batch
from train.objectives import grad_ascent_loss, grad_diff_loss, npo_loss

BASELINES = ("grad_ascent", "grad_diff", "npo")


def make_lora_model(model: nn.Module, rank: int, alpha: float, target_modules: list[str]) -> nn.Module:
    """A PEFT LoRA of the same rank, alpha and target modules as the ALTER adapter."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def make_full_model(model: nn.Module) -> nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


class Reference:
    """Logits of the frozen reference model, for NPO.

    For full-parameter training the reference is a frozen copy of `model` whose parameters are
    in `dtype` (None: the model's own); the copy is made parameter by parameter in that dtype, so
    a full-precision second copy never exists, not even for a moment."""

    def __init__(self, model: nn.Module, peft: str, needed: bool, dtype: torch.dtype | None = None):
        self.model, self.peft = model, peft
        self.frozen: nn.Module | None = None
        if needed and peft == "full":
            self.frozen = frozen_copy(model, dtype).eval()

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen(input_ids=batch.input_ids, attention_mask=batch.model_mask).logits
        with _adapter_disabled(self.model):
            return self.model(input_ids=batch.input_ids, attention_mask=batch.model_mask).logits


def frozen_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of `model` with every parameter detached, frozen and cast to `dtype`.

    The converted parameters are handed to `copy.deepcopy` through its memo, so deepcopy never
    copies the originals; tied parameters (one tensor, two names) stay tied. Buffers are copied
    as they are (RoPE frequencies stay fp32)."""
    memo: dict[int, object] = {}
    for parameter in model.parameters():
        if id(parameter) not in memo:
            data = parameter.detach().to(dtype=dtype or parameter.dtype, copy=True)
            memo[id(parameter)] = nn.Parameter(data, requires_grad=False)
    return copy.deepcopy(model, memo)


@contextmanager
def _adapter_disabled(model: nn.Module):
    with model.disable_adapter():
        yield


class BaselineSteps:
    """One backward of a baseline loss on a (forget, retain) batch pair."""

    def __init__(self, model: nn.Module, method: str, reference: Reference,
                 autocast: Callable[[], AbstractContextManager],
                 gamma: float = 1.0, alpha: float = 1.0, npo_beta: float = 0.1):
        if method not in BASELINES:
            raise ValueError(f"unknown baseline {method!r}; choose one of {BASELINES}")
        self.model, self.method, self.reference, self.autocast = model, method, reference, autocast
        self.gamma, self.alpha, self.npo_beta = gamma, alpha, npo_beta
        self.device = next(model.parameters()).device

    def _logits(self, batch: Batch) -> torch.Tensor:
        return self.model(input_ids=batch.input_ids, attention_mask=batch.model_mask).logits

    def step(self, forget: Batch, retain: Batch) -> dict[str, torch.Tensor]:
        forget = forget.to(self.device)
        retain = retain.to(self.device) if self.uses_retain() else retain
        with self.autocast():
            f_logits = self._logits(forget)
            if self.method == "grad_ascent":
                loss = grad_ascent_loss(f_logits, forget.labels)
            elif self.method == "grad_diff":
                loss = grad_diff_loss(f_logits, forget.labels, self._logits(retain), retain.labels,
                                      self.gamma, self.alpha)
            else:
                loss = npo_loss(f_logits, self.reference.logits(forget), forget.labels,
                                self._logits(retain), retain.labels, self.npo_beta, self.gamma, self.alpha)
        loss.backward()
        return {"loss": loss.detach()}

    def uses_retain(self) -> bool:
        return self.method != "grad_ascent"
