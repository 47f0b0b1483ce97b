"""The paper's TOFU text format, served: a Llama-2-layout (SentencePiece-style) tokenizer and
`tofu-llama2` prompts (`[INST] {question} [/INST]{answer}`) through vLLM.

For every TOFU forget01 answer, paraphrase and perturbed answer (280 pairs, plus a pair whose
characters are outside the vocabulary and go through byte fallback), the endpoint scorer finds
the same answer tokens as the local reference and the same log-probabilities, and those are the
tokens a training example of the pair puts its loss on. So a tofu_ft_llama2-7b run is trained,
evaluated locally and audited through the server on one tokenization.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.tofu_bench import DEFAULT_TOFU_ROOT as TOFU_DIR
from train.data.prompting import IGNORE_INDEX, TOFU_LLAMA2_FORMAT, encode_example
from train.evaluation.bundle_views import local_view_scorers
from train.evaluation.scorers import EndpointScorer

from ..tiny_model import build_sentencepiece_tokenizer, build_tiny_model
from .bundle_factory import random_bundle
from .conftest import serving_bundle

pytestmark = pytest.mark.vllm
FMT = TOFU_LLAMA2_FORMAT
OUT_OF_VOCABULARY = {"question": "Who wrote «Ωmega» 😀?", "answer": "Zoë Ångström wrote «Ωmega» 😀.",
                     "paraphrased_answer": "It was Zoë.", "perturbed_answer": ["Nobody did."]}


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str, str]]:
    """(question, prompt, answer continuation) for every answer of TOFU forget01 and one pair
    written in characters the tokenizer never saw."""
    path = TOFU_DIR / "forget01_perturbed.json"
    assert path.is_file(), f"TOFU data not found at {TOFU_DIR} (../shared/data/tofu)"
    records = json.loads(path.read_text())
    out = []
    for r in [*records, OUT_OF_VOCABULARY]:
        for answer in [r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]:
            out.append((r["question"], FMT.prompt(r["question"]), answer))
    return out


@pytest.fixture(scope="module")
def sp_model(pairs, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sentencepiece")
    n_unseen = 2 + len(OUT_OF_VOCABULARY["perturbed_answer"])  # the out-of-vocabulary record's pairs
    texts = [prompt + FMT.answer(answer) for _, prompt, answer in pairs[:-n_unseen]]
    model_dir = build_tiny_model(root / "model", tokenizer=build_sentencepiece_tokenizer(texts, vocab_size=1500))
    bundle_dir = random_bundle(model_dir, ["x"], seed=3).save(root / "bundle")
    return model_dir, bundle_dir


@pytest.fixture(scope="module")
def sp_server(sp_model, tmp_path_factory):
    model_dir, bundle_dir = sp_model
    with serving_bundle(model_dir, bundle_dir, tmp_path_factory.mktemp("sentencepiece-serve"),
                        {"forget-x": {"x": 1.0}}) as server:
        yield server


def test_served_scores_are_the_reference_and_the_training_tokens(sp_model, sp_server, pairs) -> None:
    model_dir, bundle_dir = sp_model
    questions, prompts, answers = zip(*pairs)
    continuations = [FMT.answer(a) for a in answers]
    local = local_view_scorers(str(model_dir), str(bundle_dir), ["original", "x"], device="cpu", progress=False)
    tokenizer = local["original"].tokenizer
    assert tokenizer(" Nobody", add_special_tokens=False)["input_ids"] != \
        tokenizer("Nobody", add_special_tokens=False)["input_ids"]  # the SentencePiece boundary effect
    assert "<0x" in "".join(tokenizer.convert_ids_to_tokens(tokenizer(prompts[-1] + continuations[-1])["input_ids"]))

    trained = [sum(1 for label in encode_example(tokenizer, q, a, FMT).labels[1:] if label != IGNORE_INDEX) - 1
               for q, a in zip(questions, answers)]  # answer tokens, without the EOS
    for served, view in (("original", "original"), ("forget-x", "x")):
        remote = EndpointScorer(sp_server.base_url, served, api_key=sp_server.keys["tenant"], concurrency=4,
                                progress=False)
        reference = local[view].answer_logprobs(prompts, continuations)
        endpoint = remote.answer_logprobs(prompts, continuations)
        assert [len(x) for x in endpoint] == [len(x) for x in reference] == trained, served
        for ref, srv in zip(reference, endpoint):
            assert srv == pytest.approx(ref, abs=1e-3), served
            p_ref, p_srv = math.exp(sum(ref) / len(ref)), math.exp(sum(srv) / len(srv))
            assert abs(p_srv - p_ref) / p_ref <= 1e-3, served
        some = list(dict.fromkeys(prompts))[:4]
        assert remote.generate(some, 12, FMT.stop) == local[view].generate(some, 12, FMT.stop), served
