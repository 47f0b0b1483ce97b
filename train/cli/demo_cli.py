"""`alter-train demo-model`, `demo-bundle` and `demo-assets`: the demo's base model, its ALTER bundle,
and the assets file `make serve` reads (`train.demo`).

    alter-train demo-model [--out DIR] [--seed N]
    alter-train demo-bundle [--model-dir DIR] [--config configs/demo.yaml]
    alter-train demo-assets [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.demo.demo_assets import DEFAULT_ASSETS, build_demo_assets


def add_demo_model_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `alter-train demo-model [--out DIR] [--seed N]`."""
    parser = subparsers.add_parser("demo-model", help="build (or reuse from the cache) the tiny demo base model")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="folder that holds the cached demo-<hash>/ builds (default: var/models)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data and the training (default: 0)")
    parser.set_defaults(func=cmd_demo_model)


def cmd_demo_model(args: argparse.Namespace) -> int:
    """Build or reuse the demo model; print its folder on stdout and a summary on stderr."""
    from train.demo.demo_model import INFO_FILE, build_demo_model  # torch loads only for this command

    folder = build_demo_model(out_root=args.out, seed=args.seed)
    info = json.loads((folder / INFO_FILE).read_text())
    print(f"demo model: exact match {info['exact_match']:.3f} after {info['steps']} steps, "
          f"built in {info['wall_time_s']:.0f} s", file=sys.stderr)
    print(folder)
    return 0


def add_demo_bundle_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `alter-train demo-bundle`."""
    parser = subparsers.add_parser("demo-bundle", help="train (or reuse) the demo ALTER bundle; prints its path")
    parser.add_argument("--model-dir", default=None, help="base model folder (default: build the demo model)")
    parser.add_argument("--config", default=None, type=Path, help="training config (default: configs/demo.yaml)")
    parser.add_argument("--out-root", default=None, help="cache folder (default: var/bundles)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=cmd_demo_bundle)


def cmd_demo_bundle(args: argparse.Namespace) -> int:
    from train.demo.demo_bundle import build_demo_bundle

    print(build_demo_bundle(args.model_dir, args.out_root, args.config, progress=not args.no_progress))
    return 0


def add_demo_assets_parser(subparsers) -> None:
    """Register `alter-train demo-assets [--out FILE]`."""
    parser = subparsers.add_parser("demo-assets", help="build the demo model + demo bundle for `make serve`")
    parser.add_argument("--out", type=Path, default=DEFAULT_ASSETS, help=f"assets file (default: {DEFAULT_ASSETS})")
    parser.set_defaults(func=cmd_demo_assets)


def cmd_demo_assets(args: argparse.Namespace) -> int:
    assets = build_demo_assets(args.out)
    print(json.dumps(assets, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
