"""Load TOFU (Maini et al., 2024) from a local folder, or from the Hugging Face hub.

A local folder has the layout of the published data set (see `../shared/data/tofu/README.md`):
200 fictitious authors in blocks of 20 consecutive question/answer records. `full.json` and
`retainXX.json` are JSON *lines*, each line an array of records; every other file is one JSON
array. The reader accepts either form for any file.

Split names and what they load:

    full, retain90, retain95, retain99    question, answer
    forget01, forget05, forget10          forgetXX_perturbed.json: question, answer,
    retain_perturbed                        paraphrased_question, paraphrased_answer, perturbed_answer
    real_authors, world_facts             question, answer, option1..option4 (multiple choice)
    real_authors_perturbed,               question, answer, perturbed_answer
    world_facts_perturbed
    holdout01, holdout05, holdout10       question, answer (authors never trained on)

Any other name loads `<name>.json` (a `*_perturbed` name with the perturbed schema), which is how
the synthetic data set's `forget_<subdomain>_perturbed.json` files are read.

Files are untrusted input: every record is validated with pydantic (strict types, no coercion),
and every problem is reported at once in a `TofuFormatError` that names the file, the record index
and the field. Records come back as plain dicts, the shape `train.data.synthetic` produces, so
training and evaluation take one input type from either source; fields beyond the schema (such
as the synthetic `author` and `subdomain`) are kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Record = dict[str, Any]

AUTHOR_BLOCK = 20  # TOFU: 20 consecutive records per author
HUB_REPO = "locuslab/TOFU"
_MAX_LISTED_PROBLEMS = 20


class QARecord(BaseModel):
    """A question and its answer; extra fields are allowed and kept."""

    model_config = ConfigDict(extra="allow", strict=True)

    question: str
    answer: str


class PerturbedRecord(QARecord):
    """A forget/retain evaluation record: the truth-ratio material of TOFU."""

    paraphrased_question: str
    paraphrased_answer: str
    perturbed_answer: list[str] = Field(min_length=1)


class UtilityPerturbedRecord(QARecord):
    """A real-author or world-fact record with wrong answers (and no paraphrase)."""

    perturbed_answer: list[str] = Field(min_length=1)


class MultipleChoiceRecord(QARecord):
    """A real-author or world-fact record in multiple-choice form; `answer` is one of the options."""

    option1: str
    option2: str
    option3: str
    option4: str


@dataclass(frozen=True)
class SplitSpec:
    """Where a split lives in the folder and the schema its records must satisfy."""

    file: str
    schema: type[QARecord]

    @property
    def hub_config(self) -> str:
        """The `locuslab/TOFU` config name, which is the file's stem."""
        return Path(self.file).stem


SPLITS: dict[str, SplitSpec] = {
    "full": SplitSpec("full.json", QARecord),
    **{f"retain{p}": SplitSpec(f"retain{p}.json", QARecord) for p in ("90", "95", "99")},
    **{f"forget{p}": SplitSpec(f"forget{p}_perturbed.json", PerturbedRecord) for p in ("01", "05", "10")},
    "retain_perturbed": SplitSpec("retain_perturbed.json", PerturbedRecord),
    "real_authors": SplitSpec("real_authors.json", MultipleChoiceRecord),
    "real_authors_perturbed": SplitSpec("real_authors_perturbed.json", UtilityPerturbedRecord),
    "world_facts": SplitSpec("world_facts.json", MultipleChoiceRecord),
    "world_facts_perturbed": SplitSpec("world_facts_perturbed.json", UtilityPerturbedRecord),
    **{f"holdout{p}": SplitSpec(f"holdout{p}.json", QARecord) for p in ("01", "05", "10")},
}


class TofuFormatError(ValueError):
    """A TOFU file failed to parse or validate. `problems` lists every issue found."""

    def __init__(self, source: str | Path, problems: list[str]):
        self.source = str(source)
        self.problems = list(problems)
        listed = self.problems[:_MAX_LISTED_PROBLEMS]
        more = len(self.problems) - len(listed)
        bullet = "\n  - ".join(listed + ([f"... and {more} more"] if more else []))
        super().__init__(f"invalid TOFU data {self.source}: {len(self.problems)} problem(s):\n  - {bullet}")


def split_spec(name: str) -> SplitSpec:
    """The spec of a named split; an unknown name means the file `<name>.json`."""
    if name in SPLITS:
        return SPLITS[name]
    schema = PerturbedRecord if name.endswith("_perturbed") else QARecord
    return SplitSpec(f"{name}.json", schema)


def load_split(root: str | Path, name: str) -> list[Record]:
    """The validated records of split `name` from the TOFU folder `root`."""
    spec = split_spec(name)
    path = Path(root) / spec.file
    if not path.is_file():
        raise FileNotFoundError(
            f"TOFU split {name!r}: {path} not found. Point root at a folder in the TOFU layout "
            f"(see train/data/tofu.py) that has {spec.file}, or use load_from_hub({name!r})."
        )
    return read_records(path, spec.schema)


def load_tofu(root: str | Path, names: Iterable[str] | None = None) -> dict[str, list[Record]]:
    """Several splits at once, `{name: records}`; all of `SPLITS` by default."""
    return {name: load_split(root, name) for name in (names or SPLITS)}


def read_records(path: str | Path, schema: type[QARecord] = QARecord) -> list[Record]:
    """Parse a JSON-array or JSON-lines file of records and validate each against `schema`."""
    path = Path(path)
    return validate_records(_parse(path), schema, source=path)


def validate_records(rows: Sequence[Any], schema: type[QARecord], source: str | Path) -> list[Record]:
    """Validate every row; raise one `TofuFormatError` listing all problems, by record and field."""
    records: list[Record] = []
    problems: list[str] = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            problems.append(f"record {index}: expected a JSON object with fields "
                            f"{list(schema.model_fields)}, got a JSON {_json_type(row)}")
            continue
        try:
            records.append(schema.model_validate(row).model_dump())
        except ValidationError as error:
            problems += [f"record {index}: {_describe(issue)}" for issue in error.errors()]
    if problems:
        raise TofuFormatError(source, problems)
    return records


def author_blocks(records: Sequence[Record], size: int = AUTHOR_BLOCK) -> list[list[Record]]:
    """Consecutive blocks of `size` records, one per author (TOFU's layout)."""
    if size < 1 or len(records) % size:
        raise ValueError(f"{len(records)} records do not split into author blocks of {size}")
    return [list(records[start: start + size]) for start in range(0, len(records), size)]


def load_from_hub(name: str, repo_id: str = HUB_REPO, cache_dir: str | Path | None = None) -> list[Record]:
    """Split `name` downloaded from the hub with the `datasets` library, validated like a file.

    Needs network access and `pip install datasets`, which is not a dependency of this project:
    it is imported only here. Offline use (tests, CI) reads a local folder with `load_split`.
    """
    try:
        import datasets
    except ImportError as error:
        raise ImportError("load_from_hub needs the `datasets` package (pip install datasets); "
                          "or read a local TOFU folder with load_split") from error
    spec = split_spec(name)
    rows = datasets.load_dataset(repo_id, spec.hub_config, split="train", cache_dir=cache_dir)
    return validate_records(list(rows), spec.schema, source=f"hub:{repo_id}/{spec.hub_config}")


def _parse(path: Path) -> list[Any]:
    """Rows of a JSON array file, or of a JSON-lines file whose lines are arrays (full.json)."""
    text = path.read_text(encoding="utf-8")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg != "Extra data":  # "Extra data" means several JSON values: JSON lines
            raise TofuFormatError(path, [f"not valid JSON: line {error.lineno} column {error.colno}: "
                                         f"{error.msg}"]) from error
        return _parse_lines(path, text)
    if not isinstance(document, list):
        raise TofuFormatError(path, [f"expected a JSON array of records, got a JSON {_json_type(document)}"])
    return document


def _parse_lines(path: Path, text: str) -> list[Any]:
    rows: list[Any] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise TofuFormatError(path, [f"line {number}: not valid JSON: {error.msg}"]) from error
        if not isinstance(value, list):
            raise TofuFormatError(path, [f"line {number}: expected a JSON array of records, "
                                         f"got a JSON {_json_type(value)}"])
        rows += value
    return rows


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), "null")


def _describe(issue: Any) -> str:
    """One pydantic error as "field 'perturbed_answer[2]': Input should be a valid string"."""
    location = issue["loc"]
    field = str(location[0]) + "".join(f"[{part}]" for part in location[1:])
    return f"field {field!r}: {issue['msg']}"
