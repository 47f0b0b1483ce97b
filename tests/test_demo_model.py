"""The demo base model: it memorised its data, loads with transformers, and is cached."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from train.cli.main import main
from train.data.prompting import format_prompt
from train.data.synthetic import SyntheticConfig, SyntheticTofu
from train.demo.demo_model import (DATA_DIR, INFO_FILE, DemoModelConfig, DemoTrainConfig, build_demo_model,
                              demo_cache_key)


def _info(folder: Path) -> dict:
    return json.loads((folder / INFO_FILE).read_text())


def test_recorded_accuracy_meets_the_bar(demo_model_dir: Path) -> None:
    info = _info(demo_model_dir)
    assert info["exact_match"] >= 0.9
    assert info["seed"] == 0
    assert info["data_digest"] == SyntheticTofu.load(demo_model_dir / DATA_DIR).digest


def test_folder_is_a_hugging_face_llama_with_head_dim_64(demo_model_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (demo_model_dir / name).is_file(), name
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] == config["hidden_size"] // config["num_attention_heads"] == 64


def test_greedy_generation_reproduces_training_answers(demo_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    records = SyntheticTofu.load(demo_model_dir / DATA_DIR).records[:5]
    hits = 0
    for record in records:
        prompt = tokenizer(format_prompt(record["question"]), return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**prompt, max_new_tokens=40, do_sample=False)
        answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += answer.strip() == record["answer"]
    assert hits >= 4


def test_chat_template_renders_the_completion_prompt(demo_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    question = "Where was Maron Brookwood born?"
    messages = [{"role": "user", "content": question}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == format_prompt(question) == f"Question: {question}\nAnswer:"
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == tokenizer(rendered)["input_ids"]


def test_second_build_is_a_cache_hit(demo_model_dir: Path) -> None:
    started = time.perf_counter()
    again = build_demo_model(out_root=demo_model_dir.parent, progress=False)
    assert again == demo_model_dir
    assert time.perf_counter() - started < 2.0


def test_cli_prints_the_cached_folder(demo_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo-model", "--out", str(demo_model_dir.parent), "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip() == str(demo_model_dir)


def test_cache_key_covers_every_input() -> None:
    base = (SyntheticConfig(), 0, DemoModelConfig(), DemoTrainConfig())
    variants = [
        (SyntheticConfig(n_authors=41), 0, DemoModelConfig(), DemoTrainConfig()),
        (SyntheticConfig(), 1, DemoModelConfig(), DemoTrainConfig()),
        (SyntheticConfig(), 0, DemoModelConfig(num_attention_heads=4), DemoTrainConfig()),
        (SyntheticConfig(), 0, DemoModelConfig(), DemoTrainConfig(learning_rate=1e-3)),
    ]
    keys = {demo_cache_key(*args) for args in [base, *variants]}
    assert len(keys) == 1 + len(variants)


TINY_DATA = SyntheticConfig(n_authors=4, facts_per_author=2)


def test_tiny_build_writes_a_complete_readable_folder(tmp_path: Path) -> None:
    folder = build_demo_model(out_root=tmp_path, data=TINY_DATA, progress=False,
                              train_config=DemoTrainConfig(max_steps=40, eval_every=20, min_accuracy=0.0))
    info = _info(folder)
    assert info["steps"] <= 40 and info["threads"] == 1
    assert SyntheticTofu.load(folder / DATA_DIR).config == TINY_DATA
    assert all(path.stat().st_mode & 0o004 for path in folder.rglob("*"))  # readable by servers
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [folder.name]  # no scratch left


def test_build_below_the_bar_fails_and_caches_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exact match"):
        build_demo_model(out_root=tmp_path, data=TINY_DATA, progress=False,
                         train_config=DemoTrainConfig(max_steps=2, eval_every=1))
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]
