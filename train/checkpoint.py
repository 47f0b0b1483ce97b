"""Per-epoch training checkpoints, for resuming an interrupted run.

One file, `<run>/checkpoint/state.pt`, rewritten atomically at the end of every epoch of every
phase. It holds only tensors and plain containers (trainable weights, optimizer state, RNG
states, the loss history) and is read back with `torch.load(weights_only=True)`, which refuses
arbitrary pickled objects. It is a private file of the run; bundles, the artefacts that travel,
are safetensors only.

Resuming reproduces the uninterrupted run (same device and library versions): the data order of
every pass is a function of (seed, stream, pass) alone (`train.training_run.TrainingRun._order`), the
cycling Phase II / baseline streams restart at the batch the interrupted run had reached, and the
RNG the steps draw their random views from is saved here at the end of each epoch. A phase
interrupted mid-epoch restarts that epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
PHASE_ORDER = ("phase1", "phase2", "router", "baseline")


def config_digest(config_json: dict) -> str:
    """Resume only into the same configuration (minus runtime knobs that do not change results)."""
    stable = {k: v for k, v in config_json.items() if k != "runtime"}
    stable["seed"] = config_json.get("runtime", {}).get("seed")
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


@dataclass
class TrainState:
    """Where a run stands: the last finished epoch per phase, and everything needed to continue."""

    config_digest: str
    done: dict[str, int] = field(default_factory=dict)       # phase → epochs finished
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)   # phase → optimizer.state_dict()
    history: dict[str, list] = field(default_factory=dict)
    meters: dict[str, dict] = field(default_factory=dict)
    python_rng: list | None = None
    torch_rng: torch.Tensor | None = None

    def epochs_done(self, phase: str) -> int:
        return self.done.get(phase, 0)

    def capture_rng(self, rng: random.Random) -> None:
        version, internal, gauss = rng.getstate()
        self.python_rng = [version, list(internal), gauss]
        self.torch_rng = torch.get_rng_state()

    def restore_rng(self, rng: random.Random) -> None:
        if self.python_rng is not None:
            version, internal, gauss = self.python_rng
            rng.setstate((version, tuple(internal), gauss))
        if self.torch_rng is not None:
            torch.set_rng_state(self.torch_rng)


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR / STATE_FILE


def save_state(run_dir: Path, state: TrainState) -> Path:
    path = checkpoint_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config_digest": state.config_digest, "done": state.done,
        "weights": {k: v.detach().cpu() for k, v in state.weights.items()},
        "optimizer": state.optimizer, "history": state.history, "meters": state.meters,
        "python_rng": state.python_rng, "torch_rng": state.torch_rng,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_state(run_dir: Path, digest: str) -> TrainState | None:
    """The saved state, or None if there is none. Refuses a checkpoint of another configuration."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload["config_digest"] != digest:
        raise ValueError(f"{path} was written by a different configuration; delete it or use another "
                         "runtime.output_dir to start afresh")
    return TrainState(**payload)


def discard_stale_state(run_dir: Path, digest: str) -> bool:
    """Delete a checkpoint written by another configuration (for callers that own `run_dir`, such
    as a benchmark whose settings changed); True if one was deleted."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        return False
    if torch.load(path, map_location="cpu", weights_only=True)["config_digest"] == digest:
        return False
    path.unlink()
    return True
