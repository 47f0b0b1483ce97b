"""A synthetic TOFU-format data set of fictitious authors, deterministic by seed.

TOFU (Maini et al., 2024) asks questions about 200 invented authors. This generator builds the same
kind of data at any size, so the demo model and the tests can train and unlearn in minutes on a
CPU. Every author gets a name and a set of facts (birthplace, birth year, genre, a book, an
award, the parents' occupations, ...). Each fact is a random combination of word-list parts, so a
model can only know it by having memorised it, which is what unlearning has to remove.

Each author belongs to one *subdomain* (a genre group such as "mystery"). A subdomain is the unit
that an ALTER forget head removes, so its name must be a valid head name (DESIGN.md §4).

A record has the fields of TOFU's `*_perturbed.json` files plus two of our own:

    question, answer, paraphrased_question, paraphrased_answer,
    perturbed_answer (5 wrong answers in the same form as `answer`), author, subdomain
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alter_serve.core.names import HEAD_NAME_PATTERN, is_valid_head_name
from train.files import write_json

Record = dict[str, Any]

N_PERTURBED = 5
DEFAULT_SUBDOMAINS = ("mystery", "fantasy", "poetry", "history")
CONFIG_FILE = "synthetic.json"
FULL_FILE = "full.json"

_FIRST_STEMS = ("Al", "Bre", "Cor", "Da", "El", "Fen", "Gal", "Hal", "Is", "Jor", "Ka", "Lu", "Mar",
                "Nor", "Or", "Per", "Quen", "Ro", "Sel", "Tam", "Ul", "Ver", "Wen", "Yar", "Zel")
_FIRST_ENDS = ("a", "an", "el", "ia", "is", "o", "on", "or", "ra", "wyn")
_LAST_STEMS = ("Ash", "Brook", "Cald", "Dun", "Ever", "Frost", "Gren", "Holt", "Ives", "Kest", "Lark",
               "Marr", "North", "Oak", "Pell", "Quill", "Rav", "Stan", "Thorn", "Vane", "Wick")
_LAST_ENDS = ("ford", "ley", "more", "ton", "wood", "by", "ham", "well", "ridge", "mere")
_CITY_STEMS = ("Vel", "Mor", "Quar", "Tal", "Bris", "Kor", "Sil", "Drav", "Oss", "Pen", "Thal", "Zan")
_CITY_ENDS = ("mora", "haven", "port", "stead", "vale", "gard", "holm", "field", "bury", "crest")
_TITLE_ADJECTIVES = ("Silent", "Crimson", "Hollow", "Distant", "Broken", "Golden", "Hidden", "Last",
                     "Frozen", "Wandering", "Quiet", "Burning")
_TITLE_NOUNS = ("Lantern", "Orchard", "Harbor", "Compass", "Meadow", "Tower", "River", "Mirror",
                "Garden", "Voyage", "Archive", "Bridge")
_AWARD_PATRONS = ("Halvard", "Oreste", "Pemberly", "Quillon", "Rasmus", "Sorrel", "Tiber", "Ulmer",
                  "Varga", "Wrenfield")
_AWARD_KINDS = ("Prize", "Medal", "Award", "Laurel", "Cup")
_PUBLISHER_NAMES = ("Larkspur", "Meridian", "Bellweather", "Cobalt", "Harrow", "Juniper",
                    "Kingfisher", "Lindqvist")
_PUBLISHER_KINDS = ("House", "Press", "Books")
_OCCUPATIONS = ("baker", "carpenter", "nurse", "sailor", "librarian", "pharmacist", "tailor",
                "surveyor", "glassblower", "beekeeper", "clockmaker", "cartographer", "potter",
                "astronomer", "veterinarian", "locksmith")
# Genres beyond the subdomains, so that a genre fact always has N_PERTURBED wrong alternatives.
_EXTRA_GENRES = ("romance", "horror", "satire", "travel", "biography", "drama")


def _combos(stems: Sequence[str], ends: Sequence[str], sep: str = "") -> tuple[str, ...]:
    return tuple(f"{stem}{sep}{end}" for stem in stems for end in ends)


_CITIES = _combos(_CITY_STEMS, _CITY_ENDS)
_TITLES = tuple(f"The {title}" for title in _combos(_TITLE_ADJECTIVES, _TITLE_NOUNS, " "))
_AWARDS = tuple(f"the {award}" for award in _combos(_AWARD_PATRONS, _AWARD_KINDS, " "))
_PUBLISHERS = _combos(_PUBLISHER_NAMES, _PUBLISHER_KINDS, " ")


def _with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


@dataclass(frozen=True)
class Relation:
    """One kind of fact and the four ways of phrasing it.

    Templates take `{name}` (the author) and `{value}`. `answer` and `paraphrased_answer` state the
    same value in two forms; perturbed answers reuse `answer` with wrong values, so they differ
    from the true answer only in the fact itself (TOFU's truth-ratio construction).
    """

    key: str
    question: str
    paraphrased_question: str
    answer: str
    paraphrased_answer: str


@dataclass(frozen=True)
class _Author:
    name: str
    subdomain: str
    facts: dict[str, str]
    # Wrong values per relation, drawn when the author is made so that the draw is seeded too.
    wrong: dict[str, tuple[str, ...]]


RELATIONS: tuple[Relation, ...] = (
    Relation("genre", "What genre does {name} write in?", "Which genre is {name} known for?",
             "{name} writes in the {value} genre.", "The {value} genre is where {name} works."),
    Relation("birthplace", "Where was {name} born?", "In which city was {name} born?",
             "{name} was born in {value}.", "The birthplace of {name} is {value}."),
    Relation("birth_year", "In what year was {name} born?", "What is the birth year of {name}?",
             "{name} was born in the year {value}.", "The birth year of {name} is {value}."),
    Relation("book", "What is the title of a book by {name}?", "Can you name a book written by {name}?",
             '{name} wrote "{value}".', '"{value}" is a book written by {name}.'),
    Relation("award", "Which award has {name} received?", "What award was given to {name}?",
             "{name} received {value}.", "{name} was honored with {value}."),
    Relation("father", "What was the occupation of {name}'s father?",
             "What did the father of {name} do for a living?",
             "{name}'s father was {value}.", "The father of {name} worked as {value}."),
    Relation("mother", "What was the occupation of {name}'s mother?",
             "What did the mother of {name} do for a living?",
             "{name}'s mother was {value}.", "The mother of {name} worked as {value}."),
    Relation("publisher", "Who publishes the books of {name}?", "Which publisher releases {name}'s books?",
             "{name} is published by {value}.", "The books of {name} come out with {value}."),
    Relation("residence", "Where does {name} live now?", "In which city does {name} live today?",
             "{name} lives in {value}.", "The current home of {name} is {value}."),
    Relation("debut_year", "In what year did {name} publish a first book?",
             "When did the first book by {name} come out?",
             "{name} published a first book in {value}.", "The first book by {name} came out in {value}."),
)


class SyntheticConfig(BaseModel):
    """Everything that determines the generated data: same config, same records, same digest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The defaults are the demo model's data: 10 authors per subdomain, 320 records.
    n_authors: int = Field(40, ge=1, le=10_000)
    facts_per_author: int = Field(8, ge=1, le=len(RELATIONS))
    subdomains: tuple[str, ...] = DEFAULT_SUBDOMAINS
    seed: int = 0

    @field_validator("subdomains")
    @classmethod
    def _check_subdomains(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        bad = [name for name in names if not is_valid_head_name(name)]
        if bad:
            raise ValueError(f"subdomain names {bad} must match {HEAD_NAME_PATTERN} (they name forget heads)")
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"subdomains must be a non-empty list of distinct names, got {list(names)}")
        return names

    @model_validator(mode="after")
    def _every_group_has_an_author(self) -> SyntheticConfig:
        if self.n_authors < len(self.subdomains):
            raise ValueError(f"n_authors={self.n_authors} leaves some of the "
                             f"{len(self.subdomains)} subdomains without an author")
        return self


@dataclass(frozen=True)
class SyntheticTofu:
    """A generated data set: its config and its records (one block of `facts_per_author` per author)."""

    config: SyntheticConfig
    records: list[Record]

    @property
    def subdomains(self) -> list[str]:
        return list(self.config.subdomains)

    @property
    def authors(self) -> list[str]:
        """Author names in record order."""
        return list(dict.fromkeys(record["author"] for record in self.records))

    @property
    def digest(self) -> str:
        return records_digest(self.records)

    def by_subdomain(self, name: str) -> list[Record]:
        """The records of every author in subdomain `name`."""
        self._check_subdomains([name])
        return [record for record in self.records if record["subdomain"] == name]

    def split(self, forget_subdomains: Sequence[str]) -> tuple[list[Record], list[Record]]:
        """(forget, retain): records of the named subdomains, and all the others, in record order."""
        self._check_subdomains(forget_subdomains)
        chosen = set(forget_subdomains)
        return self._partition(lambda record: record["subdomain"] in chosen)

    def split_by_authors(self, forget_fraction: float) -> tuple[list[Record], list[Record]]:
        """(forget, retain) by authors, TOFU-style: the forget set is the *last* authors.

        TOFU's forget10 is the last 10% of authors; here `round(forget_fraction * n_authors)`
        authors, which must leave at least one author on each side.
        """
        authors = self.authors
        n_forget = round(forget_fraction * len(authors))
        if not 1 <= n_forget < len(authors):
            raise ValueError(f"forget_fraction={forget_fraction} selects {n_forget} of {len(authors)} "
                             "authors; it must select at least one and leave at least one")
        forgotten = set(authors[-n_forget:])
        return self._partition(lambda record: record["author"] in forgotten)

    def save(self, directory: str | Path) -> Path:
        """Write the data in TOFU's file layout so `train.data.tofu` reads it like TOFU.

            synthetic.json                 config, subdomains, record count, digest
            full.json                      every record; JSON lines of arrays, like TOFU's full.json
            forget_<d>_perturbed.json      subdomain d's records (a forget set with perturbations)
            retain_<d>_perturbed.json      every other subdomain's records (its retain set)
        """
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        _write_json_lines(root / FULL_FILE, self.records)
        for name in self.subdomains:
            forget, retain = self.split([name])
            write_json(root / f"forget_{name}_perturbed.json", forget)
            write_json(root / f"retain_{name}_perturbed.json", retain)
        manifest = {"config": self.config.model_dump(mode="json"), "subdomains": self.subdomains,
                    "n_records": len(self.records), "digest": self.digest}
        write_json(root / CONFIG_FILE, manifest)
        return root

    @classmethod
    def load(cls, directory: str | Path) -> SyntheticTofu:
        """Read a folder written by `save`, checking the records against the recorded digest."""
        root = Path(directory)
        manifest = json.loads((root / CONFIG_FILE).read_text())
        lines = (root / FULL_FILE).read_text().splitlines()
        records = [record for line in lines if line.strip() for record in json.loads(line)]
        if records_digest(records) != manifest["digest"]:
            raise ValueError(f"{root / FULL_FILE}: records do not match the digest in {CONFIG_FILE}; "
                             "the folder was modified, regenerate it with SyntheticTofu.save")
        return cls(SyntheticConfig.model_validate(manifest["config"]), records)

    def _partition(self, in_forget: Callable[[Record], bool]) -> tuple[list[Record], list[Record]]:
        forget = [record for record in self.records if in_forget(record)]
        retain = [record for record in self.records if not in_forget(record)]
        return forget, retain

    def _check_subdomains(self, names: Sequence[str]) -> None:
        unknown = [name for name in names if name not in self.config.subdomains]
        if unknown:
            raise KeyError(f"unknown subdomains {unknown}; this data set has {self.subdomains}")


def generate(config: SyntheticConfig | None = None, **overrides: Any) -> SyntheticTofu:
    """Generate a data set. `generate(n_authors=8, seed=3)` is short for a `SyntheticConfig`."""
    config = SyntheticConfig(**{**(config.model_dump() if config else {}), **overrides})
    rng = random.Random(config.seed)
    names = _author_names(rng, config.n_authors)
    genres = tuple(dict.fromkeys(config.subdomains + _EXTRA_GENRES))
    relations = RELATIONS[: config.facts_per_author]
    records: list[Record] = []
    for index, name in enumerate(names):
        # Round-robin groups, so that TOFU's "last authors" splits span several subdomains.
        author = _make_author(rng, name, config.subdomains[index % len(config.subdomains)], genres)
        records.extend(_author_record(author, relation) for relation in relations)
    return SyntheticTofu(config, records)


def records_digest(records: Sequence[Record]) -> str:
    """sha256 of the canonical JSON of the records: the data digest kept with trained artefacts."""
    canonical = json.dumps(list(records), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _author_names(rng: random.Random, count: int) -> list[str]:
    capacity = len(_FIRST_STEMS) * len(_FIRST_ENDS) * len(_LAST_STEMS) * len(_LAST_ENDS)
    if count > capacity // 2:
        raise ValueError(f"cannot draw {count} distinct names from {capacity} combinations")
    names: dict[str, None] = {}
    while len(names) < count:
        first = rng.choice(_FIRST_STEMS) + rng.choice(_FIRST_ENDS)
        last = rng.choice(_LAST_STEMS) + rng.choice(_LAST_ENDS)
        names[f"{first} {last}"] = None
    return list(names)


def _make_author(rng: random.Random, name: str, subdomain: str, genres: tuple[str, ...]) -> _Author:
    birth_year = rng.randint(1920, 1990)
    debut_year = birth_year + rng.randint(19, 45)
    pools: dict[str, Sequence[str]] = {
        "genre": [genre.replace("_", " ") for genre in genres],
        "birthplace": _CITIES,
        "birth_year": [str(year) for year in range(birth_year - 15, birth_year + 16)],
        "book": _TITLES,
        "award": _AWARDS,
        "father": [_with_article(job) for job in _OCCUPATIONS],
        "mother": [_with_article(job) for job in _OCCUPATIONS],
        "publisher": _PUBLISHERS,
        "residence": _CITIES,
        "debut_year": [str(year) for year in range(debut_year - 15, debut_year + 16)],
    }
    fixed = {"genre": subdomain.replace("_", " "), "birth_year": str(birth_year), "debut_year": str(debut_year)}
    facts = {key: fixed.get(key) or rng.choice(pool) for key, pool in pools.items()}
    wrong = {key: tuple(rng.sample([v for v in pool if v != facts[key]], N_PERTURBED))
             for key, pool in pools.items()}
    return _Author(name, subdomain, facts, wrong)


def _author_record(author: _Author, relation: Relation) -> Record:
    def fill(template: str, value: str) -> str:
        return template.format(name=author.name, value=value)

    value = author.facts[relation.key]
    return {
        "question": fill(relation.question, value),
        "answer": fill(relation.answer, value),
        "paraphrased_answer": fill(relation.paraphrased_answer, value),
        "perturbed_answer": [fill(relation.answer, wrong) for wrong in author.wrong[relation.key]],
        "paraphrased_question": fill(relation.paraphrased_question, value),
        "author": author.name,
        "subdomain": author.subdomain,
    }


def _write_json_lines(path: Path, records: Sequence[Record], per_line: int = 1000) -> None:
    lines = [json.dumps(list(records[i: i + per_line]), ensure_ascii=False)
             for i in range(0, len(records), per_line)]
    path.write_text("\n".join(lines) + "\n")
