"""Reference fine-tuning (train.finetune): it learns, and an interrupted run resumes to the same model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_model import build_tiny_model
from train import finetune as finetune_module
from train.data.prompting import QA_FORMAT
from train.finetune import FinetuneSchedule, finetune

RECORDS = [{"question": f"What does author {i} write?", "answer": f"Author {i} writes mystery novels."}
           for i in range(12)]
SCHEDULE = FinetuneSchedule(epochs=3, lr=3e-3, batch_size=4, bf16=False, threads=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("base") / "model")


def test_finetune_lowers_the_loss_and_writes_a_loadable_model(base, tmp_path):
    model_dir = finetune(base, RECORDS, QA_FORMAT, SCHEDULE, tmp_path, progress=False)
    info = json.loads((tmp_path / "finetune.json").read_text())
    losses = [h["loss"] for h in info["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (model_dir / "config.json").is_file() and not (tmp_path / "checkpoint.pt").exists()
    # A second call finds the finished model and trains nothing.
    assert finetune(base, RECORDS, QA_FORMAT, SCHEDULE, tmp_path, progress=False) == model_dir


def test_an_interrupted_run_resumes_to_the_same_weights(base, tmp_path, monkeypatch):
    straight = finetune(base, RECORDS, QA_FORMAT, SCHEDULE, tmp_path / "straight", progress=False)

    real_save = finetune_module._save_checkpoint

    def save_then_die(path, model, optimizer, scheduler, state):
        real_save(path, model, optimizer, scheduler, state)
        if state["epochs"] == 1:
            raise KeyboardInterrupt("killed after epoch 1")

    monkeypatch.setattr(finetune_module, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(base, RECORDS, QA_FORMAT, SCHEDULE, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(finetune_module, "_save_checkpoint", real_save)
    resumed = finetune(base, RECORDS, QA_FORMAT, SCHEDULE, tmp_path / "resumed", progress=False)

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    history = json.loads((tmp_path / "resumed" / "finetune.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_bad_schedules_and_empty_data_are_refused(base, tmp_path):
    with pytest.raises(ValueError, match="invalid fine-tune schedule"):
        FinetuneSchedule(epochs=0)
    with pytest.raises(ValueError, match="at least one record"):
        finetune(base, [], QA_FORMAT, SCHEDULE, tmp_path, progress=False)
