"""The TOFU loader against the real data in ../shared/data/tofu, and against bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.data.tofu import (PerturbedRecord, Record, TofuFormatError, author_blocks, load_split,
                             load_tofu, read_records)

TOFU_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tofu"
COUNTS = {
    "full": 4000, "retain90": 3600, "retain95": 3800, "retain99": 3960,
    "forget01": 40, "forget05": 200, "forget10": 400, "retain_perturbed": 400,
    "real_authors": 100, "real_authors_perturbed": 100, "world_facts": 117, "world_facts_perturbed": 117,
    "holdout01": 40, "holdout05": 200, "holdout10": 400,
}


def _qa(records: list[Record]) -> list[tuple[str, str]]:
    return [(record["question"], record["answer"]) for record in records]


@pytest.fixture(scope="module")
def tofu() -> dict[str, list[Record]]:
    # A missing data folder is a broken checkout, not an optional extra: fail, do not skip.
    assert TOFU_ROOT.is_dir(), f"TOFU data not found at {TOFU_ROOT} (expected ../shared/data/tofu)"
    return load_tofu(TOFU_ROOT)


@pytest.mark.parametrize(("name", "count"), COUNTS.items())
def test_record_counts_match_the_readme(tofu: dict[str, list[Record]], name: str, count: int) -> None:
    assert len(tofu[name]) == count


@pytest.mark.parametrize(("name", "n_authors"), [("forget01", 2), ("forget05", 10), ("forget10", 20)])
def test_forget_sets_are_the_last_authors_of_full(tofu: dict[str, list[Record]], name: str,
                                                  n_authors: int) -> None:
    last = author_blocks(tofu["full"])[-n_authors:]
    assert _qa(tofu[name]) == _qa([record for block in last for record in block])


def test_retain90_plus_forget10_is_full(tofu: dict[str, list[Record]]) -> None:
    assert _qa(tofu["retain90"]) + _qa(tofu["forget10"]) == _qa(tofu["full"])


def test_perturbed_splits_carry_their_wrong_answers(tofu: dict[str, list[Record]]) -> None:
    assert all(len(r["perturbed_answer"]) == 5 for r in tofu["forget10"] + tofu["retain_perturbed"])
    assert all(len(r["perturbed_answer"]) == 3 for r in tofu["world_facts_perturbed"])
    assert all(r["answer"] in [r[f"option{i}"] for i in range(1, 5)] for r in tofu["real_authors"])


def test_author_blocks_are_two_hundred_authors_of_twenty(tofu: dict[str, list[Record]]) -> None:
    blocks = author_blocks(tofu["full"])
    assert len(blocks) == 200 and {len(block) for block in blocks} == {20}
    with pytest.raises(ValueError, match="author blocks of 20"):
        author_blocks(tofu["full"][:30])


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        load_split(tmp_path, "forget10")
    assert "forget10_perturbed.json" in str(caught.value)
    assert str(tmp_path) in str(caught.value)


def _write(path: Path, payload: object) -> Path:
    path.write_text(json.dumps(payload))
    return path


def test_missing_field_names_file_record_and_field(tmp_path: Path) -> None:
    good = {"question": "q", "answer": "a", "paraphrased_question": "pq", "paraphrased_answer": "pa",
            "perturbed_answer": ["x", "y"]}
    bad = {key: value for key, value in good.items() if key != "paraphrased_answer"}
    path = _write(tmp_path / "forget10_perturbed.json", [good, bad])
    with pytest.raises(TofuFormatError) as caught:
        load_split(tmp_path, "forget10")
    message = str(caught.value)
    assert "forget10_perturbed.json" in message
    assert "record 1: field 'paraphrased_answer'" in message
    assert caught.value.source == str(path)


def test_wrong_type_names_the_field_and_position(tmp_path: Path) -> None:
    record = {"question": "q", "answer": 3, "paraphrased_question": "pq", "paraphrased_answer": "pa",
              "perturbed_answer": ["x", None]}
    path = _write(tmp_path / "retain_perturbed.json", [record])
    with pytest.raises(TofuFormatError) as caught:
        read_records(path, PerturbedRecord)
    message = str(caught.value)
    assert "retain_perturbed.json" in message
    assert "record 0: field 'answer'" in message
    assert "record 0: field 'perturbed_answer[1]'" in message


def test_wrong_schema_file_names_file_and_expected_fields(tmp_path: Path) -> None:
    # forgetXX.json uses prompt/response, not question/answer.
    _write(tmp_path / "holdout10.json", [{"prompt": "q", "response": "a"}])
    with pytest.raises(TofuFormatError) as caught:
        load_split(tmp_path, "holdout10")
    message = str(caught.value)
    assert "holdout10.json" in message
    assert "record 0: field 'question'" in message and "record 0: field 'answer'" in message


def test_object_instead_of_array_is_rejected(tmp_path: Path) -> None:
    _write(tmp_path / "world_facts.json", {"question": "q", "answer": "a"})
    with pytest.raises(TofuFormatError, match=r"(?s)world_facts\.json.*expected a JSON array"):
        load_split(tmp_path, "world_facts")


def test_json_lines_error_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "full.json").write_text('[{"question": "q", "answer": "a"}]\n{"question": "q"}\n')
    with pytest.raises(TofuFormatError, match=r"(?s)full\.json.*line 2: expected a JSON array"):
        load_split(tmp_path, "full")
