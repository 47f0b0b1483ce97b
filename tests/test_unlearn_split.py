"""The unlearning benchmark's TOFU split (train.data.unlearn_split) on the real TOFU data."""

from __future__ import annotations

import pytest

from benchmarks.unlearn_bench import DEFAULT_TOFU_ROOT as TOFU_ROOT
from train.data.unlearn_split import SplitSpec, build_split


@pytest.fixture(scope="module")
def split():
    return build_split(TOFU_ROOT)


def test_default_split_is_forget05_with_five_two_author_heads(split):
    assert split.heads == ["authors-190-191", "authors-192-193", "authors-194-195", "authors-196-197",
                           "authors-198-199"]
    assert {h: len(r) for h, r in split.forget_by_head().items()} == {h: 40 for h in split.heads}
    # n = 200 forget questions: what gives the KS test its resolution.
    assert len(split.eval_sets["forget"]) == 200
    assert len(split.retain_train) == 400 and len(split.eval_sets["retain"]) == 100
    assert len(split.retain_calibration) == 300


def test_evaluation_and_training_sets_are_disjoint_where_they_must_be(split):
    trained = {r["question"] for r in split.full_train}
    forget_q = {r["question"] for r in split.forget_train}
    retain_q = {r["question"] for r in split.retain_train}
    assert not forget_q & retain_q
    # Real authors, world facts and holdout authors are never trained.
    for name in ("real_authors", "world_facts"):
        assert not {r["question"] for r in split.eval_sets[name]} & trained
    holdout = [r["question"] for r in split.holdout]
    calibration = [r["question"] for r in split.holdout_calibration]
    assert not set(holdout) & trained and not set(calibration) & trained
    assert not set(holdout) & set(calibration), "the scored holdout half never calibrates training"
    # The scored retain questions are trained, and never used for calibration.
    scored = {r["question"] for r in split.eval_sets["retain"]}
    assert scored <= retain_q and not scored & {r["question"] for r in split.retain_calibration}
    # Every forget evaluation record carries its sub-domain (the isolation matrix groups by it).
    assert {r["subdomain"] for r in split.eval_sets["forget"]} == set(split.heads)


def test_holdout_authors_are_whole_never_trained_authors_split_in_halves(split):
    # Authors 180-189: 180-184 measure the never-learned level, 185-189 are scored.
    assert len(split.holdout_calibration) == len(split.holdout) == 100
    tofu_holdout = build_split(TOFU_ROOT, SplitSpec(holdout_split="holdout05"))
    assert len(tofu_holdout.holdout) == len(tofu_holdout.holdout_calibration) == 100
    assert tofu_holdout.eval_digest() == split.eval_digest() and tofu_holdout.holdout_digest() != split.holdout_digest()


def test_digest_changes_with_the_split(split):
    other = build_split(TOFU_ROOT, SplitSpec(authors_per_head=5))
    assert other.heads == ["authors-190-194", "authors-195-199"]
    assert other.digest() != split.digest()


@pytest.mark.parametrize(("spec", "message"), [
    (SplitSpec(forget_authors=(198, 250)), "unknown forget author ids [250]"),
    (SplitSpec(retain_authors=(0, 1, 190)), "authors [190] are both retain and forget authors"),
    (SplitSpec(forget_authors=(5, 199)), "forget authors [5] have no paraphrased/perturbed answers"),
    (SplitSpec(retain_authors=(50, 51)), "no retain author in 0..19"),
    (SplitSpec(forget_authors=(199, 199)), "forget author ids repeat"),
    (SplitSpec(holdout_authors=(185, 199)), "holdout authors [199] are trained"),
    (SplitSpec(holdout_authors=(185, 300)), "unknown holdout author ids [300]"),
])
def test_bad_author_choices_are_refused_with_every_problem_named(spec, message):
    with pytest.raises(ValueError, match="invalid unlearning split") as raised:
        build_split(TOFU_ROOT, spec)
    assert message in str(raised.value)


def test_a_missing_tofu_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="full.json"):
        build_split(tmp_path)
