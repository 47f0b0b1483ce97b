"""Random but valid ALTER bundles for any base model folder (serving tests need no training)."""

from __future__ import annotations

from pathlib import Path

import torch

from alter_serve.core.bundle import AlterBundle
from alter_serve.core.fingerprint import fingerprint, module_shapes
from alter_serve.core.manifest import BaseModelRef, Heads, Manifest


def random_bundle(model_dir: Path, heads: list[str], *, rank: int = 8, scale: float = 0.5, seed: int = 0,
                  targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj")) -> AlterBundle:
    gen = torch.Generator().manual_seed(seed)
    shapes = {m: s for m, s in module_shapes(model_dir).items() if m.rsplit(".", 1)[-1] in targets}

    def b(out: int) -> torch.Tensor:
        return torch.randn(out, rank, generator=gen) * scale

    lora_a = {m: torch.randn(rank, i, generator=gen) / i**0.5 for m, (o, i) in shapes.items()}
    retain = {m: b(o) * 0.1 for m, (o, i) in shapes.items()}
    forget = {h: {m: b(o) for m, (o, i) in shapes.items()} for h in heads}
    manifest = Manifest(base_model=BaseModelRef(name_or_path=str(model_dir), fingerprint=fingerprint(model_dir)),
                        rank=rank, alpha=float(rank), target_modules=list(targets), heads=Heads(forget=heads),
                        training={"method": "random-test-bundle"})
    return AlterBundle(manifest, lora_a, retain, forget)


def random_head_file(bundle: AlterBundle, path: Path, seed: int, scale: float = 0.5) -> Path:
    """A safetensors file of new B matrices for one head (the hot-swap upload)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {m: torch.randn(b.shape[0], b.shape[1], generator=gen) * scale for m, b in bundle.retain.items()}
    save_file(tensors, str(path))
    return path
