"""Everything `make serve` needs, built (or reused from the cache): `alter-train demo-assets`.

Writes a small JSON file naming the demo base model, the demo bundle, and one forget-set and one
retain-set question, so the server banner and the README examples can show the original view
answering a demo fact and the forgetting view not answering it.
"""

from __future__ import annotations

import json
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
