"""`alter-train probe`: score every arm of a running A/B experiment through the live server, and
store the scores with the experiment, so its results show forget/retain quality next to traffic.

    alter-train probe --endpoint http://127.0.0.1:8000 --admin-key as-ADMIN --experiment bio-ab \\
        --tenant-key as-TENANT --data synthetic [--limit 20] [--sets forget,retain]

Steps: read the experiment's arms and the views' current versions from the admin API; for each
arm's view run the TOFU evaluation (:func:`train.evaluation.tofu_eval.evaluate_tofu`) with an
:class:`~train.evaluation.scorers.EndpointScorer` on the served model name = the view, authenticated as a
tenant that is granted every arm's view; then POST the per-arm summary (probability, ROUGE-L recall
and truth ratio of each set, and model utility when the sets allow it) to
``/admin/experiments/{name}/probes``. ``GET /admin/experiments/{name}/results`` then shows them.

What is measured is what is served: the same vLLM engine, the same composed LoRA, the same prompt
format. Each result records the view version it measured; a view whose version changes during the
probe (a hot-swap) is reported as such and not stored, since its scores would mix two versions.

The serving package never imports this module (``alter_serve`` must not import ``train``); the two
meet only over HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from train.data.prompting import PROMPT_FORMATS, QA_FORMAT, prompt_format
from train.evaluation.probe import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_SETS, ArmProbe, ProbeError, check_tenant_access,
                                    response_json, run_probe)
from train.evaluation.scorers import EndpointScorer
from train.evaluation.tofu_eval import SET_NAMES, Record


def add_probe_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``probe`` on an argparse sub-parser set (sets both ``func`` and ``run``)."""
    p = subparsers.add_parser("probe", help="score each arm of a served A/B experiment and store the scores",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_probe_arguments(p)
    p.set_defaults(func=cmd_probe, run=cmd_probe)
    return p


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default=os.environ.get("ALTER_SERVE_URL"),
                   help="server root URL (default: $ALTER_SERVE_URL)")
    p.add_argument("--admin-key", default=os.environ.get("ALTER_SERVE_ADMIN_KEY"),
                   help="admin key (default: $ALTER_SERVE_ADMIN_KEY)")
    p.add_argument("--experiment", required=True, help="experiment name")
    p.add_argument("--tenant-key", default=os.environ.get("ALTER_SERVE_TENANT_KEY"),
                   help="key of a tenant granted every arm's view (default: $ALTER_SERVE_TENANT_KEY)")
    p.add_argument("--data", required=True, help="TOFU folder, synthetic-TOFU folder, or 'synthetic'")
    p.add_argument("--model-dir", default=None, help="with --data synthetic: the served model folder, to use "
                   "the data it was trained on (its data/ folder)")
    p.add_argument("--sets", default=",".join(DEFAULT_SETS), help=f"comma-separated sets of {list(SET_NAMES)}")
    p.add_argument("--forget-split", default="forget10", help="TOFU forget split")
    p.add_argument("--forget", action="append", default=None, help="synthetic data: forget sub-domain (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N records of each set")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="generation length for ROUGE")
    p.add_argument("--prompt-format", choices=list(PROMPT_FORMATS), default=QA_FORMAT.name,
                   help="the text format the served model was fine-tuned on (train.data.prompting)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight per view")
    p.add_argument("--out", type=Path, default=None, help="also write the stored results as JSON here")


def _load_sets(args: argparse.Namespace) -> dict[str, list[Record]]:
    from train.evaluation.eval_sets import load_eval_sets

    wanted = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SET_NAMES))
    if unknown or not wanted:
        raise ProbeError(f"--sets {args.sets!r}: use names from {list(SET_NAMES)}")
    sets, _ = load_eval_sets(args.data, args.model_dir, args.forget_split, args.forget, args.limit)
    missing = sorted(set(wanted) - set(sets))
    if missing:
        raise ProbeError(f"--data {args.data} has no set(s) {missing}; it has {sorted(sets)}")
    return {name: sets[name] for name in wanted}


def _table(results: Sequence[ArmProbe]) -> str:
    names = list(dict.fromkeys(k for r in results for k in r.metrics))
    rows = [["arm", "view", "version", *names]]
    for r in results:
        values = ["—" if r.metrics[k] is None else f"{r.metrics[k]:.4f}" for k in names]
        rows.append([r.arm, r.view, (r.view_version or "base")[:12], *values])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def cmd_probe(args: argparse.Namespace) -> int:
    """Run the probe the arguments describe; print the per-arm table; 0 on success, 1 on failure."""
    missing = [flag for flag, value in (("--endpoint", args.endpoint), ("--admin-key", args.admin_key),
                                        ("--tenant-key", args.tenant_key)) if not value]
    if missing:
        print(f"alter-train probe: error: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 1:
        print("alter-train probe: error: --limit must be >= 1", file=sys.stderr)
        return 2
    source = (f"alter-train probe: data={args.data} sets={args.sets} limit={args.limit} "
              f"max_new_tokens={args.max_new_tokens} prompt_format={args.prompt_format}")
    try:
        sets = _load_sets(args)
        with httpx.Client(base_url=args.endpoint.rstrip("/"), timeout=60.0,
                          headers={"Authorization": f"Bearer {args.admin_key}"}) as admin:
            arms = response_json(admin.get(f"/admin/experiments/{args.experiment}"),
                            f"reading experiment {args.experiment!r}")["arms"]
            check_tenant_access(args.endpoint, args.tenant_key, [a["view"] for a in arms])
            results = run_probe(
                admin, args.experiment, sets,
                lambda view: EndpointScorer(args.endpoint, view, api_key=args.tenant_key,
                                            concurrency=args.concurrency, progress=False),
                max_new_tokens=args.max_new_tokens, prompt_format=prompt_format(args.prompt_format), source=source)
    except (ProbeError, httpx.HTTPError) as exc:
        print(f"alter-train probe: error: {exc}", file=sys.stderr)
        return 1
    print(_table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([r.payload() for r in results], indent=2))
    return 0
