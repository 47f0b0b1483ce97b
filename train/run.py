"""Training runs: ALTER (Phase I + Phase II + router) or a baseline, with checkpoints and reports.

`run(config)` writes, under the run folder (`runtime.output_dir`, default `runs/<name>`):

    bundle/              the ALTER bundle (AlterBundle.save; manifest.base_model.fingerprint is the
                         fingerprint of the base model folder). LoRA baselines are exported as a
                         bundle too: shared A = lora_A, retain head 0, one forget head "forget" = lora_B,
                         so the view {forget: 1} is exactly the baseline's LoRA.
    report.json          losses, wall time, tokens/s, peak memory, trainable parameters, entropy split,
                         answer probabilities before/after (per view, routed, per sub-domain)
    loss_curve.png       loss per optimizer step, one panel per phase
    entropy_hist.png     base-model token entropies with the threshold (ALTER)
    model/               a full-parameter baseline's unlearned model (Hugging Face folder)
    checkpoint/state.pt  the state after the last finished epoch (`run(..., resume=True)` continues)

The run itself is `train.alter.alter_run.AlterRun` or `train.baselines.baseline_run.BaselineRun`, as
`method` says; what both share (loading, data order, cost accounting, checkpoints) is
`train.training_run.TrainingRun`.
"""

from __future__ import annotations

from train.alter.alter_run import AlterRun
from train.baselines.baseline_run import BaselineRun
from train.run_config import TrainConfig
from train.runtime import torch_threads
from train.training_run import RunResult


def run(config: TrainConfig, resume: bool = False) -> RunResult:
    """Train as `config` says; see the module docstring for what is written where."""
    kind = AlterRun if config.is_alter else BaselineRun
    with torch_threads(config.runtime.threads):
        return kind(config, resume).execute()
