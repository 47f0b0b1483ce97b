"""The ALTER adapter bundle: load, save and validate (DESIGN.md §4).

A bundle is a folder:

    manifest.json        Manifest (below)
    weights.safetensors  "<module>.lora_A"            [r, in]   shared A
                         "<module>.B.retain"          [out, r]  retain head B_r
                         "<module>.B.forget.<head>"   [out, r]  forget head B_d
                         "router.<name>"              any       router tensors (finite)

Per adapted linear layer with frozen W0 and s = alpha / r:

    y = W0 x + s · (B_r + Σ_d ω_d(x) B_d) · A x

A bundle file is untrusted input. Loading never unpickles anything (safetensors only), bounds the
header before parsing it, and collects *every* problem (shapes against the base model, dtypes,
non-finite values, head names, fingerprint, format version) into one `BundleError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
RETAIN_HEAD = "retain"
HEAD_NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
_HEAD_NAME_RE = re.compile(HEAD_NAME_PATTERN + r"\Z")
_ALLOWED_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
# A safetensors header is JSON describing tensors; ours are small. Refuse absurd ones before parsing.
MAX_HEADER_BYTES = 16 << 20
MAX_MANIFEST_BYTES = 1 << 20
SUPPORTED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's LoRA kernels accept


class BundleError(ValueError):
    """A bundle failed validation. `problems` lists every issue found, not just the first."""

    def __init__(self, source: str | Path, problems: list[str]):
        self.source = str(source)
        self.problems = list(problems)
        bullet = "\n  - ".join(self.problems)
        super().__init__(f"invalid ALTER bundle {self.source}: {len(self.problems)} problem(s):\n  - {bullet}")


def is_valid_head_name(name: str) -> bool:
    return isinstance(name, str) and _HEAD_NAME_RE.match(name) is not None


class BaseModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name_or_path: str
    fingerprint: str


class Heads(BaseModel):
    model_config = ConfigDict(extra="forbid")
    retain: str = RETAIN_HEAD
    forget: list[str] = Field(default_factory=list)


class RouterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = "entropy_softmax"
    params: dict[str, Any] = Field(default_factory=dict)


class EntropySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    q: float = 1.5
    threshold: float = 1.2


class Calibration(BaseModel):
    """View calibration (train.calibration): `weights[n]` is the forget-head weight ω(n) ∈ [0, 1] for a
    view that switches n forget heads on, the largest that kept the retain calibration set's answer
    probability at or above `min_retain_ratio` × the base model's (`retain_ratio[n]` is what it kept)."""

    model_config = ConfigDict(extra="forbid")
    min_retain_ratio: float = Field(gt=0.0, le=1.0, allow_inf_nan=False)
    weights: dict[int, float]
    retain_ratio: dict[int, float] = Field(default_factory=dict)
    retain_examples: int = Field(default=0, ge=0)

    def weight_for(self, count: int) -> float:
        """ω(count); 1.0 for a view with no forget heads. Counts beyond the calibrated ones take
        the largest calibrated count's weight (more heads never get a larger weight)."""
        if count <= 0:
            return 1.0
        known = [n for n in self.weights if n <= count]
        return self.weights[max(known)] if known else 1.0


class Manifest(BaseModel):
    """manifest.json. `target_modules` are PEFT-style suffixes (e.g. "q_proj")."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    base_model: BaseModelRef
    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)
    target_modules: list[str]
    heads: Heads
    router: RouterSpec = Field(default_factory=RouterSpec)
    entropy: EntropySpec = Field(default_factory=EntropySpec)
    training: dict[str, Any] = Field(default_factory=dict)
    calibration: Calibration | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


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
        digest = hashlib.sha256()
        manifest = self.manifest.model_dump(mode="json", exclude={"created_at"})
        digest.update(json.dumps(manifest, sort_keys=True).encode())
        for name, tensor in sorted(self.to_tensors().items()):
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return digest.hexdigest()

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
        """Write manifest.json + weights.safetensors (validated first; never writes a bad bundle)."""
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
    """Every problem with an in-memory bundle, optionally checked against the base model."""
    m = bundle.manifest
    problems: list[str] = []
    if m.format_version != FORMAT_VERSION:
        problems.append(f"format_version {m.format_version} is not supported (expected {FORMAT_VERSION})")
    if m.rank not in SUPPORTED_RANKS:
        problems.append(f"rank {m.rank} is not one vLLM serves; use one of {list(SUPPORTED_RANKS)}")
    if m.heads.retain != RETAIN_HEAD:
        problems.append(f"heads.retain must be {RETAIN_HEAD!r}, got {m.heads.retain!r}")
    for head in m.heads.forget:
        if not is_valid_head_name(head):
            problems.append(f"forget head name {head!r} must match {HEAD_NAME_PATTERN}")
        if head == RETAIN_HEAD:
            problems.append(f"forget head may not be named {RETAIN_HEAD!r}")
    if len(set(m.heads.forget)) != len(m.heads.forget):
        problems.append(f"duplicate forget head names in {m.heads.forget}")
    if sorted(bundle.forget) != sorted(m.heads.forget):
        problems.append(f"weights hold forget heads {sorted(bundle.forget)} but the manifest lists {sorted(m.heads.forget)}")
    if base_fingerprint is not None and m.base_model.fingerprint != base_fingerprint:
        problems.append(
            f"bundle was trained on base model {m.base_model.fingerprint} but the served model is "
            f"{base_fingerprint}; train the bundle on this base model"
        )
    problems += _calibration_problems(m.calibration, len(m.heads.forget))
    if not bundle.lora_a:
        problems.append("no adapted modules (no '<module>.lora_A' tensors)")

    def check(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tensor.dtype not in _ALLOWED_DTYPES:
            problems.append(f"{name}: dtype {tensor.dtype} not allowed (float32, float16, bfloat16)")
            return
        if tuple(tensor.shape) != shape:
            problems.append(f"{name}: shape {tuple(tensor.shape)}, expected {shape}")
        elif not torch.isfinite(tensor).all():
            problems.append(f"{name}: contains NaN or Inf")

    for module, a in sorted(bundle.lora_a.items()):
        if not _module_matches(module, m.target_modules):
            problems.append(f"{module}: not one of target_modules {m.target_modules}")
        if base_shapes is not None and module not in base_shapes:
            problems.append(f"{module}: the base model has no such linear layer")
            continue
        if a.dim() != 2:
            problems.append(f"{module}.lora_A: must be 2-D [rank, in], got {tuple(a.shape)}")
            continue
        out_f, in_f = base_shapes[module] if base_shapes is not None else (None, a.shape[1])
        check(f"{module}.lora_A", a, (m.rank, in_f))
        heads = [("B.retain", bundle.retain)] + [(f"B.forget.{h}", bundle.forget.get(h, {})) for h in m.heads.forget]
        for label, weights in heads:
            b = weights.get(module)
            if b is None:
                problems.append(f"{module}.{label}: missing")
                continue
            if b.dim() != 2:
                problems.append(f"{module}.{label}: must be 2-D [out, rank], got {tuple(b.shape)}")
                continue
            check(f"{module}.{label}", b, (out_f if out_f is not None else b.shape[0], m.rank))
    for head, weights in [("retain", bundle.retain)] + list(bundle.forget.items()):
        for extra in sorted(set(weights) - set(bundle.lora_a)):
            problems.append(f"{extra}.B.{head}: head weight for a module that has no lora_A")
    for name, tensor in sorted(bundle.router.items()):
        if tensor.dtype not in _ALLOWED_DTYPES:
            problems.append(f"router.{name}: dtype {tensor.dtype} not allowed")
        elif not torch.isfinite(tensor).all():
            problems.append(f"router.{name}: contains NaN or Inf")
    return problems


def _read_safetensors(path: Path, problems: list[str]) -> dict[str, torch.Tensor] | None:
    """Bounded, pickle-free read of a safetensors file. Adds to `problems` and returns None on failure."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
    if len(prefix) < 8:
        problems.append(f"{path.name}: truncated ({size} bytes), not a safetensors file")
        return None
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
        problems.append(f"{path.name}: not a valid safetensors file (its header length {header_len} exceeds the "
                        f"{MAX_HEADER_BYTES}-byte limit); only safetensors weights are accepted")
        return None
    if 8 + header_len > size:
        problems.append(f"{path.name}: not a valid safetensors file (header says {header_len} bytes but the file "
                        f"has {size}); truncated or another format")
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt input
        problems.append(f"{path.name}: not a valid safetensors file ({type(exc).__name__}: {exc})")
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


def _calibration_problems(calibration: Calibration | None, n_forget: int) -> list[str]:
    if calibration is None:
        return []
    problems = []
    for count, weight in sorted(calibration.weights.items()):
        if not 1 <= count <= n_forget:
            problems.append(f"calibration.weights: head count {count} is outside 1..{n_forget} (the forget heads)")
        if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
            problems.append(f"calibration.weights[{count}]: {weight} must be within [0, 1]")
    for count, ratio in sorted(calibration.retain_ratio.items()):
        if not (math.isfinite(ratio) and ratio >= 0.0):
            problems.append(f"calibration.retain_ratio[{count}]: {ratio} must be finite and >= 0")
    return problems


def load_bundle(
    directory: str | Path,
    base_shapes: dict[str, tuple[int, int]] | None = None,
    base_fingerprint: str | None = None,
) -> AlterBundle:
    """Load and fully validate a bundle folder; raise `BundleError` listing every problem."""
    root = Path(directory)
    problems: list[str] = []
    manifest_path, weights_path = root / MANIFEST_FILE, root / WEIGHTS_FILE
    if not root.is_dir():
        raise BundleError(root, ["not a directory"])
    manifest: Manifest | None = None
    if not manifest_path.is_file():
        problems.append(f"{MANIFEST_FILE}: missing")
    elif manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        problems.append(f"{MANIFEST_FILE}: larger than {MAX_MANIFEST_BYTES} bytes")
    else:
        try:
            manifest = Manifest.model_validate_json(manifest_path.read_bytes())
        except ValidationError as exc:
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"]) or "(root)"
                problems.append(f"{MANIFEST_FILE}: {where}: {err['msg']}")
    tensors = None
    if not weights_path.is_file():
        problems.append(f"{WEIGHTS_FILE}: missing (only safetensors weights are accepted)")
    else:
        tensors = _read_safetensors(weights_path, problems)
    if manifest is None or tensors is None:
        raise BundleError(root, problems)
    lora_a, retain, forget, router = _split_tensors(tensors, problems)
    bundle = AlterBundle(manifest, lora_a, retain, forget, router)
    problems += validate_contents(bundle, base_shapes, base_fingerprint)
    if problems:
        raise BundleError(root, problems)
    return bundle
