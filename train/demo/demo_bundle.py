"""The demo bundle: ALTER trained on the demo model, cached by a hash of every input.

`build_demo_bundle(model_dir)` trains `configs/demo.yaml` (two forget heads, one per forgotten
synthetic genre) on the demo model and returns the bundle folder `var/bundles/demo-<hash>/`:

    manifest.json, weights.safetensors      the bundle (load with alter_serve.core.bundle.load_bundle)
    training/report.json, *.png             the training report, loss curve and entropy histogram

The hash covers the config, the base model's fingerprint, the data digest and `CODE_VERSION`,
so a repeated call returns at once and any change retrains.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from alter_serve.core.fingerprint import fingerprint
from alter_serve.core.names import MANIFEST_FILE

from train.run_config import deep_merge, load_config

# Bump when a change to the training code changes what a build produces.
CODE_VERSION = 4
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
DEFAULT_OUT_ROOT = REPO_ROOT / "var" / "bundles"
TRAINING_DIR = "training"


def build_demo_bundle(
    model_dir: str | Path | None = None,
    out_root: str | Path | None = None,
    config_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Train (or reuse) the demo bundle for the model in `model_dir` (default: the demo model)."""
    if model_dir is None:
        from train.demo.demo_model import build_demo_model

        model_dir = build_demo_model(progress=progress)
    model_dir = Path(model_dir).resolve()
    base = {"model": {"path": str(model_dir)}, "runtime": {"progress": progress}}
    config = load_config(config_path or DEFAULT_CONFIG, deep_merge(overrides or {}, base))
    key = demo_bundle_key(config.model_dump(mode="json"), model_dir)
    root = Path(out_root or DEFAULT_OUT_ROOT)
    target = root / f"demo-{key}"
    if (target / MANIFEST_FILE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".demo-{key}-", dir=root))
    try:
        from train.run import run

        config.runtime.output_dir = str(scratch / "run")
        result = run(config)
        _assemble(result.bundle_dir, result.run_dir, scratch / "bundle")
        try:
            (scratch / "bundle").rename(target)
        except OSError:
            if not (target / MANIFEST_FILE).is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def demo_bundle_key(config_json: dict[str, Any], model_dir: Path) -> str:
    """First 16 hex digits of sha256 over config (minus paths and progress), model and data."""
    stable = json.loads(json.dumps(config_json))
    stable["model"].pop("path", None)
    stable["runtime"].pop("progress", None)
    stable["runtime"].pop("output_dir", None)
    data_info = model_dir / "data" / "synthetic.json"
    inputs = {
        "code_version": CODE_VERSION, "config": stable, "base_fingerprint": fingerprint(model_dir),
        "data": json.loads(data_info.read_text()).get("digest") if data_info.is_file() else None,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _assemble(bundle_dir: Path | None, run_dir: Path, out: Path) -> None:
    if bundle_dir is None:
        raise RuntimeError("the demo config did not produce a bundle (is its method an ALTER method?)")
    shutil.copytree(bundle_dir, out)
    (out / TRAINING_DIR).mkdir()
    for name in ("report.json", "loss_curve.png", "entropy_hist.png"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / TRAINING_DIR / name)
