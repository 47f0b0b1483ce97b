"""A TOFU author subset for from-scratch benchmarks: who is trained, who is forgotten, what is scored.

TOFU fine-tunes a 7B chat model on 200 fictitious authors. Offline, on two CPU cores, we train a
small model from scratch instead, so the benchmark takes a documented subset:

* forget authors: the last `forget_authors` of TOFU's 200, the authors of TOFU's own forget splits
  (forget01 = the last 2, forget05 = the last 10, forget10 = the last 20), so their paraphrased and
  perturbed answers (the truth-ratio material) come from ``forgetXX_perturbed.json``;
* retain authors: the first ``n_authors - forget_authors`` authors; ``retain_perturbed.json`` covers
  TOFU's first 20 authors, and its records of the chosen authors (at most those 20) are the retain
  evaluation set;
* world knowledge: ``real_authors_perturbed`` and ``world_facts_perturbed`` question/answer pairs are
  trained into *both* the full and the retain model (a from-scratch model knows no world facts), so
  that model utility measures knowledge the model has and unlearning may damage.

Training records carry an ``author`` field (``author-007``), the sub-domain that names ALTER's
forget heads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.data.tofu import AUTHOR_BLOCK, load_split

Record = dict[str, Any]

TOFU_AUTHORS = 200
# forget split → number of authors it covers (TOFU: the last 1 %, 5 %, 10 % of 200).
FORGET_SPLITS = {"forget01": 2, "forget05": 10, "forget10": 20}
RETAIN_PERTURBED_AUTHORS = 20  # retain_perturbed.json covers TOFU's first 20 authors
UTILITY_SETS = ("real_authors", "world_facts")


@dataclass(frozen=True)
class SubsetSpec:
    """`n_authors` authors, of which the last `forget_authors` (TOFU's own forget authors) are
    forgotten; `retain_eval_per_author` retain-set questions per retain author are scored, and
    `utility_limit` (None = all) questions of each utility set are trained and scored."""

    n_authors: int = 20
    forget_authors: int = 2
    retain_eval_per_author: int = 6
    utility_limit: int | None = None

    def validate(self) -> None:
        if not 1 <= self.forget_authors <= max(FORGET_SPLITS.values()):
            raise ValueError(f"forget_authors must be 1..{max(FORGET_SPLITS.values())}, got {self.forget_authors}")
        if not self.forget_authors < self.n_authors <= TOFU_AUTHORS:
            raise ValueError(f"n_authors must be more than forget_authors and at most {TOFU_AUTHORS}, "
                             f"got {self.n_authors}")
        if not 1 <= self.retain_eval_per_author <= AUTHOR_BLOCK:
            raise ValueError(f"retain_eval_per_author must be 1..{AUTHOR_BLOCK}")

    @property
    def forget_split(self) -> str:
        """The smallest TOFU forget split that holds every forget author."""
        return next(name for name, n in FORGET_SPLITS.items() if n >= self.forget_authors)


@dataclass
class TofuSubset:
    spec: SubsetSpec
    retain_train: list[Record]       # retain authors' question/answer pairs (+ author)
    forget_train: list[Record]       # forget authors' question/answer pairs (+ author)
    utility_train: list[Record]      # real-author and world-fact question/answer pairs
    eval_sets: dict[str, list[Record]]  # forget, retain, real_authors, world_facts (perturbed form)

    @property
    def full_train(self) -> list[Record]:
        """What the "full" model learns: every author and the world knowledge."""
        return [*self.retain_train, *self.forget_train, *self.utility_train]

    @property
    def retain_model_train(self) -> list[Record]:
        """What the "retain" reference model learns: the same minus the forget authors."""
        return [*self.retain_train, *self.utility_train]

    @property
    def retain_calibration(self) -> list[Record]:
        """Retain authors' question/answer pairs that are never scored: the set ALTER's view
        calibration may look at (it must not tune on an evaluation set)."""
        scored = {r["question"] for r in self.eval_sets["retain"]}
        return [r for r in self.retain_train if r["question"] not in scored]

    @property
    def forget_heads(self) -> list[str]:
        return list(dict.fromkeys(r["author"] for r in self.forget_train))

    def digest(self) -> str:
        """sha256 of every record, in order: a cache key for models trained on this subset."""
        payload = json.dumps([self.full_train, self.eval_sets], sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()

    def tokenizer_corpus(self) -> list[str]:
        """Every text the models are trained or scored on, so the tokenizer covers all of it."""
        texts = [f"{r['question']} {r['answer']}" for r in self.full_train]
        for records in self.eval_sets.values():
            for r in records:
                texts += [r.get("paraphrased_answer", ""), *r.get("perturbed_answer", [])]
        return [t for t in texts if t]

    def summary(self) -> dict[str, Any]:
        return {
            "n_authors": self.spec.n_authors, "forget_authors": self.spec.forget_authors,
            "forget_split": self.spec.forget_split, "forget_heads": self.forget_heads,
            "train_records": {"retain_authors": len(self.retain_train), "forget_authors": len(self.forget_train),
                              "utility": len(self.utility_train)},
            "eval_records": {name: len(records) for name, records in self.eval_sets.items()},
            "world_knowledge_trained": True,
        }


def build_subset(root: str | Path, spec: SubsetSpec) -> TofuSubset:
    """Read the TOFU folder `root` and cut the subset `spec` describes (see the module docstring)."""
    spec.validate()
    full = load_split(root, "full")
    if len(full) != TOFU_AUTHORS * AUTHOR_BLOCK:
        raise ValueError(f"{root}: full.json has {len(full)} records, expected {TOFU_AUTHORS * AUTHOR_BLOCK}")
    n_retain = spec.n_authors - spec.forget_authors
    retain_ids = range(n_retain)
    forget_ids = range(TOFU_AUTHORS - spec.forget_authors, TOFU_AUTHORS)
    retain_train = _author_records(full, retain_ids)
    forget_train = _author_records(full, forget_ids)

    forget_eval = _matching(load_split(root, spec.forget_split), forget_train, "forget")
    per_author = {}
    for record in _matching(load_split(root, "retain_perturbed"), retain_train, "retain", require_all=False):
        per_author.setdefault(record["author"], []).append(record)
    retain_eval = [r for records in per_author.values() for r in records[: spec.retain_eval_per_author]]

    eval_sets = {"forget": forget_eval, "retain": retain_eval}
    utility_train = []
    for name in UTILITY_SETS:
        records = load_split(root, f"{name}_perturbed")[: spec.utility_limit]
        eval_sets[name] = records
        utility_train += [{"question": r["question"], "answer": r["answer"], "author": name.replace("_", "-")}
                          for r in records]
    return TofuSubset(spec, retain_train, forget_train, utility_train, eval_sets)


def _author_records(full: Sequence[Record], author_ids: range) -> list[Record]:
    return [{"question": r["question"], "answer": r["answer"], "author": f"author-{a:03d}"}
            for a in author_ids for r in full[a * AUTHOR_BLOCK: (a + 1) * AUTHOR_BLOCK]]


def _matching(perturbed: Sequence[Record], trained: Sequence[Record], what: str,
              require_all: bool = True) -> list[Record]:
    """The perturbed-form records whose question is one of `trained`, tagged with its author."""
    author_of = {r["question"]: r["author"] for r in trained}
    chosen = [{**r, "author": author_of[r["question"]]} for r in perturbed if r["question"] in author_of]
    if require_all and len(chosen) != len(trained):
        raise ValueError(f"{what}: {len(chosen)} of {len(trained)} trained questions have perturbed material")
    if not chosen:
        raise ValueError(f"{what}: no perturbed records match the chosen authors")
    return chosen
