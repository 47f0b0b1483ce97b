"""Validation of an ALTER bundle's contents: every rule, each problem reported on its own.

The checks return lists of problems rather than raising, so that `bundle.load_bundle` and
`bundle.validate_contents` report every problem at once: a broken manifest does not hide broken
tensors, nor a bad dtype a bad shape. Tensors are checked by name (`names`), dtype, shape (against
the manifest's rank and the base model's linear layers) and value (finite, |x| ≤
MAX_WEIGHT_MAGNITUDE).
"""

from __future__ import annotations

import math

import torch

from .manifest import FORMAT_VERSION, MAX_SCALE, ROUTER_TENSORS, SUPPORTED_RANKS, Calibration, Manifest
from .names import (
    HEAD_NAME_PATTERN,
    MODULE_NAME_PATTERN,
    RETAIN_HEAD,
    ROUTER_NAME_PATTERN,
    forget_tensor_name,
    is_valid_head_name,
    is_valid_module_name,
    is_valid_router_name,
    lora_a_name,
    retain_tensor_name,
    router_tensor_name,
)
from .tensors import peak_abs

_ALLOWED_DTYPES = {torch.float32, torch.float16, torch.bfloat16}

# Value limits. vLLM may serve in fp16 (max 65504) and folds s into B, so a view is only servable
# when s·|B_V| stays below that (views.compose checks the composed view). Trained A and B entries
# are O(1); anything near these bounds is a corrupted or hostile file, not a model.
FP16_MAX = 65504.0
MAX_WEIGHT_MAGNITUDE = 1e4  # every A, B and router value: |x| ≤ this


def _module_matches(module: str, targets: list[str]) -> bool:
    return any(module == t or module.endswith("." + t) for t in targets)


def manifest_problems(m: Manifest, base_fingerprint: str | None) -> list[str]:
    """Manifest rules that span fields or need the served base model."""
    problems: list[str] = []
    if m.format_version != FORMAT_VERSION:
        problems.append(f"format_version {m.format_version} is not supported (expected {FORMAT_VERSION})")
    if m.rank not in SUPPORTED_RANKS:
        problems.append(f"rank {m.rank} is not one vLLM serves; use one of {list(SUPPORTED_RANKS)}")
    elif m.scale > MAX_SCALE:
        problems.append(f"scale alpha/rank = {m.alpha}/{m.rank} = {m.scale:g} exceeds {MAX_SCALE:g}; "
                        "lower alpha (PEFT's usual alpha = 2·rank gives 2)")
    if len(set(m.target_modules)) != len(m.target_modules):
        problems.append(f"duplicate names in target_modules {m.target_modules}")
    if m.heads.retain != RETAIN_HEAD:
        problems.append(f"heads.retain must be {RETAIN_HEAD!r}, got {m.heads.retain!r}")
    for head in m.heads.forget:
        if not is_valid_head_name(head):
            problems.append(f"forget head name {head!r} must match {HEAD_NAME_PATTERN}")
        if head == RETAIN_HEAD:
            problems.append(f"forget head may not be named {RETAIN_HEAD!r}")
    if len(set(m.heads.forget)) != len(m.heads.forget):
        problems.append(f"duplicate forget head names in {m.heads.forget}")
    if base_fingerprint is not None and m.base_model.fingerprint != base_fingerprint:
        problems.append(
            f"bundle was trained on base model {m.base_model.fingerprint} but the served model is "
            f"{base_fingerprint}; train the bundle on this base model"
        )
    problems += calibration_problems(m.calibration, len(m.heads.forget))
    return problems


_RATIO_ROUNDING = 1e-6  # train.calibration writes retain ratios rounded to 6 decimals


def calibration_problems(calibration: Calibration | None, n_forget: int) -> list[str]:
    """A calibration must hold one weight in [0, 1] per head count 1..n_forget, non-increasing in
    the count, and retain ratios only for those counts; a ratio below the floor is only possible
    where the weight is 0 (even the retain head alone missed it)."""
    if calibration is None:
        return []
    problems = []
    expected = set(range(1, n_forget + 1))
    for count, weight in sorted(calibration.weights.items()):
        if count not in expected:
            problems.append(f"calibration.weights: head count {count} is outside 1..{n_forget} (the forget heads)")
        if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
            problems.append(f"calibration.weights[{count}]: {weight} must be within [0, 1]")
    missing = sorted(expected - set(calibration.weights))
    if not expected:
        problems.append("calibration: the bundle has no forget heads to calibrate; drop the calibration block")
    elif missing:
        problems.append(f"calibration.weights: no weight for head count(s) {missing}; a calibration gives one "
                        f"weight per count 1..{n_forget}")
    counts = sorted(expected & set(calibration.weights))
    for fewer, more in zip(counts, counts[1:]):
        if calibration.weights[more] > calibration.weights[fewer]:
            problems.append(f"calibration.weights[{more}] = {calibration.weights[more]} exceeds weights[{fewer}] = "
                            f"{calibration.weights[fewer]}; more forget heads never get a larger weight")
    for count, ratio in sorted(calibration.retain_ratio.items()):
        if count not in calibration.weights:
            problems.append(f"calibration.retain_ratio[{count}]: no calibrated weight for head count {count}")
        if not (math.isfinite(ratio) and ratio >= 0.0):
            problems.append(f"calibration.retain_ratio[{count}]: {ratio} must be finite and >= 0")
        elif ratio < calibration.min_retain_ratio - _RATIO_ROUNDING and calibration.weights.get(count, 0.0) > 0.0:
            problems.append(f"calibration.retain_ratio[{count}]: {ratio} is below min_retain_ratio "
                            f"{calibration.min_retain_ratio} although weights[{count}] > 0")
    return problems


def tensor_problems(
    lora_a: dict[str, torch.Tensor],
    retain: dict[str, torch.Tensor],
    forget: dict[str, dict[str, torch.Tensor]],
    router: dict[str, torch.Tensor],
    manifest: Manifest | None,
    base_shapes: dict[str, tuple[int, int]] | None,
) -> list[str]:
    """Every tensor problem. Without a (valid) manifest the tensors are still checked: dtypes,
    values, and shapes for consistency with each other and with the base model."""
    problems: list[str] = []
    heads = list(manifest.heads.forget) if manifest is not None else sorted(forget)
    if manifest is not None and sorted(forget) != sorted(heads):
        problems.append(f"weights hold forget heads {sorted(forget)} but the manifest lists {sorted(heads)}")
    if not lora_a:
        problems.append(f"no adapted modules (no {lora_a_name('<module>')!r} tensors)")
    modules = set(lora_a) | set(retain) | {module for weights in forget.values() for module in weights}
    for module in sorted(modules):
        problems += _module_problems(module, lora_a.get(module), retain.get(module),
                                     {h: forget.get(h, {}).get(module) for h in heads}, manifest, base_shapes)
    for head in sorted(set(forget) - set(heads)):  # not in the manifest: reported above, values still checked
        for module, tensor in sorted(forget[head].items()):
            problems += _dtype_and_value_problems(forget_tensor_name(module, head), tensor)
    problems += _router_problems(router, manifest)
    return problems


def _module_problems(
    module: str,
    a: torch.Tensor | None,
    b_retain: torch.Tensor | None,
    b_forget: dict[str, torch.Tensor | None],
    manifest: Manifest | None,
    base_shapes: dict[str, tuple[int, int]] | None,
) -> list[str]:
    """One adapted module: its A [rank, in] and one B [out, rank] per head.

    Reference sizes, most trusted first: rank from the manifest, else A; in/out from the base
    model, else A (in) and the retain head (out), so all heads of a module must agree."""
    problems: list[str] = []
    if not is_valid_module_name(module):
        problems.append(f"module {module!r}: name must match {MODULE_NAME_PATTERN}")
    if manifest is not None and not _module_matches(module, manifest.target_modules):
        problems.append(f"{module}: not one of target_modules {manifest.target_modules}")
    base = None
    if base_shapes is not None:
        base = base_shapes.get(module)
        if base is None:
            problems.append(f"{module}: the base model has no such linear layer")
    rank = manifest.rank if manifest is not None else None
    if a is None:
        problems.append(f"{module}: head weights for a module that has no {lora_a_name(module)}")
    else:
        if rank is None and a.dim() == 2:
            rank = int(a.shape[0])
        problems += _tensor_check(lora_a_name(module), a, (rank, base[1] if base else None), "[rank, in]")
    heads = [(retain_tensor_name(module), b_retain)] + [(forget_tensor_name(module, h), b) for h, b in b_forget.items()]
    out = base[0] if base else next((int(b.shape[0]) for _, b in heads if b is not None and b.dim() == 2), None)
    for name, b in heads:
        if b is None:
            problems.append(f"{name}: missing")
        else:
            problems += _tensor_check(name, b, (out, rank), "[out, rank]")
    return problems


def _tensor_check(name: str, tensor: torch.Tensor, expected: tuple[int | None, ...], layout: str) -> list[str]:
    """dtype, shape (None: any size) and values of one tensor, each reported on its own."""
    problems = []
    if tensor.dim() != len(expected):
        problems.append(f"{name}: must be {len(expected)}-D {layout}, got shape {tuple(tensor.shape)}")
    elif any(e is not None and e != s for e, s in zip(expected, tensor.shape)):
        wanted = ", ".join("?" if e is None else str(e) for e in expected)
        problems.append(f"{name}: shape {tuple(tensor.shape)}, expected ({wanted}) {layout}")
    return _dtype_and_value_problems(name, tensor) + problems


def _dtype_and_value_problems(name: str, tensor: torch.Tensor) -> list[str]:
    if tensor.dtype not in _ALLOWED_DTYPES:
        return [f"{name}: dtype {tensor.dtype} not allowed (float32, float16, bfloat16)"]
    if tensor.numel() == 0:
        return []
    peak = peak_abs(tensor)
    if not math.isfinite(peak):
        return [f"{name}: contains NaN or Inf"]
    if peak > MAX_WEIGHT_MAGNITUDE:
        return [f"{name}: |value| reaches {peak:.4g}, above the {MAX_WEIGHT_MAGNITUDE:g} every adapter value "
                "must stay within (trained weights are O(1); this file is corrupted or not an adapter)"]
    return []


def _router_problems(router: dict[str, torch.Tensor], manifest: Manifest | None) -> list[str]:
    """Router tensors: the names and shapes the manifest's router kind reads (train.router), at
    least 1-D, finite and bounded. entropy_softmax: "weight" [1 + D, hidden + 2] (null slot + D
    forget heads; features = hidden state, entropy, bias), and params q and threshold."""
    problems: list[str] = []
    kind = manifest.router.kind if manifest is not None else None
    known = ROUTER_TENSORS.get(kind, {}) if kind is not None else None
    for name, tensor in sorted(router.items()):
        label = router_tensor_name(name)
        if not is_valid_router_name(name):
            problems.append(f"{label!r}: name must match {ROUTER_NAME_PATTERN}")
        elif known is not None and name not in known:
            problems.append(f"{label}: router kind {kind!r} has no tensor {name!r} (it stores {sorted(known)})")
        if tensor.dim() < 1:
            problems.append(f"{label}: must be at least 1-D, got a 0-d scalar")
        elif known is not None and name in known and tensor.dim() != known[name]:
            problems.append(f"{label}: must be {known[name]}-D, got shape {tuple(tensor.shape)}")
        elif kind == "entropy_softmax" and name == "weight":
            rows = 1 + len(manifest.heads.forget)
            if tensor.shape[0] != rows or tensor.shape[1] < 3:
                problems.append(f"{label}: shape {tuple(tensor.shape)}, expected ({rows}, hidden + 2) "
                                "[null slot + one row per forget head, features]")
        problems += _dtype_and_value_problems(label, tensor)
    if kind == "entropy_softmax" and "weight" in router:
        missing = [p for p in ("q", "threshold") if p not in manifest.router.params]
        if missing:
            problems.append(f"router.params: {missing} missing; the entropy_softmax router needs q and threshold")
    return problems
