"""The ALTER adapter bundle: load, save and validate (DESIGN.md §4).

A bundle is a folder:

    manifest.json        Manifest (below)
    weights.safetensors  "<module>.lora_A"            [r, in]   shared A
                         "<module>.B.retain"          [out, r]  retain head B_r
                         "<module>.B.forget.<head>"   [out, r]  forget head B_d
                         "router.<name>"              per router kind (entropy_softmax: "weight" [1 + D, hidden + 2])

Per adapted linear layer with frozen W0 and s = alpha / r:

    y = W0 x + s · (B_r + Σ_d ω_d(x) B_d) · A x

A bundle file is untrusted input. Loading never unpickles anything (safetensors only), never
follows a symbolic link out of the folder, reads each file once through a bounded read of the
opened file, parses the manifest strictly (exact JSON types, no duplicate keys, finite numbers
only), and checks every tensor's name, dtype, shape and values (finite, |x| ≤
MAX_WEIGHT_MAGNITUDE). Problems that do not depend on each other are all collected into one
`BundleError`: a broken manifest does not hide broken tensors, nor a bad dtype a bad shape.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, ValidationError, field_validator
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from typing_extensions import TypedDict

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
RETAIN_HEAD = "retain"
HEAD_NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
_HEAD_NAME_RE = re.compile(HEAD_NAME_PATTERN + r"\Z")
# Module paths and PEFT target names: dotted identifiers ("model.layers.0.self_attn.q_proj", "q_proj").
MODULE_NAME_PATTERN = r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*"
_MODULE_NAME_RE = re.compile(MODULE_NAME_PATTERN + r"\Z")
_ROUTER_NAME_RE = re.compile(r"[a-z0-9_]{1,64}\Z")
_ALLOWED_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
SUPPORTED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's LoRA kernels accept

# Size limits, checked before anything is parsed. A safetensors header is JSON describing tensors;
# ours are small. The weights limit is far above a 70B model's rank-64 bundle with a few heads.
MAX_HEADER_BYTES = 16 << 20
MAX_MANIFEST_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 8 << 30
MAX_JSON_DEPTH = 32

# Value limits. vLLM may serve in fp16 (max 65504) and folds s into B, so a view is only servable
# when s·|B_V| stays below that (views.compose checks the composed view). Trained A and B entries
# are O(1); anything near these bounds is a corrupted or hostile file, not a model.
FP16_MAX = 65504.0
MAX_WEIGHT_MAGNITUDE = 1e4  # every A, B and router value: |x| ≤ this
MAX_ALPHA = 4096.0
MAX_SCALE = 64.0  # s = alpha / r; PEFT's usual alpha = 2r gives s = 2


class BundleError(ValueError):
    """A bundle failed validation. `problems` lists every issue found, not just the first."""

    def __init__(self, source: str | Path, problems: list[str]):
        self.source = str(source)
        self.problems = list(problems)
        bullet = "\n  - ".join(self.problems)
        super().__init__(f"invalid ALTER bundle {self.source}: {len(self.problems)} problem(s):\n  - {bullet}")


def is_valid_head_name(name: str) -> bool:
    return isinstance(name, str) and _HEAD_NAME_RE.match(name) is not None


# ---- manifest --------------------------------------------------------------------------------------

# Every manifest model: unknown keys and non-finite floats are refused. Files are validated with
# strict=True on top (load_bundle), so "8", 8.0 and true are not a rank and "16" is not an alpha.
_MODEL_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)
_Text = Annotated[str, StringConstraints(max_length=4096, pattern=r"^[^\x00-\x1f\x7f]*$")]
_TargetName = Annotated[str, StringConstraints(max_length=200, pattern="^" + MODULE_NAME_PATTERN + "$")]
# Head counts are written as JSON object keys: canonical decimal strings only, so "1" and "01"
# (or "1.0") can never both name count 1. Negative and 0 parse so the range check can name them.
_COUNT_KEY_RE = re.compile(r"(?:0|-?[1-9][0-9]{0,8})\Z")


class BaseModelRef(BaseModel):
    model_config = _MODEL_CONFIG
    name_or_path: _Text
    fingerprint: Annotated[str, StringConstraints(max_length=200, pattern=r"^[A-Za-z0-9:._-]+$")]


class Heads(BaseModel):
    model_config = _MODEL_CONFIG
    retain: str = RETAIN_HEAD
    forget: list[str] = Field(default_factory=list)


# The Tsallis entropy parameters, bounded alike wherever a bundle stores them (entropy, router).
TsallisQ = Annotated[float, Field(gt=0.0)]
EntropyThreshold = Annotated[float, Field(ge=-1e6, le=1e6)]


class EntropySoftmaxParams(TypedDict, total=False):
    """`router.params` of kind "entropy_softmax" (train.router.EntropyRouter.spec). A plain dict
    after validation, so readers index it; q and threshold are required once router.weight exists."""

    __pydantic_config__ = _MODEL_CONFIG  # type: ignore[misc]
    features: Annotated[str, StringConstraints(max_length=200)]
    null_slot: Annotated[StrictInt, Field(ge=0, le=0)]
    q: TsallisQ
    threshold: EntropyThreshold
    tau_high: Annotated[float, Field(gt=0.0, le=100.0)]
    tau_low: Annotated[float, Field(gt=0.0, le=100.0)]


# The tensors each router kind stores, by name → number of dimensions.
ROUTER_TENSORS: dict[str, dict[str, int]] = {"entropy_softmax": {"weight": 2}}


class RouterSpec(BaseModel):
    model_config = _MODEL_CONFIG
    kind: Literal["entropy_softmax"] = "entropy_softmax"
    params: EntropySoftmaxParams = Field(default_factory=dict)  # type: ignore[arg-type]


class EntropySpec(BaseModel):
    model_config = _MODEL_CONFIG
    q: TsallisQ = 1.5
    threshold: EntropyThreshold = 1.2


class Calibration(BaseModel):
    """View calibration (train.calibration): `weights[n]` is the forget-head weight ω(n) ∈ [0, 1] for a
    view that switches n forget heads on, the largest that kept the retain calibration set's answer
    probability at or above `min_retain_ratio` × the base model's (`retain_ratio[n]` is what it kept).

    A bundle's calibration has one weight per count n = 1 … (number of forget heads), non-increasing
    in n (more heads never get a larger weight), and `retain_ratio` only for calibrated counts
    (checked in `validate_contents`, which knows the head count)."""

    model_config = _MODEL_CONFIG
    min_retain_ratio: float = Field(gt=0.0, le=1.0)
    weights: dict[int, float]
    retain_ratio: dict[int, float] = Field(default_factory=dict)
    retain_examples: int = Field(default=0, ge=0, le=1 << 53)

    @field_validator("weights", "retain_ratio", mode="before")
    @classmethod
    def _head_count_keys(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value  # pydantic reports the type
        bad = [k for k in value if isinstance(k, bool) or not isinstance(k, (int, str))
               or (isinstance(k, str) and not _COUNT_KEY_RE.match(k))]
        if bad:
            raise ValueError(f"keys {bad} are not head counts; write each count as a plain integer, e.g. \"1\"")
        return {int(k): v for k, v in value.items()}

    def weight_for(self, count: int) -> float:
        """ω(count); 1.0 for a view with no forget heads. Counts beyond the calibrated ones take
        the largest calibrated count's weight (more heads never get a larger weight)."""
        if count <= 0:
            return 1.0
        known = [n for n in self.weights if n <= count]
        return self.weights[max(known)] if known else 1.0


class Manifest(BaseModel):
    """manifest.json. `target_modules` are PEFT-style suffixes (e.g. "q_proj")."""

    model_config = _MODEL_CONFIG
    format_version: int = FORMAT_VERSION
    base_model: BaseModelRef
    rank: int = Field(gt=0)
    alpha: float = Field(gt=0.0, le=MAX_ALPHA)
    target_modules: list[_TargetName] = Field(min_length=1, max_length=256)
    heads: Heads
    router: RouterSpec = Field(default_factory=RouterSpec)
    entropy: EntropySpec = Field(default_factory=EntropySpec)
    training: dict[str, Any] = Field(default_factory=dict)
    calibration: Calibration | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @field_validator("training")
    @classmethod
    def _plain_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems: list[str] = []
        _json_value_problems(value, "training", 1, problems)
        if problems:
            raise ValueError("; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))
        return value

    @field_validator("created_at", mode="before")
    @classmethod
    def _iso_datetime(cls, value: Any) -> Any:
        if isinstance(value, datetime):
            return value
        if isinstance(value, str) and len(value) <= 64:
            try:
                return datetime.fromisoformat(value)
            except ValueError:
                pass
        raise ValueError("must be an ISO 8601 date and time, e.g. \"2026-01-31T12:00:00+00:00\"")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _json_value_problems(value: Any, where: str, depth: int, problems: list[str]) -> None:
    """What in `value` is not plain, finite JSON (free-form fields must round-trip through a file)."""
    if depth > MAX_JSON_DEPTH:
        problems.append(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels")
    elif isinstance(value, float):
        if not math.isfinite(value):
            problems.append(f"{where}: {value} is not a finite number")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _json_value_problems(item, f"{where}[{index}]", depth + 1, problems)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append(f"{where}: key {key!r} is not a string")
            _json_value_problems(item, f"{where}.{key}", depth + 1, problems)
    elif value is not None and not isinstance(value, (bool, int, str)):
        problems.append(f"{where}: a {type(value).__name__} is not a JSON value")


def parse_manifest(data: bytes, problems: list[str]) -> Manifest | None:
    """Strictly parse manifest.json bytes; add every problem to `problems` and return None on failure.

    Standard JSON only in effect: duplicate keys are refused (a parser that keeps the last one
    would validate a different manifest than another reader sees), NaN/Infinity/1e309 are refused
    by the finite-number rule, and types are exact (pydantic strict mode)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(f"{MANIFEST_FILE}: not UTF-8 text ({exc})")
        return None
    duplicates: list[str] = []

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        raw = json.loads(text, object_pairs_hook=unique_keys)
    except RecursionError:
        problems.append(f"{MANIFEST_FILE}: JSON nested too deeply")
        return None
    except ValueError as exc:  # JSONDecodeError, or an integer literal too long to convert
        problems.append(f"{MANIFEST_FILE}: not valid JSON ({exc})")
        return None
    for key in sorted(set(duplicates)):
        problems.append(f"{MANIFEST_FILE}: key {key!r} appears more than once in one object; write each key once")
    if not isinstance(raw, dict):
        problems.append(f"{MANIFEST_FILE}: must be a JSON object, got {type(raw).__name__}")
        return None
    try:
        manifest = Manifest.model_validate(raw, strict=True)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, MANIFEST_FILE))
        return None
    return None if duplicates else manifest


def _pydantic_problems(exc: ValidationError, where: str) -> list[str]:
    return [f"{where}: {'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()]


# ---- the bundle ------------------------------------------------------------------------------------


@dataclass
class AlterBundle:
    """In-memory bundle: the shared A per module, the retain head, the forget heads, the router."""

    manifest: Manifest
    lora_a: dict[str, torch.Tensor]
    retain: dict[str, torch.Tensor]
    forget: dict[str, dict[str, torch.Tensor]]
    router: dict[str, torch.Tensor] = field(default_factory=dict)

    # ---- views of the contents -------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        return sorted(self.lora_a)

    @property
    def forget_heads(self) -> list[str]:
        return list(self.manifest.heads.forget)

    def head(self, name: str) -> dict[str, torch.Tensor]:
        """The B matrices of one head by name ("retain" or a forget head)."""
        if name == self.manifest.heads.retain:
            return self.retain
        if name in self.forget:
            return self.forget[name]
        raise KeyError(f"bundle has no head {name!r}; heads: {[self.manifest.heads.retain, *self.forget_heads]}")

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for module in self.modules:
            tensors[f"{module}.lora_A"] = self.lora_a[module]
            tensors[f"{module}.B.retain"] = self.retain[module]
            for head in self.forget_heads:
                tensors[f"{module}.B.forget.{head}"] = self.forget[head][module]
        for name, tensor in self.router.items():
            tensors[f"router.{name}"] = tensor
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def content_hash(self) -> str:
        """sha256 over the manifest (minus created_at) and every tensor's name, dtype, shape, bytes."""
        return content_hash(self.manifest.model_dump(mode="json", exclude={"created_at"}), self.to_tensors())

    def replace_head(self, name: str, weights: dict[str, torch.Tensor]) -> "AlterBundle":
        """A new bundle with one head's B matrices replaced (the hot-swap). Validate before use."""
        retain = dict(self.retain)
        forget = {h: dict(m) for h, m in self.forget.items()}
        heads = self.manifest.heads.model_copy(deep=True)
        if name == heads.retain:
            retain = dict(weights)
        else:
            if name not in forget:
                heads.forget.append(name)
            forget[name] = dict(weights)
        # The calibration was measured with the old heads; a swapped head invalidates it.
        manifest = self.manifest.model_copy(update={"heads": heads, "calibration": None}, deep=True)
        return AlterBundle(manifest, dict(self.lora_a), retain, forget, dict(self.router))

    # ---- persistence ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write manifest.json + weights.safetensors (validated first; never writes a bad bundle,
        so whatever `save` writes, `load_bundle` reads back)."""
        problems = validate_contents(self)
        if problems:
            raise BundleError(directory, problems)
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        save_file(self.to_tensors(), str(root / WEIGHTS_FILE), metadata={"format": "alter-bundle"})
        (root / MANIFEST_FILE).write_text(self.manifest.model_dump_json(indent=2) + "\n")
        return root


# ---- validation -------------------------------------------------------------------------------


def _module_matches(module: str, targets: list[str]) -> bool:
    return any(module == t or module.endswith("." + t) for t in targets)


def validate_contents(
    bundle: AlterBundle,
    base_shapes: dict[str, tuple[int, int]] | None = None,
    base_fingerprint: str | None = None,
) -> list[str]:
    """Every problem with an in-memory bundle, optionally checked against the base model.

    The manifest is validated again from its current field values: code may have changed it
    after construction (pydantic does not validate assignments), and `save` must never write
    what `load_bundle` would refuse. A crash inside a check is reported as a problem."""
    problems: list[str] = []
    try:
        try:
            Manifest.model_validate(bundle.manifest.model_dump(), strict=True)
        except ValidationError as exc:
            problems += _pydantic_problems(exc, "manifest")
        problems += _manifest_problems(bundle.manifest, base_fingerprint)
        problems += _tensor_problems(bundle.lora_a, bundle.retain, bundle.forget, bundle.router,
                                     bundle.manifest, base_shapes)
    except Exception as exc:  # a check that crashed: still a refusal with a reason, never a crash
        problems.append(_unexpected(exc))
    return problems


def _unexpected(exc: Exception) -> str:
    return f"could not be validated ({type(exc).__name__}: {exc}); the bundle is malformed in a way no check names"


def _manifest_problems(m: Manifest, base_fingerprint: str | None) -> list[str]:
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
    problems += _calibration_problems(m.calibration, len(m.heads.forget))
    return problems


_RATIO_ROUNDING = 1e-6  # train.calibration writes retain ratios rounded to 6 decimals


def _calibration_problems(calibration: Calibration | None, n_forget: int) -> list[str]:
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


def _tensor_problems(
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
        problems.append("no adapted modules (no '<module>.lora_A' tensors)")
    modules = set(lora_a) | set(retain) | {module for weights in forget.values() for module in weights}
    for module in sorted(modules):
        problems += _module_problems(module, lora_a.get(module), retain.get(module),
                                     {h: forget.get(h, {}).get(module) for h in heads}, manifest, base_shapes)
    for head in sorted(set(forget) - set(heads)):  # not in the manifest: reported above, values still checked
        for module, tensor in sorted(forget[head].items()):
            problems += _dtype_and_value_problems(f"{module}.B.forget.{head}", tensor)
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
    if not _MODULE_NAME_RE.match(module):
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
        problems.append(f"{module}: head weights for a module that has no {module}.lora_A")
    else:
        if rank is None and a.dim() == 2:
            rank = int(a.shape[0])
        problems += _tensor_check(f"{module}.lora_A", a, (rank, base[1] if base else None), "[rank, in]")
    heads = [("B.retain", b_retain)] + [(f"B.forget.{h}", b) for h, b in b_forget.items()]
    out = base[0] if base else next((int(b.shape[0]) for _, b in heads if b is not None and b.dim() == 2), None)
    for label, b in heads:
        if b is None:
            problems.append(f"{module}.{label}: missing")
        else:
            problems += _tensor_check(f"{module}.{label}", b, (out, rank), "[out, rank]")
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


def content_hash(config: dict, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over `config` (as sorted JSON) and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # reshape(-1): a byte view needs at least one dimension (same bytes for any shape). The
        # array's buffer is hashed in place: the same bytes as .tobytes(), without the copy.
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def float32_array(tensor: torch.Tensor) -> np.ndarray:
    """The tensor as an fp32 NumPy array: zero-copy for fp32, an exact widening for fp16 and bf16."""
    tensor = tensor.detach().to("cpu")
    if tensor.dtype == torch.float32:
        return tensor.numpy()
    if tensor.dtype == torch.bfloat16:
        # NumPy has no bfloat16. A bf16 value is the upper half of the fp32 with the same value,
        # so shifting its bits up by 16 is the exact conversion (what torch's .float() does).
        bits = tensor.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32)
    return tensor.float().numpy()


def peak_abs(tensor: torch.Tensor) -> float:
    """max |x| of a non-empty float tensor; NaN if it holds one (NaN propagates), inf for an Inf.
    In NumPy and without an |x| copy: torch's thread pool makes many small elementwise ops slow
    on busy cores (see views.compose_b)."""
    array = float32_array(tensor)
    return float(max(array.max(), -array.min()))


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
        label = f"router.{name}"
        if not _ROUTER_NAME_RE.match(name):
            problems.append(f"{label!r}: name must match [a-z0-9_]{{1,64}}")
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


# ---- reading a folder ----------------------------------------------------------------------------


def _read_regular_file(path: Path, limit: int, problems: list[str]) -> bytes | None:
    """The bytes of regular file `path`, read once from the opened file (no stat-then-read gap) and
    at most `limit` bytes. A symbolic link is refused, not followed: an admin registers a folder,
    and a link in it could point anywhere on the server (or at /dev/zero)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    name = path.name
    if not hasattr(os, "O_NOFOLLOW") and path.is_symlink():
        problems.append(f"{name}: is a symbolic link; copy the file into the bundle folder")
        return None
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: opening a FIFO must not hang; regular files ignore it
    except FileNotFoundError:
        problems.append(f"{name}: missing" + (" (only safetensors weights are accepted)" if name == WEIGHTS_FILE else ""))
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            problems.append(f"{name}: is a symbolic link; copy the file into the bundle folder")
        else:
            problems.append(f"{name}: cannot be opened ({exc.strerror})")
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"{name}: not a regular file")
            return None
        if info.st_size > limit:
            problems.append(f"{name}: {info.st_size} bytes, larger than the {limit}-byte limit")
            return None
        data = handle.read(info.st_size + 1)
    if len(data) != info.st_size:
        problems.append(f"{name}: changed while it was read; upload it again")
        return None
    return data


def read_safetensors(path: Path, problems: list[str]) -> dict[str, torch.Tensor] | None:
    """Bounded, pickle-free read of a safetensors file (a regular file, not a link). Adds to
    `problems` and returns None on failure. Tensor names and values are the caller's to check."""
    data = _read_regular_file(Path(path), MAX_WEIGHTS_BYTES, problems)
    return _parse_safetensors(data, Path(path).name, problems) if data is not None else None




def _parse_safetensors(data: bytes, name: str, problems: list[str]) -> dict[str, torch.Tensor] | None:
    """Pickle-free parse of safetensors bytes, header bounded first. None (and problems) on failure."""
    if len(data) < 8:
        problems.append(f"{name}: truncated ({len(data)} bytes), not a safetensors file")
        return None
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        problems.append(f"{name}: not a valid safetensors file (its header length {header_len} exceeds the "
                        f"{MAX_HEADER_BYTES}-byte limit); only safetensors weights are accepted")
        return None
    if 8 + header_len > len(data):
        problems.append(f"{name}: not a valid safetensors file (header says {header_len} bytes but the file "
                        f"has {len(data)}); truncated or another format")
        return None
    try:
        return load_safetensors(data)
    except Exception as exc:  # safetensors raises several types for corrupt input
        problems.append(f"{name}: not a valid safetensors file ({type(exc).__name__}: {exc})")
        return None


def _split_tensors(tensors: dict[str, torch.Tensor], problems: list[str]):
    lora_a: dict[str, torch.Tensor] = {}
    retain: dict[str, torch.Tensor] = {}
    forget: dict[str, dict[str, torch.Tensor]] = {}
    router: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith("router."):
            router[key[len("router."):]] = tensor
        elif key.endswith(".lora_A"):
            lora_a[key[: -len(".lora_A")]] = tensor
        elif key.endswith(".B.retain"):
            retain[key[: -len(".B.retain")]] = tensor
        elif ".B.forget." in key:
            module, head = key.rsplit(".B.forget.", 1)
            if not is_valid_head_name(head):
                problems.append(f"tensor {key!r}: head name {head!r} must match {HEAD_NAME_PATTERN}")
                continue
            forget.setdefault(head, {})[module] = tensor
        else:
            problems.append(f"tensor {key!r}: unknown name (expected <module>.lora_A, <module>.B.retain, <module>.B.forget.<head>, router.<name>)")
    return lora_a, retain, forget, router


def load_bundle(
    directory: str | Path,
    base_shapes: dict[str, tuple[int, int]] | None = None,
    base_fingerprint: str | None = None,
) -> AlterBundle:
    """Load and fully validate a bundle folder; raise `BundleError` listing every problem.

    Nothing else escapes: an exception from a parser or a check becomes a listed problem."""
    root = Path(directory)
    if not root.is_dir():
        raise BundleError(root, ["not a directory"])
    problems: list[str] = []
    try:
        bundle = _load(root, base_shapes, base_fingerprint, problems)
    except Exception as exc:
        problems.append(_unexpected(exc))
        bundle = None
    if problems or bundle is None:
        raise BundleError(root, problems or ["could not be loaded"])
    return bundle


def _load(root: Path, base_shapes: dict[str, tuple[int, int]] | None, base_fingerprint: str | None,
          problems: list[str]) -> AlterBundle | None:
    manifest_bytes = _read_regular_file(root / MANIFEST_FILE, MAX_MANIFEST_BYTES, problems)
    manifest = parse_manifest(manifest_bytes, problems) if manifest_bytes is not None else None
    tensors = read_safetensors(root / WEIGHTS_FILE, problems)
    if manifest is not None:
        problems += _manifest_problems(manifest, base_fingerprint)
    if tensors is None:
        return None
    lora_a, retain, forget, router = _split_tensors(tensors, problems)
    problems += _tensor_problems(lora_a, retain, forget, router, manifest, base_shapes)
    return AlterBundle(manifest, lora_a, retain, forget, router) if manifest is not None else None
