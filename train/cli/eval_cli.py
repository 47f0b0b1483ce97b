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
n heads, see ``train.alter.calibration``), or ``routed`` (the paper's per-token entropy routing; needs
router weights in the bundle).
Against an endpoint, the served model name *is* the view.

The prompt format (``train.data.prompting``) is ``--prompt-format``; by default the one the bundle
was trained with (its manifest's training config), else ``qa``.

`train.cli.main` registers this subcommand with :func:`add_eval_parser`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from train.data.prompting import PROMPT_FORMATS
from train.evaluation.bundle_views import local_view_scorers, resolve_prompt_format
from train.evaluation.eval_reports import summary_markdown, write_isolation_reports, write_reports
from train.evaluation.eval_sets import TOFU_FORGET_SPLITS, load_eval_sets
from train.evaluation.scorers import EndpointScorer, Scorer
from train.evaluation.tofu_eval import evaluate_tofu, forget_truth_ratios, isolation_matrix


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



def _scorers(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Scorer]:
    """One scorer per name: a served model name (endpoint) or a bundle view (local model)."""
    if args.endpoint:
        return {
            n: EndpointScorer(args.endpoint, n, api_key=args.api_key, concurrency=args.concurrency)
            for n in dict.fromkeys(names)
        }
    return dict(local_view_scorers(args.model, args.bundle, names, device=args.device, batch_size=args.batch_size))
