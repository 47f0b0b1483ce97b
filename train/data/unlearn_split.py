"""The data split of the unlearning benchmark on a real pretrained model (`benchmarks.unlearn_bench`).

TOFU's 200 fictitious authors have 20 question/answer pairs each (`full.json`, in author blocks).
A pretrained chat model is fine-tuned on some of them, and the forget authors are then unlearned:

* retain authors (default TOFU 0–19): trained into both reference models. Their questions with
  truth-ratio material (`retain_perturbed.json` covers authors 0–19) split into `scored` (the
  retain evaluation set, `retain_scored_per_author` per author) and the rest, which ALTER's view
  calibration may use (it must never tune on an evaluation set);
* forget authors (default TOFU's forget05 authors, 190–199, 200 pairs): trained into the "full"
  model only. Their perturbed-form records (`forget10_perturbed.json` covers authors 180–199) are
  the forget evaluation set, all of them: forget quality is a KS test, and n = 200 is what gives
  it resolution. They are grouped into sub-domains of `authors_per_head` consecutive authors, one
  forget head each (`authors-190-191`, …);
* holdout authors (default TOFU 180–189): never trained. Their answer NLL is the "never learned"
  level that a forgotten author should sink to. The first half of them (`holdout_calibration`) is
  what training may use to measure that level; the second half (`holdout`) is only scored
  (validity gate G5 and the privacy-leak figure). They come from the same TOFU block as the default
  forget authors, so they are matched to them: TOFU's own `holdout05.json` is not (a model that
  saw neither scores its answers 0.56 nats easier than the forget05 answers, so forget-vs-holdout
  tests fail even for the retain model; `holdout_split: holdout05` still selects it);
* real authors and world facts: never trained. They measure the pretrained knowledge that
  unlearning must keep (model utility).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .tofu import AUTHOR_BLOCK, load_split

Record = dict[str, Any]

TOFU_AUTHORS = 200
RETAIN_PERTURBED_AUTHORS = range(0, 20)      # authors retain_perturbed.json covers
FORGET_PERTURBED_AUTHORS = range(180, 200)   # authors forget10_perturbed.json covers
FORGET05_AUTHORS = tuple(range(190, 200))
UTILITY_SETS = ("real_authors", "world_facts")


@dataclass(frozen=True)
class SplitSpec:
    """Who is trained, who is forgotten, and how much of each evaluation set is scored."""

    retain_authors: tuple[int, ...] = tuple(range(20))
    forget_authors: tuple[int, ...] = FORGET05_AUTHORS
    authors_per_head: int = 2
    retain_scored_per_author: int = 5
    holdout_authors: tuple[int, ...] = tuple(range(180, 190))
    holdout_split: str | None = None    # a TOFU holdout file instead of holdout_authors (e.g. holdout05)
    utility_limit: int | None = None    # questions per utility set (None: all)
    holdout_limit: int | None = None    # holdout questions (None: all)

    def validate(self) -> None:
        """Every problem at once, as one ValueError that says what to change."""
        problems = []
        for name, ids in (("retain", self.retain_authors), ("forget", self.forget_authors)):
            if not ids:
                problems.append(f"no {name} authors")
            bad = sorted(a for a in ids if not 0 <= a < TOFU_AUTHORS)
            if bad:
                problems.append(f"unknown {name} author ids {bad}: TOFU authors are 0..{TOFU_AUTHORS - 1}")
            if len(set(ids)) != len(ids):
                problems.append(f"{name} author ids repeat: {list(ids)}")
        overlap = sorted(set(self.retain_authors) & set(self.forget_authors))
        if overlap:
            problems.append(f"authors {overlap} are both retain and forget authors")
        if self.holdout_split is None:
            bad = sorted(a for a in self.holdout_authors if not 0 <= a < TOFU_AUTHORS)
            if bad:
                problems.append(f"unknown holdout author ids {bad}: TOFU authors are 0..{TOFU_AUTHORS - 1}")
            trained = sorted(set(self.holdout_authors) & (set(self.retain_authors) | set(self.forget_authors)))
            if trained:
                problems.append(f"holdout authors {trained} are trained (retain or forget authors)")
            if len(self.holdout_authors) < 2:
                problems.append("at least 2 holdout authors are needed (half calibrates, half is scored)")
        no_material = sorted(a for a in self.forget_authors if a not in FORGET_PERTURBED_AUTHORS and 0 <= a < TOFU_AUTHORS)
        if no_material:
            problems.append(f"forget authors {no_material} have no paraphrased/perturbed answers in TOFU (only authors "
                            f"{FORGET_PERTURBED_AUTHORS.start}..{FORGET_PERTURBED_AUTHORS.stop - 1} do), so forget quality "
                            "cannot be measured on them")
        if not any(a in RETAIN_PERTURBED_AUTHORS for a in self.retain_authors):
            problems.append(f"no retain author in {RETAIN_PERTURBED_AUTHORS.start}..{RETAIN_PERTURBED_AUTHORS.stop - 1}, "
                            "the only ones with truth-ratio material: the retain set could not be scored")
        if self.authors_per_head < 1:
            problems.append("authors_per_head must be at least 1")
        if not 1 <= self.retain_scored_per_author < AUTHOR_BLOCK:
            problems.append(f"retain_scored_per_author must be 1..{AUTHOR_BLOCK - 1} (the rest calibrates)")
        if problems:
            raise ValueError("invalid unlearning split:\n  - " + "\n  - ".join(problems))


@dataclass
class UnlearnSplit:
    spec: SplitSpec
    retain_train: list[Record]          # question, answer, author, subdomain="retain"
    forget_train: list[Record]          # question, answer, author, subdomain=<head>
    eval_sets: dict[str, list[Record]]  # forget, retain, real_authors, world_facts (perturbed form)
    holdout: list[Record]               # question, answer of never-trained authors (scored only)
    holdout_calibration: list[Record]   # more never-trained authors (training may measure τ on them)
    heads: list[str] = field(default_factory=list)

    @property
    def full_train(self) -> list[Record]:
        return [*self.retain_train, *self.forget_train]

    @property
    def retain_calibration(self) -> list[Record]:
        """Retain training pairs that are never scored (for view calibration and learning-rate rules)."""
        scored = {r["question"] for r in self.eval_sets["retain"]}
        return [r for r in self.retain_train if r["question"] not in scored]

    def forget_by_head(self) -> dict[str, list[Record]]:
        groups: dict[str, list[Record]] = {head: [] for head in self.heads}
        for record in self.forget_train:
            groups[record["subdomain"]].append(record)
        return groups

    def digest(self) -> str:
        """sha256 of every record and the spec: the cache key of everything trained on this split."""
        payload = json.dumps([asdict(self.spec), self.full_train, self.eval_sets, self.holdout,
                              self.holdout_calibration], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def eval_digest(self) -> str:
        """sha256 of the evaluation sets alone (what a TOFU scoring depends on)."""
        return hashlib.sha256(json.dumps(self.eval_sets, sort_keys=True).encode()).hexdigest()

    def holdout_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.holdout, sort_keys=True).encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        return {
            "retain_authors": list(self.spec.retain_authors), "forget_authors": list(self.spec.forget_authors),
            "heads": {head: len(records) for head, records in self.forget_by_head().items()},
            "train_records": {"retain": len(self.retain_train), "forget": len(self.forget_train)},
            "eval_records": {name: len(records) for name, records in self.eval_sets.items()},
            "holdout_records": len(self.holdout), "holdout_calibration_records": len(self.holdout_calibration),
            "retain_calibration_records": len(self.retain_calibration),
            "world_knowledge_trained": False,
        }


def head_name(authors: Sequence[int]) -> str:
    """`authors-190-191` for a group of authors (`author-190` for one)."""
    if len(authors) == 1:
        return f"author-{authors[0]:03d}"
    return f"authors-{authors[0]:03d}-{authors[-1]:03d}"


def build_split(root: str | Path, spec: SplitSpec = SplitSpec()) -> UnlearnSplit:
    """Read the TOFU folder `root` and cut the split `spec` describes (see the module docstring)."""
    spec.validate()
    full = load_split(root, "full")
    if len(full) != TOFU_AUTHORS * AUTHOR_BLOCK:
        raise ValueError(f"{root}: full.json has {len(full)} records, expected {TOFU_AUTHORS * AUTHOR_BLOCK}")
    groups = [spec.forget_authors[i: i + spec.authors_per_head]
              for i in range(0, len(spec.forget_authors), spec.authors_per_head)]
    head_of = {author: head_name(group) for group in groups for author in group}
    retain_train = [{**r, "subdomain": "retain"} for r in _author_records(full, spec.retain_authors)]
    forget_train = [{**r, "subdomain": head_of[r["author_id"]]} for r in _author_records(full, spec.forget_authors)]

    forget_eval = _perturbed(load_split(root, "forget10_perturbed"), forget_train, "forget")
    retain_perturbed = _perturbed(load_split(root, "retain_perturbed"), retain_train, "retain", require_all=False)
    per_author: dict[int, list[Record]] = {}
    for record in retain_perturbed:
        per_author.setdefault(record["author_id"], []).append(record)
    retain_eval = [r for records in per_author.values() for r in records[: spec.retain_scored_per_author]]
    eval_sets = {"forget": forget_eval, "retain": retain_eval}
    for name in UTILITY_SETS:
        eval_sets[name] = load_split(root, f"{name}_perturbed")[: spec.utility_limit]
    if spec.holdout_split is None:
        holdout = [{"question": r["question"], "answer": r["answer"]}
                   for r in _author_records(full, spec.holdout_authors)]
        half = len(spec.holdout_authors) // 2 * AUTHOR_BLOCK  # whole authors on each side
    else:
        holdout = [{"question": r["question"], "answer": r["answer"]} for r in load_split(root, spec.holdout_split)]
        trained = {r["question"] for r in [*retain_train, *forget_train]}
        if any(r["question"] in trained for r in holdout):
            raise ValueError(f"{spec.holdout_split}: some holdout questions are training questions")
        half = len(holdout) // 2
    return UnlearnSplit(spec, retain_train, forget_train, eval_sets, holdout[half:][: spec.holdout_limit],
                        holdout[:half][: spec.holdout_limit], [head_name(g) for g in groups])


def _author_records(full: Sequence[Record], authors: Sequence[int]) -> list[Record]:
    return [{"question": r["question"], "answer": r["answer"], "author": f"author-{a:03d}", "author_id": a}
            for a in authors for r in full[a * AUTHOR_BLOCK: (a + 1) * AUTHOR_BLOCK]]


def _perturbed(perturbed: Sequence[Record], trained: Sequence[Record], what: str,
               require_all: bool = True) -> list[Record]:
    """The perturbed-form records of the trained questions, tagged with author and sub-domain."""
    by_question = {r["question"]: r for r in trained}
    chosen = [{**r, **{k: by_question[r["question"]][k] for k in ("author", "author_id", "subdomain")}}
              for r in perturbed if r["question"] in by_question]
    if require_all and len(chosen) != len(trained):
        raise ValueError(f"{what}: only {len(chosen)} of {len(trained)} trained questions have perturbed material")
    if not chosen:
        raise ValueError(f"{what}: no perturbed records match the chosen authors")
    return chosen
