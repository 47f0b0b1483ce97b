"""Shared fixtures. The demo model is built once per session and cached under the repo's var/."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODELS = REPO_ROOT / "var" / "models"


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo base model folder; the first run trains it (~1-2 min), later runs reuse the cache."""
    from train.demo_model import build_demo_model

    return build_demo_model(out_root=DEMO_MODELS, progress=False)


@pytest.fixture(scope="session")
def demo_bundle_dir(demo_model_dir) -> Path:
    """The demo ALTER bundle (configs/demo.yaml on the demo model; cached under var/bundles by input hash)."""
    from train.demo_bundle import build_demo_bundle

    return build_demo_bundle(demo_model_dir, progress=False)
