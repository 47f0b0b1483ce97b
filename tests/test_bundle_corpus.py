"""A corpus of malformed bundles: each is refused with a clear error, and nothing is left
half-registered (no registry row, no stored folder)."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from alter_serve.core.bundle import BundleError, load_bundle
from alter_serve.core.names import MANIFEST_FILE, WEIGHTS_FILE
from alter_serve.registry import InvalidInput, Registry

from .test_registry import BASE_SHAPES, FINGERPRINT, make_bundle, store_listing, write_raw_bundle

MODULE = next(iter(BASE_SHAPES))


def _tensors(bundle) -> dict[str, torch.Tensor]:
    return bundle.to_tensors()


def wrong_shapes(folder: Path) -> str:
    bundle = make_bundle(1)
    tensors = _tensors(bundle)
    tensors[f"{MODULE}.lora_A"] = torch.zeros(8, 7)
    _write(folder, bundle, tensors)
    return "shape (8, 7)"


def nan_and_inf(folder: Path) -> str:
    bundle = make_bundle(2)
    tensors = _tensors(bundle)
    tensors[f"{MODULE}.B.retain"][0, 0] = float("nan")
    tensors[f"{MODULE}.B.forget.bio"][1, 1] = float("inf")
    _write(folder, bundle, tensors)
    return "NaN or Inf"


def pickle_renamed(folder: Path) -> str:
    bundle = make_bundle(3)
    _write(folder, bundle, _tensors(bundle))
    (folder / WEIGHTS_FILE).write_bytes(pickle.dumps({"lora_A": [1, 2, 3]}))
    return "not a valid safetensors file"


def truncated(folder: Path) -> str:
    bundle = make_bundle(4)
    _write(folder, bundle, _tensors(bundle))
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    return WEIGHTS_FILE


def other_base_model(folder: Path) -> str:
    write_raw_bundle(make_bundle(5, fingerprint="sha256:" + "0" * 64), folder)
    return "trained on base model sha256:000"


def path_traversal_head(folder: Path) -> str:
    bundle = make_bundle(6)
    tensors = {k.replace(".B.forget.cyber", ".B.forget.../../etc"): v for k, v in _tensors(bundle).items()}
    manifest = json.loads(bundle.manifest.model_dump_json())
    manifest["heads"]["forget"] = ["bio", "../../etc"]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return "must match"


def huge_header(folder: Path) -> str:
    bundle = make_bundle(7)
    _write(folder, bundle, _tensors(bundle))
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    return "exceeds"


def _valid_bundle_with_manifest_edit(folder: Path, seed: int, old: str, new: str) -> None:
    """A valid bundle whose manifest text then has `old` replaced by `new`."""
    bundle = make_bundle(seed)
    _write(folder, bundle, _tensors(bundle))
    text = (folder / MANIFEST_FILE).read_text()
    assert old in text
    (folder / MANIFEST_FILE).write_text(text.replace(old, new))


def infinite_alpha(folder: Path) -> str:
    _valid_bundle_with_manifest_edit(folder, 8, '"alpha":16.0', '"alpha":1e309')
    return "alpha: Input should be a finite number"


def huge_values(folder: Path) -> str:
    bundle = make_bundle(9)
    tensors = _tensors(bundle)
    tensors[f"{MODULE}.B.forget.bio"] = torch.full_like(tensors[f"{MODULE}.B.forget.bio"], 3e38)
    _write(folder, bundle, tensors)
    return "|value| reaches 3e+38"


def scalar_router_tensor(folder: Path) -> str:
    bundle = make_bundle(10)
    _write(folder, bundle, {**_tensors(bundle), "router.weight": torch.tensor(0.8)})
    return "router.weight: must be at least 1-D"


def duplicate_manifest_key(folder: Path) -> str:
    _valid_bundle_with_manifest_edit(folder, 11, '"rank":8', '"rank":8,"rank":8')
    return "key 'rank' appears more than once"


def increasing_calibration(folder: Path) -> str:
    bundle = make_bundle(12)
    manifest = json.loads(bundle.manifest.model_dump_json())
    manifest["calibration"] = {"min_retain_ratio": 0.9, "weights": {"1": 0.5, "2": 0.9}}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(bundle), str(folder / WEIGHTS_FILE))
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return "more forget heads never get a larger weight"


def symlinked_manifest(folder: Path) -> str:
    bundle = make_bundle(13)
    _write(folder, bundle, _tensors(bundle))
    outside = folder.parent / "elsewhere.json"
    (folder / MANIFEST_FILE).rename(outside)
    (folder / MANIFEST_FILE).symlink_to(outside)
    return "manifest.json: is a symbolic link"


def _write(folder: Path, bundle, tensors) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / MANIFEST_FILE).write_text(bundle.manifest.model_dump_json())


CORPUS = [wrong_shapes, nan_and_inf, pickle_renamed, truncated, other_base_model, path_traversal_head, huge_header,
          infinite_alpha, huge_values, scalar_router_tensor, duplicate_manifest_key, increasing_calibration,
          symlinked_manifest]


@pytest.mark.parametrize("make", CORPUS, ids=[f.__name__ for f in CORPUS])
def test_loader_refuses_with_a_clear_message(make, tmp_path):
    expected = make(tmp_path / "bundle")
    with pytest.raises(BundleError) as info:
        load_bundle(tmp_path / "bundle", BASE_SHAPES, FINGERPRINT)
    assert expected in str(info.value)
    assert info.value.problems, "every refusal lists its problems"


@pytest.mark.parametrize("make", CORPUS, ids=[f.__name__ for f in CORPUS])
def test_registry_leaves_nothing_half_registered(make, tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "data", base_fingerprint=FINGERPRINT,
                        base_shapes=BASE_SHAPES)
    registry.create_all()
    before = store_listing(tmp_path / "data")
    make(tmp_path / "bundle")
    with pytest.raises((BundleError, InvalidInput)):
        registry.store_bundle("evil", tmp_path / "bundle")
    assert registry.list_bundles() == []
    assert store_listing(tmp_path / "data") == before
    shutil.rmtree(tmp_path / "bundle")
