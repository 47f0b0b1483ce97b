"""`alter-train run`: train ALTER or a baseline from a YAML config.

    alter-train run --config configs/demo.yaml [--resume] [--output-dir DIR] [--device cpu]

It prints the run folder and the headline numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_run_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `run` on an argparse sub-parser set."""
    run = subparsers.add_parser("run", help="train ALTER or a baseline from a YAML config")
    run.add_argument("--config", required=True, type=Path, help="YAML training config (see configs/)")
    run.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    run.add_argument("--output-dir", default=None, help="run folder (default: runs/<name>)")
    run.add_argument("--device", default=None, help="override runtime.device (auto, cpu, cuda)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from train.run_config import load_config
    from train.run import run

    runtime = {"progress": not args.no_progress}
    if args.output_dir:
        runtime["output_dir"] = args.output_dir
    if args.device:
        runtime["device"] = args.device
    result = run(load_config(args.config, {"runtime": runtime}), resume=args.resume)
    print(json.dumps({"run_dir": str(result.run_dir),
                      "bundle": str(result.bundle_dir) if result.bundle_dir else None,
                      **result.report["summary"]}, indent=2))
    return 0
