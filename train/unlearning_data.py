"""The forget and retain records of a training run, with the forget set grouped by head.

Heads are named by sub-domain: the records' `subdomain_field` when the data carry one, or
"cluster-c" from k-means (`train.subdomains`) when they do not. Head names must be valid
bundle head names (`[a-z0-9][a-z0-9_-]{0,62}`), because they become the bundle's forget heads.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from alter_serve.core.names import HEAD_NAME_PATTERN, is_valid_head_name
from train.data.synthetic import SyntheticTofu, records_digest

from train.run_config import DataSection
from train.subdomains import cluster_head_names, kmeans

Record = dict


@dataclass
class UnlearningData:
    forget: dict[str, list[Record]]  # head name → that sub-domain's forget records
    retain: list[Record]
    digest: str                      # sha256 of the forget + retain records

    @property
    def heads(self) -> list[str]:
        return list(self.forget)

    @property
    def all_forget(self) -> list[Record]:
        return [r for records in self.forget.values() for r in records]


def read_records(path: str | Path) -> list[Record]:
    """A TOFU-format file: a JSON list of records, or JSON lines (each a record or a list of them)."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
        return list(data) if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        records: list[Record] = []
        for line in text.splitlines():
            if line.strip():
                item = json.loads(line)
                records += item if isinstance(item, list) else [item]
        return records


def load_split(config: DataSection, model_dir: Path, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(forget records, retain records) as the config describes them."""
    if config.kind == "synthetic":
        dataset = SyntheticTofu.load(Path(config.path) if config.path else model_dir / "data")
        forget, retain = dataset.split(config.forget_subdomains)
    else:
        forget, retain = read_records(config.forget_file), read_records(config.retain_file)
        if config.forget_subdomains and config.subdomain_field:
            forget = select_subdomains(forget, config.subdomain_field, config.forget_subdomains, config.forget_file)
    if config.max_retain is not None and len(retain) > config.max_retain:
        retain = random.Random(seed).sample(retain, config.max_retain)
    if not forget or not retain:
        raise ValueError(f"need non-empty forget and retain sets, got {len(forget)} forget and {len(retain)} retain records")
    return forget, retain


def select_subdomains(forget: Sequence[Record], field: str, names: Sequence[str],
                      source: str | None = None) -> list[Record]:
    """The records whose `field` is one of `names`; refuses a name no record carries (a typo would
    otherwise just train one head fewer)."""
    known = sorted({str(r[field]) for r in forget if field in r})
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"data.forget_subdomains {unknown} match no record's {field!r} in "
                         f"{source or 'the forget file'}; the sub-domains there are {known}")
    chosen = set(names)
    return [r for r in forget if str(r.get(field)) in chosen]


def group_by_field(forget: Sequence[Record], field: str, order: Sequence[str] = ()) -> dict[str, list[Record]]:
    """Group forget records by `record[field]`; heads in `order` first, then by first appearance."""
    groups: dict[str, list[Record]] = {name: [] for name in order}
    for record in forget:
        if field not in record:
            raise ValueError(f"forget record has no {field!r} field; set data.subdomain_field: null and "
                             "data.num_subdomains for k-means sub-domains")
        groups.setdefault(str(record[field]), []).append(record)
    bad = [name for name in groups if not is_valid_head_name(name)]
    if bad:
        raise ValueError(f"sub-domain names {bad} cannot name forget heads; they must match {HEAD_NAME_PATTERN}")
    return {name: records for name, records in groups.items() if records}


def group_by_kmeans(forget: Sequence[Record], embeddings: torch.Tensor, k: int, seed: int = 0) -> dict[str, list[Record]]:
    """Group forget records into k k-means clusters of their embeddings (heads "cluster-c")."""
    assign = kmeans(embeddings, k, seed)
    names = cluster_head_names(k)
    return {names[c]: [r for r, a in zip(forget, assign.tolist()) if a == c] for c in range(k)}


def load_unlearning_data(config: DataSection, model_dir: Path, seed: int = 0,
                         embed: Callable[[Sequence[Record]], torch.Tensor] | None = None) -> UnlearningData:
    """Read, split and group the data. `embed` (records → [N, d]) is needed only for k-means."""
    forget, retain = load_split(config, model_dir, seed)
    if config.subdomain_field is not None:
        groups = group_by_field(forget, config.subdomain_field, config.forget_subdomains)
    else:
        if embed is None:
            raise ValueError("k-means sub-domains need an embedding function")
        groups = group_by_kmeans(forget, embed(forget), config.num_subdomains, seed)
    return UnlearningData(groups, list(retain), records_digest([*forget, *retain]))
