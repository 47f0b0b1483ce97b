"""`alter-train eval`: TOFU metrics for a local model (optionally one view of an ALTER bundle) or
for any OpenAI-compatible endpoint, written as JSON, Markdown and PNG.

    alter-train eval --model DIR [--bundle DIR --view NAME] --data DATA --out DIR
    alter-train eval --endpoint URL --model NAME [--api-key K] --data DATA --out DIR

DATA is a TOFU folder (``retain_perturbed.json`` etc.), a synthetic-TOFU folder written by
``SyntheticTofu.save`` (``synthetic.json``), or the word ``synthetic``: the local model folder's
``data/`` (what the demo model was trained on), else the default ``train.data.synthetic.generate()``.

A view NAME (local bundle) is ``original`` (adapters off), ``retain`` (the retain head alone),
forget-head names joined by ``+`` (retain head plus those forget heads, weight 1 each; a head
written ``NAME*W`` gets weight W in [0, 1] instead, e.g. ``bio*0.5+cyber*0.5``: a point of the
forget–utility trade-off), ``calibrated:`` followed by plain names (the same heads at the bundle's calibrated weight ω(n) for
n heads, see ``train.calibration``), or ``routed`` (the paper's per-token entropy routing; needs
router weights in the bundle).
Against an endpoint, the served model name *is* the view.

The prompt format (``train.data.prompting``) is ``--prompt-format``; by default the one the bundle
was trained with (its manifest's training config), else ``qa``.

`cli.py` registers this subcommand with :func:`add_eval_parser`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from train.data.prompting import PROMPT_FORMATS, QA_FORMAT, PromptFormat, prompt_format
from train.evaluate import Record, evaluate_tofu, forget_truth_ratios, isolation_matrix
from train.eval_reports import summary_markdown, write_isolation_reports, write_reports
from train.scorers import EndpointScorer, LocalScorer, ModeContext, Scorer

TOFU_FORGET_SPLITS = ("forget01", "forget05", "forget10")
TOFU_SETS = {  # set name → file in a TOFU folder ({forget} is the chosen split)
    "forget": "{forget}_perturbed.json",
    "retain": "retain_perturbed.json",
    "real_authors": "real_authors_perturbed.json",
    "world_facts": "world_facts_perturbed.json",
}
SYNTHETIC = "synthetic"
CALIBRATED_PREFIX = "calibrated:"


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` on an ``argparse`` sub-parser set (``parser.add_subparsers()``)."""
    p = subparsers.add_parser("eval", help="TOFU metrics of a local model/view or an endpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local: HF model folder; with --endpoint: served model name")
    p.add_argument("--endpoint", help="base URL of an OpenAI-compatible server (with or without /v1)")
    p.add_argument("--api-key", help="endpoint API key (default: $OPENAI_API_KEY)")
    p.add_argument("--bundle", help="ALTER bundle folder to load into the local model")
    p.add_argument("--view", default=None,
                   help="local view: original | retain | HEAD[+HEAD...] | calibrated:HEAD[+HEAD...] | routed")
    p.add_argument("--data", required=True, help="TOFU folder, synthetic-TOFU folder, or 'synthetic'")
    p.add_argument("--forget-split", default="forget10", choices=TOFU_FORGET_SPLITS, help="TOFU forget set")
    p.add_argument("--forget", action="append", default=None,
                   help="synthetic data: forget sub-domain (repeatable; default: the first one)")
    p.add_argument("--reference", help="report.json of the retain model, for forget quality")
    p.add_argument("--isolation", help="comma-separated views (or served model names) for the "
                   "isolation matrix over the synthetic sub-domains")
    p.add_argument("--limit", type=int, default=None, help="use only the first N records of each set")
    p.add_argument("--prompt-format", choices=list(PROMPT_FORMATS), default=None,
                   help="the text format the model was fine-tuned on (default: the bundle's, else qa)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16, help="local: sequences per forward pass")
    p.add_argument("--concurrency", type=int, default=8, help="endpoint: requests in flight")
    p.add_argument("--device", default=None, help="local: torch device (default: cuda if available)")
    p.add_argument("--out", required=True, help="output folder for report.{json,md,png}")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the evaluation the arguments describe; print the summary table; return 0."""
    _check_args(args)
    sets, subdomains = load_eval_sets(args.data, args.model, args.forget_split, args.forget, args.limit)
    reference = forget_truth_ratios(json.loads(Path(args.reference).read_text())) if args.reference else None
    isolation_views = [v.strip() for v in (args.isolation or "").split(",") if v.strip()]
    # Against an endpoint the served model name is the view; locally, --view (default original).
    main_view = args.model if args.endpoint else (args.view or "original")
    fmt = resolve_prompt_format(args.prompt_format, args.bundle)
    scorers = _scorers(args, [main_view, *isolation_views])
    report = evaluate_tofu(scorers[main_view], sets, reference_forget_truth_ratios=reference,
                           max_new_tokens=args.max_new_tokens, prompt_format=fmt)
    report["source"] = {k: getattr(args, k) for k in ("model", "endpoint", "bundle", "view", "data")}
    paths = write_reports(report, args.out)
    if isolation_views:
        if not subdomains:
            raise SystemExit("--isolation needs synthetic data: TOFU has no sub-domains")
        table = isolation_matrix({v: scorers[v] for v in isolation_views}, subdomains, fmt)
        paths += write_isolation_reports(table, args.out)
    sys.stdout.write(summary_markdown(report) + "\nwrote " + ", ".join(map(str, paths)) + "\n")
    return 0


def _check_args(args: argparse.Namespace) -> None:
    if args.endpoint and (args.bundle or args.view):
        raise SystemExit("--bundle/--view are for a local model; against an endpoint, --model names the view")
    if bool(args.bundle) != bool(args.view) and not (args.view == "original" and not args.bundle):
        raise SystemExit("--bundle and --view go together (without a bundle only --view original)")
    if args.isolation and not (args.endpoint or args.bundle):
        raise SystemExit("--isolation compares views: give --bundle, or --endpoint with served view names")
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be >= 1")


def resolve_prompt_format(name: str | None, bundle_dir: str | None) -> PromptFormat:
    """`name` when given; else the format recorded in the bundle's manifest (training config
    `data.prompt_format`); else `qa`, the format of bundles made before formats were recorded."""
    if name:
        return prompt_format(name)
    if not bundle_dir:
        return QA_FORMAT
    from alter_serve.core.bundle import BundleError
    from alter_serve.core.manifest import MAX_MANIFEST_BYTES, parse_manifest
    from alter_serve.core.names import MANIFEST_FILE

    path = Path(bundle_dir) / MANIFEST_FILE
    problems: list[str] = []
    try:
        with path.open("rb") as f:
            manifest = parse_manifest(f.read(MAX_MANIFEST_BYTES + 1), problems)
    except OSError as exc:
        raise BundleError(bundle_dir, [f"{MANIFEST_FILE}: {exc}"]) from None
    if manifest is None:
        raise BundleError(bundle_dir, problems)
    spec = manifest.training.get("config", {}).get("data", {}).get("prompt_format", "qa")
    try:
        return prompt_format(spec)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = f"{MANIFEST_FILE}: training.config.data.prompt_format {spec!r}: {exc}"
        raise BundleError(bundle_dir, [problem]) from None


def _scorers(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Scorer]:
    """One scorer per name: a served model name (endpoint) or a bundle view (local model)."""
    if args.endpoint:
        return {
            n: EndpointScorer(args.endpoint, n, api_key=args.api_key, concurrency=args.concurrency)
            for n in dict.fromkeys(names)
        }
    return dict(local_view_scorers(args.model, args.bundle, names, device=args.device, batch_size=args.batch_size))


# ---------------------------------------------------------------------------------------------
# data


def load_eval_sets(
    data: str,
    model: str | None = None,
    forget_split: str = "forget10",
    forget: Sequence[str] | None = None,
    limit: int | None = None,
) -> tuple[dict[str, list[Record]], dict[str, list[Record]]]:
    """(sets for :func:`evaluate_tofu`, QA by sub-domain for :func:`isolation_matrix`).

    On synthetic data the forget set is the records of the ``forget`` sub-domains (default: the
    first one) and the retain set every other record; the isolation columns are each forget
    sub-domain plus "retain". TOFU has no sub-domains, so the second result is empty there.
    """
    root = Path(data)
    if (root / TOFU_SETS["retain"]).is_file():
        return _limit(_tofu_sets(root, forget_split), limit), {}
    dataset = _synthetic(data, model)
    names = list(forget or dataset.subdomains[:1])
    forget_records, retain_records = dataset.split(names)
    by_domain = {d: dataset.by_subdomain(d) for d in names} | {"retain": retain_records}
    return _limit({"forget": forget_records, "retain": retain_records}, limit), _limit(by_domain, limit)


def _tofu_sets(root: Path, forget_split: str) -> dict[str, list[Record]]:
    # The *_perturbed.json files are single JSON arrays (see the TOFU README's format notes).
    return {
        name: json.loads((root / pattern.format(forget=forget_split)).read_text())
        for name, pattern in TOFU_SETS.items()
    }


def _synthetic(data: str, model: str | None) -> Any:
    from train.data.synthetic import CONFIG_FILE, SyntheticTofu, generate

    if data != SYNTHETIC:
        if not (Path(data) / CONFIG_FILE).is_file():
            raise SystemExit(f"--data {data}: neither a TOFU folder (retain_perturbed.json) nor a "
                             f"synthetic-TOFU folder ({CONFIG_FILE}), nor '{SYNTHETIC}'")
        return SyntheticTofu.load(data)
    bundled = Path(model or "") / "data"
    return SyntheticTofu.load(bundled) if (bundled / CONFIG_FILE).is_file() else generate()


def _limit(sets: dict[str, list[Record]], limit: int | None) -> dict[str, list[Record]]:
    return {name: records[:limit] if limit else records for name, records in sets.items()}


# ---------------------------------------------------------------------------------------------
# local model + bundle view (the hook into train.modeling)


def local_view_scorers(
    model_dir: str,
    bundle_dir: str | None,
    views: Sequence[str],
    *,
    device: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, LocalScorer]:
    """LocalScorers for the HF model in ``model_dir``, one per view of the ALTER bundle in
    ``bundle_dir``, all sharing one copy of the model (see the module docstring for view names;
    without a bundle only ``original``, the plain model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    if bundle_dir is None:
        if set(views) != {"original"}:
            raise SystemExit(f"views {sorted(set(views) - {'original'})} need a bundle")
        return {"original": LocalScorer(model.to(dev), tokenizer, batch_size=batch_size, progress=progress)}
    alter, bundle = attach_bundle(model, model_dir, bundle_dir)
    scorers = {}
    for view in dict.fromkeys(views):
        module, mode = bundle_view(alter, bundle, view)
        scorers[view] = LocalScorer(module.to(dev), tokenizer, mode=mode, batch_size=batch_size, progress=progress)
    return scorers


def attach_bundle(model: torch.nn.Module, model_dir: str, bundle_dir: str) -> tuple[Any, Any]:
    """(AlterModel, AlterBundle): the bundle validated against the base model's module shapes
    and fingerprint (a bundle trained on another base model is refused), then injected into
    ``model`` in place by ``train.modeling.from_bundle``."""
    from alter_serve.core.bundle import load_bundle
    from alter_serve.core.fingerprint import fingerprint, module_shapes
    from train.modeling import from_bundle

    bundle = load_bundle(bundle_dir, module_shapes(model_dir), fingerprint(model_dir))
    return from_bundle(model, bundle), bundle


def bundle_view(alter: Any, bundle: Any, view: str) -> tuple[torch.nn.Module, ModeContext | None]:
    """(module to score, mode context) that makes ``alter`` behave as ``view``."""
    if view == "routed":
        return _RoutedModel(alter, bundle), None
    if view == "original":
        return alter.model, lambda: alter.mixing("off")
    heads_part = view.removeprefix(CALIBRATED_PREFIX)
    forget = {} if heads_part == "retain" else weighted_heads(view, heads_part)
    unknown = sorted(set(forget) - set(alter.forget_heads))
    if unknown:
        raise SystemExit(f"view {view!r}: no forget heads {unknown} in the bundle (heads: {alter.forget_heads})")
    if view.startswith(CALIBRATED_PREFIX):
        if any(weight != 1.0 for weight in forget.values()):
            raise SystemExit(f"view {view!r}: a calibrated view takes its weights from the bundle; "
                             "drop the *W weights or the calibrated: prefix")
        from alter_serve.core.views import View, calibrated_view

        try:
            forget = calibrated_view(View(name="calibrated", forget=forget), bundle.manifest.calibration).forget
        except ValueError as exc:
            raise SystemExit(f"view {view!r}: {exc}") from None
    return alter.model, lambda: alter.mixing("view", retain=1.0, forget=forget)


def weighted_heads(view: str, heads_part: str) -> dict[str, float]:
    """``a+b*0.5`` → {"a": 1.0, "b": 0.5}: forget heads joined by ``+``, each with an optional
    ``*W`` weight in [0, 1] (SystemExit naming the view on a bad term)."""
    forget: dict[str, float] = {}
    for term in heads_part.split("+"):
        name, star, weight_text = term.partition("*")
        try:
            weight = float(weight_text) if star else 1.0
        except ValueError:
            weight = math.nan
        if not name or not 0.0 <= weight <= 1.0 or name in forget:
            raise SystemExit(f"view {view!r}: {term!r} is not a forget head NAME or NAME*W with W in [0, 1] "
                             "(each head at most once)")
        forget[name] = weight
    return forget


class _RoutedModel(torch.nn.Module):
    """Forward-only module running the paper's routed inference (a base pass for entropy and
    hidden state, then the adapted pass with per-token head weights). It has no ``generate``:
    per-token routing needs the base pass at every step, so LocalScorer's greedy loop is used."""

    def __init__(self, alter: Any, bundle: Any) -> None:
        from train.router import EntropyRouter

        super().__init__()
        self.alter = alter
        self.router = EntropyRouter.from_bundle(bundle)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        from train.router import routed_forward

        return routed_forward(self.alter, self.router, input_ids, attention_mask)
