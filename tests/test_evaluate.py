"""evaluate_tofu and isolation_matrix through a scripted scorer, checked against hand-worked
numbers; the report writers produce readable files."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from train.evaluation.tofu_eval import evaluate_tofu, forget_truth_ratios, isolation_matrix
from train.evaluation.eval_reports import write_isolation_reports, write_reports
from train.evaluation.scorers import AnswerScores, Scorer

LN2, LN4, LN8 = math.log(2), math.log(4), math.log(8)


class ScriptedScorer(Scorer):
    """Answers from tables: continuation text → token logprobs, prompt → generation."""

    def __init__(
        self,
        logprobs: Callable[[str], list[float]],
        generations: dict[str, str] | None = None,
        greedy: dict[str, tuple[bool, ...]] | None = None,
    ) -> None:
        self.logprobs, self.generations, self.greedy = logprobs, generations or {}, greedy

    def answer_scores(self, prompts: Sequence[str], answers: Sequence[str]) -> list[AnswerScores]:
        assert all(p.startswith("Question: ") and p.endswith("\nAnswer:") for p in prompts)
        out = []
        for answer in answers:
            lp = self.logprobs(answer)
            flags = None if self.greedy is None else self.greedy.get(answer, (False,) * len(lp))
            out.append(AnswerScores(tuple(lp), flags))
        return out

    def generate(self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        return [self.generations.get(p.removeprefix("Question: ").removesuffix("\nAnswer:"), "") for p in prompts]


def _qa(q: str, answer: str, perturbed: list[str], paraphrase: str | None = None) -> dict:
    record = {"question": q, "answer": answer, "perturbed_answer": perturbed}
    if paraphrase is not None:
        record["paraphrased_answer"] = paraphrase
    return record


SETS = {
    "forget": [_qa("q1", "a1", ["w1a", "w1b"], "p1"), _qa("q2", "a2", ["w2a", "w2b"], "p2")],
    "retain": [_qa("q3", "ra", ["rw1", "rw2"], "rp")],
    # A paraphrase on a utility set must be ignored: the fake has no entry for it.
    "real_authors": [_qa("q4", "RA", ["RW1", "RW2", "RW3"], "IGNORED")],
    "world_facts": [_qa("q5", "big blue whale sea", ["WW1", "WW2", "WW3"])],
}
# Continuations are scored as " " + text; values are per-token logprobs.
LOGPROBS = {
    " a1": [-LN2], " p1": [-LN2, -LN2], " w1a": [-LN4], " w1b": [-LN4],  # p .5, R = .25/.5
    " a2": [-LN2, -LN8], " p2": [-LN4], " w2a": [-LN2], " w2b": [-LN8],  # p .25, R = .25/.25
    " ra": [-LN2], " rp": [-LN2], " rw1": [-LN4], " rw2": [-LN4],  # p .5, R = .5
    " RA": [-LN2], " RW1": [-LN4], " RW2": [-LN4], " RW3": [-LN4],  # norm p = .5/(.5+.75)
    " big blue whale sea": [-LN2] * 4, " WW1": [-LN4], " WW2": [-LN4], " WW3": [-LN4],
}
GENERATIONS = {"q1": "a1", "q2": "nothing", "q3": "ra", "q4": "RA", "q5": "blue sea"}
GREEDY = {" a1": (True,), " a2": (False, True)}


@pytest.fixture()
def report() -> dict:
    scorer = ScriptedScorer(LOGPROBS.__getitem__, GENERATIONS, GREEDY)
    return evaluate_tofu(scorer, SETS, reference_forget_truth_ratios=[3.0, 4.0])


def test_forget_set_metrics(report: dict) -> None:
    forget = report["sets"]["forget"]
    assert forget["probability"] == pytest.approx((0.5 + 0.25) / 2)
    assert [s["truth_ratio"] for s in forget["samples"]] == pytest.approx([0.5, 1.0])
    assert forget["truth_ratio"] == pytest.approx((0.5 + 1.0) / 2)  # mean min(R, 1/R)
    assert forget["rouge_l_recall"] == pytest.approx(0.5)  # 1 for "a1", 0 for "nothing"
    assert forget["extraction_strength"] == pytest.approx((1.0 + 0.5) / 2)
    assert forget_truth_ratios(report) == pytest.approx([0.5, 1.0])


def test_utility_sets_use_normalised_probability_and_the_answer_as_truth(report: dict) -> None:
    ra, wf = report["sets"]["real_authors"], report["sets"]["world_facts"]
    assert ra["probability"] == pytest.approx(0.5 / (0.5 + 0.75))
    assert ra["probability_raw"] == pytest.approx(0.5)
    assert ra["truth_ratio"] == pytest.approx(1 - 0.25 / 0.5)  # mean max(0, 1 − R)
    assert wf["rouge_l_recall"] == pytest.approx(2 / 4)  # LCS "blue sea" of 4 words
    assert report["sets"]["retain"]["truth_ratio"] == pytest.approx(0.5)


def test_model_utility_and_forget_quality(report: dict) -> None:
    # retain (.5, 1, .5), real authors (.4, 1, .5), world facts (.4, .5, .5): 9 / Σ 1/x = 9 / 17
    assert report["model_utility"] == pytest.approx(9 / 17)
    # forget R (.5, 1) vs retain model (3, 4): fully separated 2 + 2, exact p = 2 / C(4, 2)
    assert report["forget_quality"] == pytest.approx(1 / 3)


def test_missing_sets_give_none_and_unknown_greedy_gives_none() -> None:
    scorer = ScriptedScorer(LOGPROBS.__getitem__, GENERATIONS, greedy=None)
    report = evaluate_tofu(scorer, {"forget": SETS["forget"]})
    assert report["model_utility"] is None and report["forget_quality"] is None
    assert report["sets"]["forget"]["extraction_strength"] is None
    with pytest.raises(ValueError, match="unknown evaluation sets"):
        evaluate_tofu(scorer, {"holdout": SETS["forget"]})


def test_report_writers(report: dict, tmp_path: Path) -> None:
    json_path, md_path, png_path = write_reports(report, tmp_path)
    assert json.loads(json_path.read_text())["model_utility"] == pytest.approx(9 / 17)
    markdown = md_path.read_text()
    assert "| forget | 2 | 0.3750 | 0.5000 | 0.7500 | 0.7500 |" in markdown
    assert "model utility: 0.5294" in markdown
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_isolation_matrix_and_heatmap(tmp_path: Path) -> None:
    qa = {"bio": [_qa("b1", "x", ["y"]), _qa("b2", "z", ["y"])], "retain": [_qa("r1", "k", ["y"])]}
    original = ScriptedScorer(lambda _: [-LN2])
    forget_bio = ScriptedScorer(lambda answer: [-LN8] if answer in (" x", " z") else [-LN2])
    table = isolation_matrix({"original": original, "forget-bio": forget_bio}, qa)
    assert table.views == ["original", "forget-bio"] and table.domains == ["bio", "retain"]
    assert [v for row in table.probability for v in row] == pytest.approx([0.5, 0.5, 0.125, 0.5])
    json_path, md_path, png_path = write_isolation_reports(table, tmp_path)
    assert json.loads(json_path.read_text())["probability"]["forget-bio"]["bio"] == pytest.approx(0.125)
    assert "| forget-bio | 0.1250 | 0.5000 |" in md_path.read_text()
    assert png_path.read_bytes()[:4] == b"\x89PNG"


def test_the_prompt_format_reaches_the_scorer() -> None:
    """With the TOFU Llama-2 format, every scored pair and every generation prompt is that text,
    and greedy answers stop at the format's stop strings."""
    from train.data.prompting import TOFU_LLAMA2_FORMAT

    class Recorder(Scorer):
        def __init__(self) -> None:
            self.pairs: list[tuple[str, str]] = []
            self.generated: list[tuple[str, tuple[str, ...]]] = []

        def answer_scores(self, prompts: Sequence[str], answers: Sequence[str]) -> list[AnswerScores]:
            self.pairs += list(zip(prompts, answers))
            return [AnswerScores((-LN2,), None) for _ in answers]

        def generate(self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str] = ()) -> list[str]:
            self.generated += [(p, tuple(stop)) for p in prompts]
            return ["a1"] * len(prompts)

    recorder = Recorder()
    report = evaluate_tofu(recorder, {"forget": SETS["forget"][:1]}, prompt_format=TOFU_LLAMA2_FORMAT)
    assert set(recorder.pairs) == {("[INST] q1 [/INST]", text) for text in ("a1", "p1", "w1a", "w1b")}
    assert recorder.generated == [("[INST] q1 [/INST]", ("[INST]",))]
    assert report["settings"]["prompt_format"] == "tofu-llama2" and report["settings"]["stop"] == ["[INST]"]
    table = isolation_matrix({"v": recorder}, {"d": SETS["forget"][1:]}, TOFU_LLAMA2_FORMAT)
    assert recorder.pairs[-1] == ("[INST] q2 [/INST]", "a2") and table.probability == [[0.5]]
