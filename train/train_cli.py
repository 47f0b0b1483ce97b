"""`alter-train run` and `alter-train demo-bundle`: the training subcommands of train/cli.py.

    alter-train run --config configs/demo.yaml [--resume] [--output-dir DIR] [--device cpu]
    alter-train demo-bundle [--model-dir DIR] [--config configs/demo.yaml]

`run` prints the run folder and the headline numbers; `demo-bundle` prints the bundle path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_train_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register `run` and `demo-bundle` on an argparse sub-parser set."""
    run = subparsers.add_parser("run", help="train ALTER or a baseline from a YAML config")
    run.add_argument("--config", required=True, type=Path, help="YAML training config (see configs/)")
    run.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    run.add_argument("--output-dir", default=None, help="run folder (default: runs/<name>)")
    run.add_argument("--device", default=None, help="override runtime.device (auto, cpu, cuda)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.set_defaults(func=cmd_run)

    demo = subparsers.add_parser("demo-bundle", help="train (or reuse) the demo ALTER bundle; prints its path")
    demo.add_argument("--model-dir", default=None, help="base model folder (default: build the demo model)")
    demo.add_argument("--config", default=None, type=Path, help="training config (default: configs/demo.yaml)")
    demo.add_argument("--out-root", default=None, help="cache folder (default: var/bundles)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=cmd_demo_bundle)


def cmd_run(args: argparse.Namespace) -> int:
    from train.config import load_config
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


def cmd_demo_bundle(args: argparse.Namespace) -> int:
    from train.demo.demo_bundle import build_demo_bundle

    print(build_demo_bundle(args.model_dir, args.out_root, args.config, progress=not args.no_progress))
    return 0
