"""The evaluation sets of a TOFU evaluation, from a TOFU folder or from synthetic TOFU-format data.

DATA is a TOFU folder (``retain_perturbed.json`` etc.), a synthetic-TOFU folder written by
``SyntheticTofu.save`` (``synthetic.json``), or the word ``synthetic``: the local model folder's
``data/`` (what the demo model was trained on), else the default ``train.data.synthetic.generate()``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from train.evaluation.tofu_eval import Record

TOFU_FORGET_SPLITS = ("forget01", "forget05", "forget10")
TOFU_SETS = {  # set name → file in a TOFU folder ({forget} is the chosen split)
    "forget": "{forget}_perturbed.json",
    "retain": "retain_perturbed.json",
    "real_authors": "real_authors_perturbed.json",
    "world_facts": "world_facts_perturbed.json",
}
SYNTHETIC = "synthetic"


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
