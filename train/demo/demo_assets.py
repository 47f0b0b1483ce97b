"""`alter-train demo-assets`: everything `make serve` needs, built (or reused from the cache).

Writes a small JSON file naming the demo base model, the demo bundle, and one forget-set and one
retain-set question, so the server banner and the README examples can show the original view
answering a demo fact and the forgetting view not answering it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.data.prompting import format_prompt

DEFAULT_ASSETS = Path("var/demo/assets.json")


def build_demo_assets(out: Path = DEFAULT_ASSETS, progress: bool = True) -> dict:
    from alter_serve.core.bundle import load_bundle

    from train.data.synthetic import SyntheticTofu
    from train.demo.demo_bundle import build_demo_bundle
    from train.demo.demo_model import build_demo_model

    model_dir = build_demo_model(progress=progress)
    bundle_dir = build_demo_bundle(model_dir, progress=progress)
    heads = load_bundle(bundle_dir).forget_heads
    data = SyntheticTofu.load(model_dir / "data")
    forgotten, kept = data.by_subdomain(heads[0])[0], data.split(heads)[1][0]
    assets = {
        "model_dir": str(model_dir), "bundle_dir": str(bundle_dir), "forget_heads": heads,
        "example_question": forgotten["question"], "example_answer": forgotten["answer"],
        "example_prompt": format_prompt(forgotten["question"]), "example_view": f"forget-{heads[0]}",
        "retain_question": kept["question"], "retain_answer": kept["answer"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(assets, indent=2) + "\n")
    return assets


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
