"""The TOFU benchmark's "full" and "retain" models, trained from scratch with one recipe.

TOFU's protocol fine-tunes one model on every author ("full", the model to unlearn) and one on the
retain authors only ("retain", the gold standard that forget quality is measured against). With no
7B checkpoint offline, both are small Llamas trained from scratch here, with the same tokenizer,
architecture, optimiser and stopping rule (`train.demo.demo_model.train_until_memorised`):

* the tokenizer is a byte-level BPE trained on every text of the subset (training, paraphrased and
  perturbed answers), shared by both models so that their scores are comparable;
* training stops when the mean ROUGE-L recall of greedy answers on a fixed probe of the model's own
  training questions reaches `stop_rouge`, or at `max_steps`;
* the full model must reach forget-set ROUGE-L recall ≥ `min_forget_rouge` (it must know what it
  is asked to forget), or the build fails and nothing is cached.

The two models train in two processes, one thread each: at this size one thread per model beats two
threads per model on two cores (thread synchronisation costs more than it saves). Builds are cached
under ``var/models/tofu-<kind>-<hash>`` keyed by the subset's records and every setting.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import random
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from train.data.tofu_subset import TofuSubset
from train.demo.demo_model import (DEFAULT_OUT_ROOT, DemoModelConfig, DemoTrainConfig, _torch_threads, greedy_answers,
                              make_model, save_model, train_tokenizer, train_until_memorised)
from train.files import exclusive_lock, publish_folder
from train.evaluation.tofu_metrics import rouge_l_recall
from train.runtime import seed_everything

CODE_VERSION = 1
INFO_FILE = "tofu_model_info.json"
KINDS = ("full", "retain")


@dataclass(frozen=True)
class TofuModelRecipe:
    """Architecture, optimiser and stopping rule shared by the full and the retain model."""

    model: DemoModelConfig = field(default_factory=lambda: DemoModelConfig(
        vocab_size=2048, num_attention_heads=2, intermediate_size=384, num_hidden_layers=4,
        max_position_embeddings=256))
    train: DemoTrainConfig = field(default_factory=lambda: DemoTrainConfig(
        learning_rate=3e-3, warmup_steps=30, batch_size=16, max_steps=4000, eval_every=250,
        stop_accuracy=0.95, min_accuracy=0.0, max_threads=1))
    probe_size: int = 96          # training questions in the stopping probe (forget ones first)
    max_new_tokens: int = 128     # greedy answer length for the probe (TOFU answers: ≤ ~100 tokens)
    min_forget_rouge: float = 0.8
    seed: int = 0


@dataclass(frozen=True)
class ReferenceModels:
    full: Path
    retain: Path

    def info(self) -> dict[str, Any]:
        return {kind: json.loads((getattr(self, kind) / INFO_FILE).read_text()) for kind in KINDS}


def build_reference_models(subset: TofuSubset, recipe: TofuModelRecipe | None = None,
                           out_root: str | Path | None = None, progress: bool = True,
                           device: str = "cpu") -> ReferenceModels:
    """Build (or reuse) the full and retain models of `subset`; both train at once, one process each
    (on CUDA both processes share the GPU, with bf16 autocast)."""
    recipe = recipe or TofuModelRecipe()
    root = Path(out_root or DEFAULT_OUT_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    key = _cache_key(subset, recipe, device)
    targets = {kind: root / f"tofu-{kind}-{key}" for kind in KINDS}
    missing = [kind for kind in KINDS if not (targets[kind] / INFO_FILE).is_file()]
    if missing:
        with exclusive_lock(root / f".tofu-{key}.lock"):
            missing = [kind for kind in KINDS if not (targets[kind] / INFO_FILE).is_file()]
            if missing:
                _build(subset, recipe, key, {kind: targets[kind] for kind in missing}, progress, device)
    return ReferenceModels(targets["full"], targets["retain"])


def _cache_key(subset: TofuSubset, recipe: TofuModelRecipe, device: str) -> str:
    inputs = {"code_version": CODE_VERSION, "subset": subset.digest(), "recipe": asdict(recipe)}
    if device != "cpu":  # bf16 autocast on an accelerator trains a (numerically) different model
        inputs["device"] = device
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _build(subset: TofuSubset, recipe: TofuModelRecipe, key: str, targets: dict[str, Path], progress: bool,
           device: str) -> None:
    seed_everything(recipe.seed)
    tokenizer = train_tokenizer(subset.tokenizer_corpus(), recipe.model.vocab_size)
    scratch = {kind: Path(tempfile.mkdtemp(prefix=f".tofu-{kind}-{key}-", dir=target.parent))
               for kind, target in targets.items()}
    try:
        for folder in scratch.values():
            tokenizer.save_pretrained(folder / "tokenizer")
        jobs = [(kind, subset, recipe, str(scratch[kind]), key, device, progress)
                for position, kind in enumerate(targets)]
        # spawn: a forked child would inherit this process's torch thread pools and locks.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=len(jobs), mp_context=context) as pool:
            for info in pool.map(_train_one, *zip(*jobs)):
                if info["kind"] == "full" and info["forget_rouge"] < recipe.min_forget_rouge:
                    raise RuntimeError(
                        f"the full model reached forget ROUGE-L recall {info['forget_rouge']:.3f} < "
                        f"{recipe.min_forget_rouge} after {info['steps']} steps: it does not know the forget set; "
                        "raise train.max_steps or the model size in TofuModelRecipe")
        for kind, target in targets.items():
            shutil.rmtree(scratch[kind] / "tokenizer")
            publish_folder(scratch[kind], target)
    finally:
        for folder in scratch.values():
            shutil.rmtree(folder, ignore_errors=True)


def _train_one(kind: str, subset: TofuSubset, recipe: TofuModelRecipe, folder: str, key: str,
               device: str, progress: bool) -> dict[str, Any]:
    """Train one model into `folder` (runs in a worker process) and return its info record."""
    started = time.perf_counter()
    folder_path = Path(folder)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder_path / "tokenizer")
    records = subset.full_train if kind == "full" else subset.retain_model_train
    probe = _probe(subset, records, recipe, kind)
    with _torch_threads(recipe.train.max_threads) as threads:
        seed_everything(recipe.seed)
        model = make_model(recipe.model, tokenizer).to(device)

        def check(m: torch.nn.Module) -> float:
            return _mean_rouge(m, tokenizer, probe, recipe.max_new_tokens)

        result = train_until_memorised(model, tokenizer, records, recipe.train, recipe.seed, progress,
                                       check=check, desc=f"{kind} model")
        forget_rouge = _mean_rouge(model, tokenizer, subset.eval_sets["forget"], recipe.max_new_tokens)
    save_model(folder_path, model.cpu(), tokenizer)
    info = {
        "kind": kind, "cache_key": key, "code_version": CODE_VERSION, "subset": subset.summary(),
        "train_records": len(records), "steps": result.steps, "final_loss": result.loss,
        "probe_rouge": result.accuracy, "forget_rouge": forget_rouge,
        "wall_time_s": round(time.perf_counter() - started, 2), "threads": threads, "device": device,
        "n_parameters": sum(p.numel() for p in model.parameters()), "recipe": asdict(recipe),
        "history": result.history,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (folder_path / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _probe(subset: TofuSubset, records: list[dict], recipe: TofuModelRecipe, kind: str) -> list[dict]:
    """The stopping probe: the forget questions first (full model), then a fixed random sample."""
    first = list(subset.forget_train) if kind == "full" else []
    rest = [r for r in records if r not in first]
    random.Random(recipe.seed).shuffle(rest)
    return (first + rest)[: max(recipe.probe_size, len(first))]


def _mean_rouge(model: torch.nn.Module, tokenizer: Any, records: list[dict], max_new_tokens: int) -> float:
    answers = greedy_answers(model, tokenizer, [r["question"] for r in records], max_new_tokens=max_new_tokens)
    return sum(rouge_l_recall(a, r["answer"]) for a, r in zip(answers, records)) / len(records)
