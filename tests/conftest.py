"""Shared fixtures. The demo model is built once per session and cached under the repo's var/."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODELS = REPO_ROOT / "var" / "models"


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo base model folder; the first run trains it (~1-2 min), later runs reuse the cache."""
    from train.demo.demo_model import build_demo_model

    return build_demo_model(out_root=DEMO_MODELS, progress=False)


@pytest.fixture(scope="session")
def demo_bundle_dir(demo_model_dir) -> Path:
    """The demo ALTER bundle (configs/demo.yaml on the demo model; cached under var/bundles by input hash)."""
    from train.demo.demo_bundle import build_demo_bundle

    return build_demo_bundle(demo_model_dir, progress=False)


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster on loopback for the whole session (`tests/postgres.py`).
    Fails, never skips, when PostgreSQL is not installed: `make setup` installs it."""
    from .postgres import PostgresCluster

    try:
        cluster = PostgresCluster.start()
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"cannot start the test PostgreSQL cluster: {exc}", pytrace=False)
    yield cluster
    cluster.stop()


_DATABASES = itertools.count()


@pytest.fixture(params=["sqlite", "postgres"])
def registry_url(request, tmp_path) -> str:
    """A fresh, empty registry database, once per backend: a SQLite file in tmp_path, and a new
    database in the session's PostgreSQL cluster (dropped after the test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    cluster = request.getfixturevalue("postgres")
    name = f"registry_{os.getpid()}_{next(_DATABASES)}"
    yield cluster.create_database(name)
    cluster.drop_database(name)
