"""The ALTER adapter bundle: the in-memory `AlterBundle`, loading a folder and saving one (DESIGN.md §4).

A bundle is a folder:

    manifest.json        `manifest.Manifest`
    weights.safetensors  the shared A per adapted module, one B per head, the router tensors,
                         named as `names` defines ("<module>.lora_A", "<module>.B.retain",
                         "<module>.B.forget.<head>", "router.<name>")

Per adapted linear layer with frozen W0 and s = alpha / r:

    y = W0 x + s · (B_r + Σ_d ω_d(x) B_d) · A x

A bundle file is untrusted input. `load_bundle` reads it through `safe_read` (never unpickles
anything, never follows a symbolic link out of the folder, reads each file once and bounded),
parses the manifest strictly (`manifest.parse_manifest`) and runs every check of `validation`.
Problems that do not depend on each other are all collected into one `BundleError`. `save` writes
only what `load_bundle` reads back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from .manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest, pydantic_problems
from .names import (
    HEAD_NAME_PATTERN,
    MANIFEST_FILE,
    TENSOR_NAME_FORMS,
    WEIGHTS_FILE,
    forget_tensor_name,
    is_valid_head_name,
    lora_a_name,
    parse_tensor_name,
    retain_tensor_name,
    router_tensor_name,
)
from .safe_read import read_regular_file, read_safetensors
from .tensors import content_hash
from .validation import manifest_problems, tensor_problems


class BundleError(ValueError):
    """A bundle failed validation. `problems` lists every issue found, not just the first."""

    def __init__(self, source: str | Path, problems: list[str]):
        self.source = str(source)
        self.problems = list(problems)
        bullet = "\n  - ".join(self.problems)
        super().__init__(f"invalid ALTER bundle {self.source}: {len(self.problems)} problem(s):\n  - {bullet}")


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
            tensors[lora_a_name(module)] = self.lora_a[module]
            tensors[retain_tensor_name(module)] = self.retain[module]
            for head in self.forget_heads:
                tensors[forget_tensor_name(module, head)] = self.forget[head][module]
        for name, tensor in self.router.items():
            tensors[router_tensor_name(name)] = tensor
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
            problems += pydantic_problems(exc, "manifest")
        problems += manifest_problems(bundle.manifest, base_fingerprint)
        problems += tensor_problems(bundle.lora_a, bundle.retain, bundle.forget, bundle.router,
                                    bundle.manifest, base_shapes)
    except Exception as exc:  # a check that crashed: still a refusal with a reason, never a crash
        problems.append(_unexpected(exc))
    return problems


def _unexpected(exc: Exception) -> str:
    return f"could not be validated ({type(exc).__name__}: {exc}); the bundle is malformed in a way no check names"


def _split_tensors(tensors: dict[str, torch.Tensor], problems: list[str]):
    lora_a: dict[str, torch.Tensor] = {}
    retain: dict[str, torch.Tensor] = {}
    forget: dict[str, dict[str, torch.Tensor]] = {}
    router: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        parsed = parse_tensor_name(key)
        if parsed is None:
            problems.append(f"tensor {key!r}: unknown name (expected {TENSOR_NAME_FORMS})")
        elif parsed.kind == "router":
            router[parsed.owner] = tensor
        elif parsed.kind == "lora_A":
            lora_a[parsed.owner] = tensor
        elif parsed.kind == "retain":
            retain[parsed.owner] = tensor
        elif not is_valid_head_name(parsed.head):
            problems.append(f"tensor {key!r}: head name {parsed.head!r} must match {HEAD_NAME_PATTERN}")
        else:
            forget.setdefault(parsed.head, {})[parsed.owner] = tensor
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
    manifest_bytes = read_regular_file(root / MANIFEST_FILE, MAX_MANIFEST_BYTES, problems)
    manifest = parse_manifest(manifest_bytes, problems) if manifest_bytes is not None else None
    tensors = read_safetensors(root / WEIGHTS_FILE, problems)
    if manifest is not None:
        problems += manifest_problems(manifest, base_fingerprint)
    if tensors is None:
        return None
    lora_a, retain, forget, router = _split_tensors(tensors, problems)
    problems += tensor_problems(lora_a, retain, forget, router, manifest, base_shapes)
    return AlterBundle(manifest, lora_a, retain, forget, router) if manifest is not None else None
