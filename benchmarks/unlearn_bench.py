"""Unlearning benchmark on a real pretrained model: do ALTER's served views pass TOFU?

    python -m benchmarks.unlearn_bench                     # every stage, resuming what is cached
    python -m benchmarks.unlearn_bench --stage references  # only the reference models
    python -m benchmarks.unlearn_bench --scale smoke       # a tiny model, minutes (what CI runs)
    make bench-unlearn

Protocol (the data split is `train.data.unlearn_split`):

1. Base model: SmolLM2-135M-Instruct (`alter-train import-smollm2`), prompted with its own chat
   template (`train.data.prompting.chat_prompt_format`), exactly as a served chat request is.
2. Reference models, fine-tuned on one fixed schedule (`train.finetune`): `full` on the retain and
   forget authors, `retain-a` on the retain authors only, and `retain-b`, the same with another
   seed: the noise floor, what a perfect unlearner would look like against retain-a.
3. Validity gates, on the references, before any method is scored (printed, stored, and the run
   stops loudly when one fails, `--ignore-gates` to go on anyway):
   G1 full-model forget ROUGE-L ≥ 0.8 (it knows what it must forget);
   G2 FQ(full vs retain-a) ≤ 1e-4 (the test sees that knowledge);
   G3 FQ(retain-b vs retain-a) ≥ 0.2 (a perfect unlearner can pass);
   G4 MU(retain-a) / MU(full) in [0.95, 1.05], and every MU term of full ≥ 0.1;
   G5 KS p-value of forget-vs-holdout answer NLL ≪ 0.05 under full (≤ 1e-3), ≥ 0.05 under retain-a.
4. Methods (one budget), then every view they serve is scored: FQ with the KS statistic D and a
   bootstrap CI, MU and its nine terms, forget ROUGE-L, forget-answer probability against
   retain-a's, and a privacy-leak figure from forget-vs-holdout answer NLL.

Every step is a stage cached by content hash under --work-dir (`benchmarks.stages`), so a killed
run resumes where it stopped, and a fresh machine rebuilds what is missing. Each stage's measured
time and the CPU kind are in the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, REPO_ROOT, machine_info, print_header
from benchmarks.stages import StageCache
from train.data.unlearn_split import SplitSpec, UnlearnSplit, build_split
from train.finetune import FinetuneSchedule

DEFAULT_TOFU_ROOT = REPO_ROOT.parent / "shared" / "data" / "tofu"
DEFAULT_WORK_DIR = REPO_ROOT / "var" / "bench" / "unlearn"
REFERENCES = {"full": 0, "retain-a": 0, "retain-b": 1}   # reference model → fine-tuning seed
SCORE_VERSION = 1  # bump when what a scoring stage stores changes


@dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int = 80      # greedy answer length for ROUGE-L (TOFU answers: ~55 tokens)
    batch_size: int = 32
    bf16: bool = True             # bf16 autocast while scoring (3× faster on these CPUs)
    bootstrap: int = 1000         # resamples for the forget-quality CI


@dataclass(frozen=True)
class Scale:
    model: str                    # "smollm2" or "tiny" (a small Llama built for tests)
    split: SplitSpec
    finetune: FinetuneSchedule
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    seeds: tuple[int, ...] = (0, 1, 2)


SCALES = {
    "cpu": Scale("smollm2", SplitSpec(), FinetuneSchedule()),
    # CI: a 2-layer Llama with a chat template, 3 retain + 2 forget authors; checks the pipeline, not numbers.
    "smoke": Scale("tiny", SplitSpec(retain_authors=(0, 1, 2), forget_authors=(198, 199), authors_per_head=1,
                                     retain_scored_per_author=3, utility_limit=6, holdout_limit=20),
                   FinetuneSchedule(epochs=2, lr=1e-3, batch_size=16),
                   EvalSettings(max_new_tokens=16, batch_size=16, bf16=False, bootstrap=50), seeds=(0,)),
}


def base_model_dir(scale: Scale, split: UnlearnSplit, work_dir: Path) -> Path:
    """The pretrained model the references are fine-tuned from (built on first use)."""
    if scale.model == "smollm2":
        from train.import_gguf import import_smollm2

        return import_smollm2()
    return _tiny_base(split, work_dir / "tiny-base")


def _tiny_base(split: UnlearnSplit, folder: Path) -> Path:
    """The smoke scale's "pretrained" model: a random 1-layer Llama (head_dim 64) with a byte-level
    BPE tokenizer of the split's texts and the `qa` chat template. It checks the pipeline only."""
    import torch

    from train.demo_model import DemoModelConfig, _save_model, make_model, train_tokenizer

    if (folder / "config.json").is_file():
        return folder
    texts = [f"{r['question']} {r['answer']}" for r in [*split.full_train, *split.holdout]]
    texts += [t for records in split.eval_sets.values() for r in records
              for t in (r["question"], r["answer"], r.get("paraphrased_answer", ""), *r.get("perturbed_answer", []))]
    tokenizer = train_tokenizer([t for t in texts if t], 512)
    torch.manual_seed(0)
    config = DemoModelConfig(vocab_size=512, num_attention_heads=1, intermediate_size=128, num_hidden_layers=1,
                             max_position_embeddings=256)
    _save_model(folder, make_model(config, tokenizer), tokenizer)
    return folder


def prompt_format_of(model_dir: Path):
    from transformers import AutoTokenizer

    from train.data.prompting import chat_prompt_format

    return chat_prompt_format(AutoTokenizer.from_pretrained(model_dir))


# ---- stages ---------------------------------------------------------------------------------------------


def reference_stages(cache: StageCache, scale: Scale, split: UnlearnSplit, base: Path,
                     progress: bool) -> dict[str, Path]:
    """Fine-tune full, retain-a and retain-b (each its own stage, resumable per epoch)."""
    from alter_serve.core.fingerprint import fingerprint
    from train.finetune import finetune

    fmt = prompt_format_of(base)
    models = {}
    for name, seed in REFERENCES.items():
        records = split.full_train if name == "full" else split.retain_train
        schedule = replace(scale.finetune, seed=seed)
        inputs = {"stage": "reference", "name": name, "base": fingerprint(base), "split": split.digest(),
                  "records": "full" if name == "full" else "retain", "schedule": asdict(schedule),
                  "format": asdict(fmt)}

        def work(folder: Path, records=records, schedule=schedule, name=name) -> dict[str, Any]:
            model = finetune(base, records, fmt, schedule, folder, desc=f"reference {name}", progress=progress)
            info = json.loads((folder / "finetune.json").read_text())
            return {"model": str(model), **info}

        record = cache.run(f"ref-{name}", inputs, work)
        models[name] = Path(record.result["model"])
    return models


def reference_scores(cache: StageCache, scale: Scale, split: UnlearnSplit, models: dict[str, Path], fmt: Any,
                     progress: bool) -> dict[str, dict[str, Any]]:
    """Score every reference model as it is (view `original`), one stage each."""
    from benchmarks.unlearn_eval import score_view

    scores = {}
    for name, model in models.items():
        inputs = {"stage": "score", "model": cache.records[f"ref-{name}"].key, "view": "original",
                  "split": split.digest(), "evaluation": asdict(scale.evaluation), "version": SCORE_VERSION}
        settings = scale.evaluation

        def work(folder: Path, model=model) -> dict[str, Any]:
            return score_view(model, None, "original", split, fmt, max_new_tokens=settings.max_new_tokens,
                              batch_size=settings.batch_size, bf16=settings.bf16, progress=progress)

        scores[name] = cache.run(f"score-ref-{name}", inputs, work).result
    return scores


def check_gates(scores: dict[str, dict[str, Any]], scale: Scale) -> list[dict[str, Any]]:
    from benchmarks.unlearn_eval import validity_gates

    gates = validity_gates(scores["full"], scores["retain-a"], scores["retain-b"], scale.evaluation.bootstrap)
    for gate in gates:
        print(f"  {gate.name} {'PASS' if gate.passed else 'FAIL'}: {gate.detail}", flush=True)
    return [asdict(g) for g in gates]


# ---- command line ----------------------------------------------------------------------------------------

STAGE_CHOICES = ("references", "gates", "all")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    scale = SCALES[args.scale]
    work_dir = Path(args.work_dir) / args.scale
    machine = machine_info()
    print_header(f"unlearn_{args.scale}", machine)
    started = time.perf_counter()
    try:
        split = build_split(args.tofu_root, scale.split)
    except (FileNotFoundError, ValueError) as error:
        print(f"unlearn_bench: {error}", file=sys.stderr)
        return 2
    cache = StageCache(work_dir / "stages", log=lambda line: print(line, flush=True))
    base = base_model_dir(scale, split, work_dir)
    progress = not args.no_progress
    try:
        fmt = prompt_format_of(base)
    except ValueError as error:
        print(f"unlearn_bench: base model {base}: {error}", file=sys.stderr)
        return 2
    models = reference_stages(cache, scale, split, base, progress)
    if args.stage == "references":
        return _done(started)
    scores = reference_scores(cache, scale, split, models, fmt, progress)
    print("validity gates:", flush=True)
    gates = check_gates(scores, scale)
    failed = [g["name"] for g in gates if not g["passed"]]
    if failed and not args.ignore_gates:
        print(f"unlearn_bench: validity gates {failed} failed: the protocol cannot tell a good unlearner from a "
              "bad one on these references; fix the references (schedule, data) or pass --ignore-gates",
              file=sys.stderr)
        return 3
    return _done(started)


def _done(started: float) -> int:
    print(f"unlearn_bench: stages done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--stage", choices=STAGE_CHOICES, default="all", help="run up to and including this stage")
    parser.add_argument("--tofu-root", default=str(DEFAULT_TOFU_ROOT), help="a folder in the TOFU layout")
    parser.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR))
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--ignore-gates", action="store_true", help="score methods even when a validity gate fails")
    parser.add_argument("--no-progress", action="store_true")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
