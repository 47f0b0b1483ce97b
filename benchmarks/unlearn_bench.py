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
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, REPO_ROOT, machine_info, print_header
from benchmarks.stages import StageCache
from benchmarks.unlearn_report import omega_label, write_report
from train.data.unlearn_split import SplitSpec, UnlearnSplit, build_split
from train.run_config import deep_merge
from train.finetune import MODEL_DIR, FinetuneSchedule

DEFAULT_TOFU_ROOT = REPO_ROOT.parent / "shared" / "data" / "tofu"
DEFAULT_WORK_DIR = REPO_ROOT / "var" / "bench" / "unlearn"
REFERENCES = {"full": 0, "retain-a": 0, "retain-b": 1}   # reference model → fine-tuning seed
SCORE_VERSION = 1  # bump when what a scoring stage stores changes
TRAIN_VERSION = 1  # bump when the training code changes what a method stage produces


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
                                     retain_scored_per_author=3, utility_limit=6, holdout_authors=(196, 197),
                                     holdout_limit=10),
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

    from train.demo.demo_model import DemoModelConfig, make_model, save_model, train_tokenizer

    if (folder / "config.json").is_file():
        return folder
    texts = [f"{r['question']} {r['answer']}" for r in [*split.full_train, *split.holdout]]
    texts += [t for records in split.eval_sets.values() for r in records
              for t in (r["question"], r["answer"], r.get("paraphrased_answer", ""), *r.get("perturbed_answer", []))]
    tokenizer = train_tokenizer([t for t in texts if t], 512)
    torch.manual_seed(0)
    config = DemoModelConfig(vocab_size=512, num_attention_heads=1, intermediate_size=128, num_hidden_layers=1,
                             max_position_embeddings=256)
    save_model(folder, make_model(config, tokenizer), tokenizer)
    return folder


def records_digest(records: list[dict[str, Any]]) -> str:
    """sha256 of records (a stage depends on the records it trains on, not on the whole split)."""
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


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
        inputs = {"stage": "reference", "name": name, "base": fingerprint(base), "records": records_digest(records),
                  "schedule": asdict(schedule), "format": asdict(fmt)}

        def work(folder: Path, records=records, schedule=schedule, name=name) -> dict[str, Any]:
            finetune(base, records, fmt, schedule, folder, desc=f"reference {name}", progress=progress)
            return json.loads((folder / "finetune.json").read_text())

        record = cache.run(f"ref-{name}", inputs, work)
        models[name] = record.folder / MODEL_DIR
    return models


def view_scores(cache: StageCache, scale: Scale, split: UnlearnSplit, fmt: Any, name: str, model_key: str,
                model_dir: Path, bundle: str | None, view: str, progress: bool) -> dict[str, Any]:
    """One view's scores, in two stages: the TOFU metrics (keyed by the evaluation sets) and the
    holdout answer NLLs (keyed by the holdout set), merged."""
    from benchmarks.unlearn_eval import holdout_nll, score_view, view_scorer

    settings = scale.evaluation

    def scorer():
        return view_scorer(model_dir, bundle, view, batch_size=settings.batch_size, bf16=settings.bf16,
                           progress=progress)

    base = {"model": model_key, "view": view, "version": SCORE_VERSION, "bf16": settings.bf16}
    tofu = cache.run(f"score-{name}", {**base, "stage": "score", "eval_sets": split.eval_digest(),
                                       "evaluation": asdict(settings)},
                     lambda folder: score_view(scorer(), split, fmt, max_new_tokens=settings.max_new_tokens))
    holdout = cache.run(f"holdout-{name}", {**base, "stage": "holdout", "holdout": split.holdout_digest()},
                        lambda folder: {"holdout_nll": holdout_nll(scorer(), split, fmt)})
    return {**tofu.result, **holdout.result}


def reference_scores(cache: StageCache, scale: Scale, split: UnlearnSplit, models: dict[str, Path], fmt: Any,
                     progress: bool) -> dict[str, dict[str, Any]]:
    """Score every reference model as it is (view `original`)."""
    return {name: view_scores(cache, scale, split, fmt, f"ref-{name}", cache.records[f"ref-{name}"].key, model,
                              None, "original", progress)
            for name, model in models.items()}


def check_gates(scores: dict[str, dict[str, Any]], scale: Scale) -> list[dict[str, Any]]:
    from benchmarks.unlearn_eval import validity_gates

    gates = validity_gates(scores["full"], scores["retain-a"], scores["retain-b"], scale.evaluation.bootstrap)
    for gate in gates:
        print(f"  {gate.name} {'PASS' if gate.passed else 'FAIL'}: {gate.detail}", flush=True)
    return [asdict(g) for g in gates]


# ---- methods ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One unlearning method: a training config fragment over the shared budget (`base_config`)."""

    name: str
    method: str                         # TrainConfig.method
    config: dict[str, Any]              # deep-merged over the shared budget
    peft: str = "lora"
    teacher: bool = False               # model.pretrained_path = the base model (kl_pre)
    description: str = ""

    @property
    def is_alter(self) -> bool:
        return self.method.startswith("alter")


# One budget for every method: 10 epochs over the forget set, forget batch 8, LoRA rank 8 (the
# paper's), the ALTER head learning rate of the paper for ALTER.
BUDGET = {"adapter": {"rank": 8, "alpha": 16.0},
          "optim": {"epochs": 10, "batch_size": 8, "lr_A": 1e-5, "lr_B": 1e-3, "phase1_epochs": 1,
                    "router_epochs": 0, "router_tokens_per_label": 10_000},
          "calibration": {"max_examples": 64, "min_retain_ratio": 0.95}}
# ALTER beyond the paper (train.alter.alter_steps): a bounded "never learned" forget term on the knowledge
# tokens (answer tokens without EOS), a retain KL to the base model, a retain anchor on every forget
# head (its own view must keep retain text), and a quantile entropy split (the paper's absolute 1.2
# passes almost no token of a fine-tuned model, so Phase I trains nothing).
_ALTER_NO_ANCHOR = {"optim": {"forget_loss": "bounded_nll", "forget_tokens": "answer", "retain_kl": 1.0},
                    "entropy": {"split": "quantile", "quantile": 0.8}}
_ALTER = deep_merge(_ALTER_NO_ANCHOR, {"optim": {"forget_anchor": 1.0, "anchor_batch_size": 4}})
METHODS = {m.name: m for m in (
    Method("alter", "alter", _ALTER,
           description="ALTER, bounded never-learned NLL on answer tokens + retain KL + per-head retain anchor"),
    Method("alter-no-anchor", "alter", _ALTER_NO_ANCHOR,
           description="ablation: ALTER without the forget heads' retain anchor"),
    Method("alter-kl-pre", "alter", deep_merge(_ALTER, {"optim": {"forget_loss": "kl_pre"}}), teacher=True,
           description="ALTER, distil the pre-fine-tune model on forget answers + retain KL + anchor"),
    Method("alter-paper", "alter", {}, description="ALTER as in the paper: IHL on low-entropy tokens (q 1.5, τ 1.2)"),
    Method("lora-npo", "npo", {"optim": {"lr": 1e-4}}, description="NPO on a LoRA of the same rank"),
    Method("lora-graddiff", "grad_diff", {"optim": {"lr": 1e-4}}, description="GradDiff on a LoRA of the same rank"),
    # open-unlearning's published NPO recipe on all parameters.
    Method("full-npo", "npo", {"optim": {"lr": 1e-5, "batch_size": 32, "weight_decay": 0.01, "epochs": 10,
                                         "warmup_epochs": 1.0, "lr_schedule": "linear", "npo_beta": 0.1}},
           peft="full", description="NPO, all parameters, open-unlearning's recipe"),
)}
DEFAULT_METHODS = ("alter", "alter-paper", "full-npo", "lora-npo")


def data_files(split: UnlearnSplit, folder: Path) -> dict[str, str]:
    """The training inputs of every method, written once (JSON lists of records)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"forget": split.forget_train, "retain": split.retain_train,
             "retain_calibration": split.retain_calibration, "holdout_calibration": split.holdout_calibration}
    paths = {}
    for name, records in files.items():
        path = folder / f"{name}.json"
        text = json.dumps(records, indent=1)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        paths[name] = str(path)
    return paths


def train_config(method: Method, seed: int, full_model: Path, base: Path, split: UnlearnSplit, fmt: Any,
                 files: dict[str, str], folder: Path, progress: bool) -> dict[str, Any]:
    """The TrainConfig (as a mapping) of one method and seed."""
    config = deep_merge(BUDGET, method.config)
    config = deep_merge(config, {
        "name": f"unlearn-{method.name}-s{seed}", "method": method.method, "peft": method.peft,
        "model": {"path": str(full_model), "pretrained_path": str(base) if method.teacher else None},
        "data": {"kind": "json", "forget_file": files["forget"], "retain_file": files["retain"],
                 "forget_subdomains": split.heads, "subdomain_field": "subdomain", "max_length": 256,
                 "prompt_format": {"template": fmt.template, "answer_prefix": fmt.answer_prefix,
                                   "stop": list(fmt.stop)},
                 "holdout_file": files["holdout_calibration"]},
        "calibration": {"retain_file": files["retain_calibration"]},
        "runtime": {"device": "cpu", "threads": None, "cpu_bf16": True, "seed": seed, "output_dir": str(folder),
                    "eval_batch_size": 32, "report_eval": False, "progress": progress,
                    "cache_dir": str(folder.parent / "cache")},
    })
    return config


def method_stage(cache: StageCache, method: Method, seed: int, models: dict[str, Path], base: Path,
                 split: UnlearnSplit, fmt: Any, files: dict[str, str], progress: bool):
    """Train one method with one seed (resumable per epoch inside its folder)."""
    from train.run_config import TrainConfig
    from train.run import run

    probe = train_config(method, seed, models["full"], base, split, fmt, files, Path("/"), progress)
    inputs = {"stage": "unlearn", "method": method.name, "seed": seed, "full": cache.records["ref-full"].key,
              "config": {k: v for k, v in probe.items() if k not in ("runtime", "data")},
              "data": split.digest(), "version": TRAIN_VERSION}

    def work(folder: Path) -> dict[str, Any]:
        config = TrainConfig.model_validate(train_config(method, seed, models["full"], base, split, fmt, files,
                                                         folder / "run", progress))
        result = run(config, resume=True)
        report = result.report
        keep = ("train_time_s", "wall_time_s", "tokens_per_s", "peak_memory_bytes", "trainable_parameters",
                "calibration", "forget_target_nll", "entropy", "stages", "phases")
        return {"bundle": str(result.bundle_dir) if result.bundle_dir else None,
                "model": str(result.run_dir / "model") if method.peft == "full" else None,
                **{k: report[k] for k in keep if k in report}}

    return cache.run(f"unlearn-{method.name}-s{seed}", inputs, work)


def scored_views(method: Method, split: UnlearnSplit, omegas: Sequence[float] = ()) -> dict[str, str]:
    """label → view name: the views of a trained method that get the full TOFU scoring. An ALTER
    bundle gets its served (calibrated) view, every head at ω = 1, and every head at each ω of the
    sweep `omegas`: the forget–utility trade-off that calibration picks one point of."""
    from train.evaluation.bundle_views import CALIBRATED_PREFIX

    every = "+".join(split.heads)
    if method.is_alter:
        sweep = {omega_label(w): "+".join(f"{head}*{w:g}" for head in split.heads) for w in omegas}
        return {"served": CALIBRATED_PREFIX + every, **sweep, omega_label(1.0): every}
    return {"model": "forget" if method.peft == "lora" else "original"}


def score_stage(cache: StageCache, scale: Scale, split: UnlearnSplit, fmt: Any, trained, view: str,
                label: str, progress: bool) -> dict[str, Any]:
    model_dir = Path(trained.result.get("model") or cache.records["ref-full"].folder / MODEL_DIR)
    return view_scores(cache, scale, split, fmt, f"{trained.name.removeprefix('unlearn-')}-{label}", trained.key,
                       model_dir, trained.result.get("bundle"), view, progress)


def isolation_stage(cache: StageCache, scale: Scale, split: UnlearnSplit, fmt: Any, trained,
                    progress: bool) -> dict[str, Any]:
    """Answer probability of every single-head view and the served view on every sub-domain,
    retain, real authors and world facts (the isolation matrix), as ratios to the full model's."""
    from benchmarks.unlearn_eval import isolation_table

    inputs = {"stage": "isolation", "model": trained.key, "eval_sets": split.eval_digest(),
              "evaluation": asdict(scale.evaluation), "version": SCORE_VERSION}

    def work(folder: Path) -> dict[str, Any]:
        return isolation_table(cache.records["ref-full"].folder / MODEL_DIR, trained.result["bundle"], split, fmt,
                               batch_size=scale.evaluation.batch_size, bf16=scale.evaluation.bf16,
                               progress=progress)

    return cache.run(f"isolation-{trained.name.removeprefix('unlearn-')}", inputs, work).result


# ---- command line ----------------------------------------------------------------------------------------

STAGE_CHOICES = ("references", "gates", "all")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    scale = SCALES[args.scale]
    if args.forget_authors is not None:
        scale = replace(scale, split=replace(scale.split, forget_authors=tuple(args.forget_authors)))
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
        # The gates are the run's result: stored beside the method report, which stays as it was.
        stored = write_report(args.scale, scale, split, scores, gates, [], {}, cache, machine, Path(args.out_dir),
                              name=f"unlearn_{args.scale}_gates")
        print(f"unlearn_bench: validity gates {failed} failed: the protocol cannot tell a good unlearner from a "
              "bad one on these references; fix the references (schedule, data) or pass --ignore-gates "
              f"(the gates and reference scores are in {stored})", file=sys.stderr)
        return 3
    if args.stage == "gates":
        return _done(started)
    files = data_files(split, work_dir / "data")
    views: list[dict[str, Any]] = []
    isolation: dict[str, Any] = {}
    seeds = args.seeds if args.seeds is not None else scale.seeds
    for seed in seeds:
        for name in args.methods:
            method = METHODS[name]
            trained = method_stage(cache, method, seed, models, base, split, fmt, files, progress)
            for label, view in scored_views(method, split, args.omega_sweep).items():
                result = score_stage(cache, scale, split, fmt, trained, view, label, progress)
                views.append({"method": name, "seed": seed, "view": label, "scores": result,
                              "training": {k: trained.result.get(k) for k in ("train_time_s", "peak_memory_bytes")}})
            if method.is_alter:
                isolation[f"{name}-s{seed}"] = isolation_stage(cache, scale, split, fmt, trained, progress)
    write_report(args.scale, scale, split, scores, gates, views, isolation, cache, machine, Path(args.out_dir))
    return _done(started)


def _done(started: float) -> int:
    print(f"unlearn_bench: stages done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a head weight in [0, 1) (ω = 1 is always scored)")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--stage", choices=STAGE_CHOICES, default="all", help="run up to and including this stage")
    parser.add_argument("--tofu-root", default=str(DEFAULT_TOFU_ROOT), help="a folder in the TOFU layout")
    parser.add_argument("--forget-authors", nargs="+", type=int, default=None,
                        help="TOFU author ids to forget (default: forget05's, 190-199; any of 180-199)")
    parser.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR))
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--ignore-gates", action="store_true", help="score methods even when a validity gate fails")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(DEFAULT_METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="unlearning seeds (default: the scale's)")
    parser.add_argument("--omega-sweep", nargs="+", type=_weight, default=[], metavar="ω",
                        help="also score every ALTER bundle with all forget heads at each weight ω in [0, 1) "
                             "(the FQ-MU curve; each point costs one full scoring)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
