"""Base-model fingerprint: binds an adapter bundle to the exact base model it was trained on.

fingerprint = sha256( canonical config.json (minus volatile keys)
                      ‖ for each *.safetensors file, sorted: name ‖ sha256(file bytes)
                      ‖ tokenizer.json bytes, if present )

The dtype a server casts the weights to does not change it (the folder is hashed, not the
loaded tensors); any change to weights, architecture or tokenizer does.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from safetensors import safe_open

# Keys that change on re-save without changing the model.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}
_CHUNK = 1 << 22


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=32)
def _fingerprint_cached(model_dir: str, stamp: tuple) -> str:
    root = Path(model_dir)
    digest = hashlib.sha256()
    config = json.loads((root / "config.json").read_text())
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(stable, sort_keys=True).encode())
    for weights in sorted(root.glob("*.safetensors")):
        digest.update(weights.name.encode())
        digest.update(_file_sha256(weights).encode())
    tokenizer = root / "tokenizer.json"
    if tokenizer.exists():
        digest.update(_file_sha256(tokenizer).encode())
    return "sha256:" + digest.hexdigest()


def fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of a Hugging Face model folder (cached per path, size and mtime)."""
    root = Path(model_dir).resolve()
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root}: not a Hugging Face model folder (no config.json)")
    files = sorted(root.glob("*.safetensors")) + [root / "config.json", root / "tokenizer.json"]
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists())
    return _fingerprint_cached(str(root), stamp)


# Last name components of 2-D weights that are not linear projections: token and position
# embeddings, output heads, norms. A LoRA on them is a different kind of adapter (vLLM would need
# extra-vocabulary support and other shapes), so they are never adaptable modules of a bundle.
_NOT_LINEAR = {"lm_head", "embed_out", "output", "score", "classifier", "wte", "wpe", "shared"}


def is_linear_projection(module: str) -> bool:
    """Whether a base model's 2-D weight `module` (name without ".weight") is a linear projection
    a bundle may adapt: not an embedding ("*embed*", wte, wpe), output head (lm_head, embed_out,
    ...) or norm."""
    last = module.rsplit(".", 1)[-1].lower()
    return last not in _NOT_LINEAR and "embed" not in last and "norm" not in last


def module_shapes(model_dir: str | Path) -> dict[str, tuple[int, int]]:
    """`{module name: (out_features, in_features)}` for every linear projection of the base model:
    each 2-D `*.weight` except embeddings, output heads and norms (`is_linear_projection`).

    These are the modules a bundle may adapt (validation checks every bundle module against
    them). Reads only the safetensors headers, so it is cheap even for a 7B model.
    """
    shapes: dict[str, tuple[int, int]] = {}
    for weights in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                if not key.endswith(".weight"):
                    continue
                module = key[: -len(".weight")]
                shape = handle.get_slice(key).get_shape()
                if len(shape) == 2 and is_linear_projection(module):
                    shapes[module] = (int(shape[0]), int(shape[1]))
    return shapes
