"""`alter-train eval` end to end on a tiny saved Llama, synthetic data and a two-head bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alter_serve.core.bundle import BundleError
from benchmarks.tofu_bench import DEFAULT_TOFU_ROOT as TOFU_DIR
from alter_serve.core.fingerprint import fingerprint
from train.data.synthetic import generate
from train.cli.main import main
from train.evaluation.bundle_views import local_view_scorers, resolve_prompt_format
from train.evaluation.eval_sets import load_eval_sets
from train.alter.modeling import inject, to_bundle

SUBDOMAINS = ("mystery", "fantasy", "poetry")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/model (HF folder, tokenizer, data/) and <root>/bundle (heads mystery, fantasy)."""
    root = tmp_path_factory.mktemp("eval_cli")
    dataset = generate(n_authors=3, facts_per_author=2, subdomains=SUBDOMAINS, seed=1)
    model_dir = root / "model"
    dataset.save(model_dir / "data")
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']} {r['paraphrased_answer']} "
             + " ".join(r["perturbed_answer"]) for r in dataset.records]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    alter = inject(model, ["q_proj", "v_proj"], rank=8, alpha=16.0, forget_heads=["mystery", "fantasy"])
    with torch.no_grad():
        for b in alter.lora_B_parameters():
            b.normal_(std=0.5)  # non-zero heads, so that views differ from the base model
    to_bundle(alter, str(model_dir), fingerprint(model_dir)).save(root / "bundle")
    return root


def test_synthetic_sets_and_isolation_columns(workdir: Path) -> None:
    sets, by_domain = load_eval_sets("synthetic", str(workdir / "model"), forget=["fantasy"])
    assert {r["subdomain"] for r in sets["forget"]} == {"fantasy"}
    assert "fantasy" not in {r["subdomain"] for r in sets["retain"]}
    assert list(by_domain) == ["fantasy", "retain"] and by_domain["retain"] == sets["retain"]


def test_bundle_views_share_one_model(workdir: Path) -> None:
    model = str(workdir / "model")
    plain = local_view_scorers(model, None, ["original"], progress=False)["original"]
    views = local_view_scorers(model, str(workdir / "bundle"), ["original", "retain", "mystery"], progress=False)
    prompts, answers = ["Question: Who?\nAnswer:"] * 2, [" Someone wrote it.", " A poet"]
    base = plain.answer_logprobs(prompts, answers)
    # "original" switches the adapters off: the base model's numbers exactly.
    for got, expected in zip(views["original"].answer_logprobs(prompts, answers), base):
        assert got == pytest.approx(expected, abs=1e-5)
    retain = views["retain"].answer_logprobs(prompts, answers)
    mystery = views["mystery"].answer_logprobs(prompts, answers)
    assert retain[0] != pytest.approx(base[0], abs=1e-3)
    assert mystery[0] != pytest.approx(retain[0], abs=1e-3)
    assert views["retain"].model is views["mystery"].model  # one copy of the weights


def test_cmd_eval_writes_reports(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = workdir / "out"
    code = main(["eval", "--model", str(workdir / "model"), "--bundle", str(workdir / "bundle"),
                 "--view", "mystery", "--data", "synthetic", "--forget", "mystery", "--limit", "2",
                 "--max-new-tokens", "3", "--isolation", "original,mystery", "--out", str(out),
                 "--device", "cpu"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sets"]["forget"]["n"] == 2 and report["model_utility"] is None
    assert report["settings"]["prompt_format"] == "qa"
    assert 0.0 < report["sets"]["retain"]["probability"] < 1.0
    isolation = json.loads((out / "isolation.json").read_text())
    assert isolation["views"] == ["original", "mystery"] and isolation["domains"] == ["mystery", "retain"]
    assert (out / "report.png").is_file() and (out / "isolation.png").is_file()
    assert "| forget | 2 |" in capsys.readouterr().out


def test_prompt_format_comes_from_the_flag_then_the_bundle(workdir: Path, tmp_path: Path) -> None:
    bundle = workdir / "bundle"
    assert resolve_prompt_format(None, None).name == "qa"
    assert resolve_prompt_format(None, str(bundle)).name == "qa"  # no training config recorded
    trained = tmp_path / "trained"
    shutil.copytree(bundle, trained)
    manifest = json.loads((trained / "manifest.json").read_text())
    manifest["training"] = {"config": {"data": {"prompt_format": "tofu-llama2"}}}
    (trained / "manifest.json").write_text(json.dumps(manifest))
    assert resolve_prompt_format(None, str(trained)).name == "tofu-llama2"
    assert resolve_prompt_format("qa", str(trained)).name == "qa"
    manifest["training"] = {"config": {"data": {"prompt_format": {"template": "no field"}}}}
    (trained / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="prompt_format"):
        resolve_prompt_format(None, str(trained))


def test_cmd_eval_rejects_bundle_flags_with_endpoint(workdir: Path) -> None:
    with pytest.raises(SystemExit, match="--bundle/--view are for a local model"):
        main(["eval", "--endpoint", "http://localhost:1", "--model", "v", "--view", "retain",
              "--data", "synthetic", "--out", str(workdir / "x")])




def test_tofu_sets() -> None:
    assert (TOFU_DIR / "retain_perturbed.json").is_file(), f"TOFU data not found at {TOFU_DIR} (../shared/data/tofu)"
    sets, by_domain = load_eval_sets(str(TOFU_DIR), forget_split="forget01")
    assert {k: len(v) for k, v in sets.items()} == {"forget": 40, "retain": 400, "real_authors": 100, "world_facts": 117}
    assert by_domain == {}
    assert len(sets["forget"][0]["perturbed_answer"]) == 5 and "paraphrased_answer" in sets["retain"][0]
    assert len(sets["world_facts"][0]["perturbed_answer"]) == 3


def test_a_view_can_weight_each_head(workdir: Path) -> None:
    """`NAME*W` scales a head: at W = 1 it is the plain name, at W = 0 the retain head alone."""
    views = local_view_scorers(str(workdir / "model"), str(workdir / "bundle"),
                               ["retain", "mystery", "mystery*1", "mystery*0", "mystery*0.5"], progress=False)
    prompts, answers = ["Question: Who?\nAnswer:"], [" Someone wrote it."]
    got = {name: scorer.answer_logprobs(prompts, answers)[0] for name, scorer in views.items()}
    assert got["mystery*1"] == pytest.approx(got["mystery"], abs=1e-5)
    assert got["mystery*0"] == pytest.approx(got["retain"], abs=1e-5)
    assert got["mystery*0.5"] not in (pytest.approx(got["mystery"], abs=1e-3), pytest.approx(got["retain"], abs=1e-3))


@pytest.mark.parametrize("view", ["mystery*2", "mystery*x", "mystery*", "*0.5", "mystery+mystery",
                                  "calibrated:mystery*0.5"])
def test_a_bad_head_weight_is_refused_with_the_view_named(workdir: Path, view: str) -> None:
    with pytest.raises(SystemExit, match="view"):
        local_view_scorers(str(workdir / "model"), str(workdir / "bundle"), [view], progress=False)
