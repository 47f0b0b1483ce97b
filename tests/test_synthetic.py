"""The synthetic TOFU-format generator: determinism, record shape, groups and splits."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from train.data.synthetic import N_PERTURBED, SyntheticConfig, SyntheticTofu, generate
from train.data.tofu import load_split

FIELDS = {"question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question",
          "author", "subdomain"}
SMALL = {"n_authors": 12, "facts_per_author": 5}


@pytest.fixture(scope="module")
def data() -> SyntheticTofu:
    return generate(**SMALL, seed=7)


def test_same_seed_same_data_other_seed_other_data(data: SyntheticTofu) -> None:
    assert generate(**SMALL, seed=7).records == data.records
    assert generate(**SMALL, seed=7).digest == data.digest
    assert generate(**SMALL, seed=8).records != data.records


def test_size_follows_the_arguments(data: SyntheticTofu) -> None:
    assert len(data.records) == 12 * 5
    assert len(data.authors) == 12


def test_every_record_has_the_tofu_perturbed_fields(data: SyntheticTofu) -> None:
    for record in data.records:
        assert set(record) == FIELDS
        assert all(isinstance(record[key], str) and record[key] for key in FIELDS - {"perturbed_answer"})
        assert record["author"] in record["question"]


def test_perturbed_answers_are_five_distinct_wrong_answers(data: SyntheticTofu) -> None:
    for record in data.records:
        perturbed = record["perturbed_answer"]
        assert len(perturbed) == N_PERTURBED == 5
        assert len(set(perturbed)) == 5
        assert record["answer"] not in perturbed
        assert record["paraphrased_answer"] != record["answer"]
        assert record["paraphrased_question"] != record["question"]


def test_default_has_at_least_four_valid_groups_all_populated() -> None:
    data = generate()
    assert len(data.subdomains) >= 4
    for name in data.subdomains:
        assert re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", name)
        assert data.by_subdomain(name)
    assert {record["subdomain"] for record in data.records} == set(data.subdomains)


def test_split_by_subdomain_partitions_the_records(data: SyntheticTofu) -> None:
    chosen = data.subdomains[:2]
    forget, retain = data.split(chosen)
    assert forget and retain
    assert len(forget) + len(retain) == len(data.records)
    assert {r["subdomain"] for r in forget} == set(chosen)
    assert not {r["subdomain"] for r in retain} & set(chosen)
    assert sorted(map(repr, forget + retain)) == sorted(map(repr, data.records))


def test_split_by_authors_forgets_the_last_authors(data: SyntheticTofu) -> None:
    forget, retain = data.split_by_authors(0.25)
    assert [r["author"] for r in forget] == [r["author"] for r in data.records[-len(forget):]]
    assert {r["author"] for r in forget} == set(data.authors[-3:])
    assert retain + forget == data.records


@pytest.mark.parametrize("fraction", [0.0, 0.01, 1.0])
def test_split_by_authors_rejects_an_empty_side(data: SyntheticTofu, fraction: float) -> None:
    with pytest.raises(ValueError, match="forget_fraction"):
        data.split_by_authors(fraction)


def test_unknown_subdomain_is_named(data: SyntheticTofu) -> None:
    with pytest.raises(KeyError, match="biology"):
        data.split(["biology"])


def test_subdomain_names_must_be_head_names() -> None:
    with pytest.raises(ValidationError, match="Bad Name"):
        SyntheticConfig(subdomains=("mystery", "Bad Name"))


def test_saved_folder_round_trips_and_reads_with_the_tofu_loader(data: SyntheticTofu, tmp_path) -> None:
    data.save(tmp_path)
    assert SyntheticTofu.load(tmp_path) == data
    name = data.subdomains[0]
    assert load_split(tmp_path, "full") == data.records
    assert load_split(tmp_path, f"forget_{name}_perturbed") == data.by_subdomain(name)
    assert load_split(tmp_path, f"retain_{name}_perturbed") == data.split([name])[1]
