"""Tensor helpers shared by bundle validation and view composition: a content hash, and exact fp32
NumPy views of float tensors (NumPy rather than torch ops: see `views.compose_b`)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch


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
