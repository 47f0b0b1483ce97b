"""Training runs on a tiny random model: outputs, resume, baselines, k-means sub-domains, config errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from alter_serve.core.bundle import load_bundle
from alter_serve.core.fingerprint import fingerprint, module_shapes
from alter_serve.core.views import View, compose
from tests.tiny_model import build_tiny_model
from train import checkpoint as checkpoint_module
from train.alter import alter_run as alter_run_module
from train.run_config import ConfigError, TrainConfig, load_config
from train.data.synthetic import generate
from train.data.prompting import encode_example
from train.examples import answer_tokens
from train.alter.alter_run import AlterRun
from train.run import run

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    dataset = generate(n_authors=8, facts_per_author=2, subdomains=("alpha", "beta", "gamma", "delta"), seed=3)
    return dataset.save(tmp_path_factory.mktemp("data") / "synthetic")


def tiny_config(model_dir, data_dir, out, **overrides) -> TrainConfig:
    raw = {
        "name": "tiny", "method": "alter",
        "model": {"path": str(model_dir)},
        "data": {"kind": "synthetic", "path": str(data_dir), "forget_subdomains": ["alpha", "beta"], "max_length": 48},
        "adapter": {"rank": 8, "alpha": 16, "target_modules": TARGETS, "init_tokens": 64},
        "entropy": {"split": "quantile", "quantile": 0.5},
        "optim": {"epochs": 2, "phase1_epochs": 1, "batch_size": 2, "lr_A": 1e-3, "lr_B": 1e-2, "lr": 1e-3,
                  "router_epochs": 2},
        "runtime": {"output_dir": str(out), "progress": False, "cache_dir": str(out / "cache"), "device": "cpu"},
    }
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    return TrainConfig.model_validate(raw)


def test_alter_run_writes_bundle_report_and_plots(model_dir, data_dir, tmp_path, monkeypatch) -> None:
    import train.optim as optim_module

    clipped = []
    real_clip = optim_module.clip_head_grad_norms
    monkeypatch.setattr(optim_module, "clip_head_grad_norms", lambda *a, **k: clipped.append(1) or real_clip(*a, **k))
    # A router budget far below the retain set's tokens (the retain set comes first in the data).
    result = run(tiny_config(model_dir, data_dir, tmp_path / "run", optim={"router_tokens_per_label": 120}))
    for name in ("report.json", "loss_curve.png", "entropy_hist.png", "checkpoint/state.pt"):
        assert (result.run_dir / name).is_file(), name
    bundle = load_bundle(result.bundle_dir, module_shapes(model_dir), fingerprint(model_dir))
    assert bundle.forget_heads == ["alpha", "beta"]
    assert bundle.manifest.base_model.fingerprint == fingerprint(model_dir)
    assert bundle.manifest.training["method"] == "alter" and "router.weight" not in bundle.manifest.training
    assert set(bundle.router) == {"weight"} and bundle.manifest.router.kind == "entropy_softmax"
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["trainable_parameters"]["total"] == sum(t.numel() for t in bundle.to_tensors().values()
                                                          if t.dim() == 2 and t.shape[0] != 3)
    assert report["phases"]["phase1"]["tokens"] > 0 and report["phases"]["phase2"]["steps"] == 2 * 2
    assert report["phases"]["phase2"]["tokens_per_s"] > 0 and report["peak_memory_bytes"] > 0
    assert 0.45 < report["entropy"]["high_fraction"] < 0.55  # the quantile split at 0.5
    assert set(report["summary"]["per_view"]) == {"alpha", "beta"}
    assert {"view:forget-all", "view:forget-alpha", "view:retain-only", "routed", "base"} <= set(report["eval"])
    assert len(report["losses"]["phase2/nll_retain"]) == 4 and len(report["losses"]["phase2/ihl_alpha"]) == 4
    assert all(isinstance(v, float) for values in report["losses"].values() for v in values)
    assert len(clipped) == 4  # Phase II clips per head, every step
    # The router trains on every label, each within its own budget (plus at most one sequence).
    router_tokens = report["phases"]["router"]["tokens_per_label"]
    assert set(router_tokens) == {"retain", "alpha", "beta"}
    assert all(120 <= n < 120 + 48 for n in router_tokens.values()), router_tokens
    # Training cost is the training phases' alone; setup and evaluation are reported apart.
    phases = report["phases"]
    assert report["train_time_s"] == pytest.approx(phases["phase1"]["wall_s"] + phases["phase2"]["wall_s"], abs=2e-3)
    assert report["tokens_per_s"] == pytest.approx(
        (phases["phase1"]["tokens"] + phases["phase2"]["tokens"]) / report["train_time_s"], rel=1e-2)
    assert report["peak_memory_bytes"] == max(phases[p]["peak_memory_bytes"] for p in ("phase1", "phase2"))
    assert set(report["stages"]) == {"load", "entropy", "head_init", "evaluation", "calibration"}
    assert all(stage["wall_s"] > 0 and stage["peak_memory_bytes"] > 0 for stage in report["stages"].values())
    assert "peak_memory_scope" in report and report["data"]["truncated_examples"] == {}


def test_resume_continues_after_the_last_finished_epoch(model_dir, data_dir, tmp_path, monkeypatch) -> None:
    config = tiny_config(model_dir, data_dir, tmp_path / "run", optim={"epochs": 3, "router_epochs": 0})
    real_save = checkpoint_module.save_state
    saves = []

    def crash_after_first_phase2_epoch(run_dir, state):
        real_save(run_dir, state)
        saves.append(dict(state.done))
        if state.done.get("phase2") == 1:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr("train.training_run.save_state", crash_after_first_phase2_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    monkeypatch.setattr("train.training_run.save_state", real_save)
    result = run(config, resume=True)
    state = checkpoint_module.load_state(result.run_dir, checkpoint_module.config_digest(config.model_dump(mode="json")))
    assert state.done == {"phase1": 1, "phase2": 3}
    # Phase I did not run again and Phase II ran exactly 2 more epochs of 2 steps.
    assert len(result.report["losses"]["phase2/nll_retain"]) == 3 * 2
    assert result.report["phases"]["phase2"]["steps"] == 3 * 2
    # The resumed run is the uninterrupted run: same data order (a function of seed and epoch),
    # same random views (the steps' RNG is in the checkpoint), so the same losses and weights.
    whole = run(tiny_config(model_dir, data_dir, tmp_path / "whole", optim={"epochs": 3, "router_epochs": 0}))
    assert result.report["losses"] == whole.report["losses"]
    resumed, uninterrupted = load_bundle(result.bundle_dir).to_tensors(), load_bundle(whole.bundle_dir).to_tensors()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)


def test_resume_refuses_a_checkpoint_of_another_config(model_dir, data_dir, tmp_path) -> None:
    run(tiny_config(model_dir, data_dir, tmp_path / "run", optim={"epochs": 1, "router_epochs": 0}))
    with pytest.raises(ValueError, match="different configuration"):
        run(tiny_config(model_dir, data_dir, tmp_path / "run", optim={"epochs": 2, "router_epochs": 0}), resume=True)
    # An owner of the run folder (the TOFU benchmark) drops the stale checkpoint instead, and only that one.
    other = tiny_config(model_dir, data_dir, tmp_path / "run", optim={"epochs": 2, "router_epochs": 0})
    same = tiny_config(model_dir, data_dir, tmp_path / "run", optim={"epochs": 1, "router_epochs": 0})
    digest = lambda config: checkpoint_module.config_digest(config.model_dump(mode="json"))  # noqa: E731
    assert checkpoint_module.discard_stale_state(tmp_path / "run", digest(same)) is False
    assert checkpoint_module.discard_stale_state(tmp_path / "run", digest(other)) is True
    assert not checkpoint_module.checkpoint_path(tmp_path / "run").exists()
    assert checkpoint_module.discard_stale_state(tmp_path / "run", digest(other)) is False


@pytest.mark.parametrize("method", ["grad_ascent", "grad_diff", "npo"])
def test_lora_baselines_export_a_bundle_whose_view_is_the_lora(model_dir, data_dir, tmp_path, method) -> None:
    from peft import PeftModel

    result = run(tiny_config(model_dir, data_dir, tmp_path / "run", method=method, optim={"epochs": 1}))
    report = result.report
    assert report["peft"] == "lora" and report["phases"]["baseline"]["steps"] == 4
    assert len(report["losses"][f"baseline/{method}"]) == 4
    bundle = load_bundle(result.bundle_dir, module_shapes(model_dir), fingerprint(model_dir))
    composed = compose(bundle, View(name="baseline", forget={"forget": 1.0}), tmp_path / "views")
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    peft_model = PeftModel.from_pretrained(base, composed.path).eval()
    ids = torch.tensor([[5, 17, 33, 80, 120, 9]])
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(logits, merged, atol=1e-5)
    assert report["summary"]["scored_as"] == "model"


def test_full_parameter_npo_runs_and_exports_no_bundle(model_dir, data_dir, tmp_path) -> None:
    result = run(tiny_config(model_dir, data_dir, tmp_path / "run", method="npo", peft="full", optim={"epochs": 1}))
    assert result.bundle_dir is None and "bundle" not in result.report
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    assert result.report["trainable_parameters"]["total"] == n_params


def test_ablation_without_entropy_and_kmeans_subdomains(model_dir, data_dir, tmp_path) -> None:
    records = json.loads((data_dir / "full.json").read_text().splitlines()[0])
    forget = [r for r in records if r["subdomain"] in ("alpha", "beta")]
    retain = [r for r in records if r["subdomain"] not in ("alpha", "beta")]
    (tmp_path / "forget.json").write_text(json.dumps(forget))
    (tmp_path / "retain.json").write_text("\n".join(json.dumps(r) for r in retain))  # JSON lines work too
    config = tiny_config(model_dir, data_dir, tmp_path / "run", method="alter_no_entropy",
                         data={"kind": "json", "forget_file": str(tmp_path / "forget.json"),
                               "retain_file": str(tmp_path / "retain.json"), "subdomain_field": None,
                               "num_subdomains": 2, "forget_subdomains": []},
                         optim={"epochs": 1, "router_epochs": 0})
    result = run(config)
    bundle = load_bundle(result.bundle_dir)
    assert bundle.forget_heads == ["cluster-0", "cluster-1"]
    assert sum(result.report["data"]["heads"].values()) == len(forget)
    # Without entropy guidance Phase I trains on every answer token.
    labelled = result.report["entropy"]["tokens"]
    assert labelled > 0 and result.report["phases"]["phase1"]["tokens"] > 0


def test_config_errors_name_every_field(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmethod: magic\ndata: {kind: synthetic}\nadapter: {rank: 7}\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    message = str(info.value)
    assert "method" in message and "forget_subdomains" in message and "rank 7" in message


def test_shipped_configs_parse() -> None:
    demo = load_config("configs/demo.yaml")
    paper = load_config("configs/alter-paper.yaml")
    assert demo.data.forget_subdomains == ["mystery", "fantasy"]
    assert (paper.adapter.rank, paper.optim.lr_B, paper.optim.lr_A, paper.optim.lam) == (8, 1e-3, 1e-5, 0.01)
    assert (paper.optim.batch_size, paper.optim.epochs, paper.optim.beta, paper.optim.gamma) == (4, 3, 1.0, 1.0)
    assert (paper.entropy.q, paper.entropy.threshold) == (1.5, 1.2)
    # tofu_ft_llama2-7b was fine-tuned on TOFU's "[INST] q [/INST]a" text, the demo on "Question: …".
    assert (paper.data.fmt.name, demo.data.fmt.name) == ("tofu-llama2", "qa")


def test_config_prompt_formats(tmp_path) -> None:
    path = tmp_path / "fmt.yaml"
    base = "name: x\ndata: {kind: synthetic, forget_subdomains: [a], prompt_format: %s}\n"
    path.write_text(base % '{template: "Q: {question}\\nA:", stop: ["\\nQ:"]}')
    fmt = load_config(path).data.fmt
    assert (fmt.prompt("who"), fmt.answer("me"), fmt.stop) == ("Q: who\nA:", " me", ("\nQ:",))
    for bad, message in (("chatml", "unknown prompt format 'chatml'"),
                         ("{template: 'no field'}", "must contain {question} exactly once")):
        path.write_text(base % bad)
        with pytest.raises(ConfigError, match="data.prompt_format") as info:
            load_config(path)
        assert message in str(info.value)


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys) -> None:
    from train.cli.main import main

    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata: {kind: json}\n")
    with pytest.raises(SystemExit) as info:
        main(["run", "--config", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("alter-train: error: invalid training config") and "forget_file" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["run", "--config", str(tmp_path / "missing.yaml")])
    assert "cannot read training config" in capsys.readouterr().err


def test_config_refuses_what_would_silently_do_nothing(model_dir, data_dir, tmp_path) -> None:
    def error(**overrides) -> str:
        with pytest.raises(ValueError) as info:
            tiny_config(model_dir, data_dir, tmp_path, **overrides)
        return str(info.value)

    # A threshold no distribution can exceed for q ≥ 1 + 1/threshold, whatever the vocabulary.
    assert "S_q < 1/(q − 1) = 1" in error(entropy={"q": 2.0, "threshold": 1.2, "split": "threshold"})
    tiny_config(model_dir, data_dir, tmp_path, entropy={"q": 2.0, "threshold": 1.2, "split": "quantile"})
    tiny_config(model_dir, data_dir, tmp_path, method="npo", entropy={"q": 2.0, "threshold": 1.2, "split": "threshold"})
    # Devices: auto, cpu, cuda, cuda:N.
    assert "runtime.device 'gpu' is not supported" in error(runtime={"device": "gpu"})
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert tiny_config(model_dir, data_dir, tmp_path, runtime={"device": device}).runtime.device == device
    # forget_subdomains with k-means sub-domains would be ignored.
    assert "subdomain_field, which is null" in error(data={"kind": "json", "forget_file": "f", "retain_file": "r",
                                                          "subdomain_field": None, "num_subdomains": 2})


def test_setup_refuses_a_threshold_above_this_vocabularys_maximum(model_dir, data_dir, tmp_path) -> None:
    """q = 1.5 allows S_q up to 2 on a huge vocabulary (the config check passes), but the tiny
    model's 400 tokens cap it at 2 · (1 − 400^−½) = 1.9."""
    config = tiny_config(model_dir, data_dir, tmp_path, entropy={"q": 1.5, "threshold": 1.95, "split": "threshold"})
    with pytest.raises(ValueError, match=r"400 tokens.* = 1\.9, so Phase I"):
        AlterRun(config)


def _json_data(data_dir, tmp_path):
    records = json.loads((data_dir / "full.json").read_text().splitlines()[0])
    forget = [r for r in records if r["subdomain"] in ("alpha", "beta")]
    retain = [r for r in records if r["subdomain"] not in ("alpha", "beta")]
    (tmp_path / "forget.json").write_text(json.dumps(forget))
    (tmp_path / "retain.json").write_text(json.dumps(retain))
    return {"kind": "json", "forget_file": str(tmp_path / "forget.json"), "retain_file": str(tmp_path / "retain.json")}


def test_a_misspelled_forget_subdomain_is_refused_with_the_known_ones(model_dir, data_dir, tmp_path) -> None:
    data = _json_data(data_dir, tmp_path)
    config = tiny_config(model_dir, data_dir, tmp_path / "run", data={**data, "forget_subdomains": ["alpha", "btea"]})
    with pytest.raises(ValueError, match=r"\['btea'\] match no record's 'subdomain'.*\['alpha', 'beta'\]"):
        AlterRun(config)


def test_examples_whose_answer_is_truncated_away_are_left_out_and_counted(model_dir, data_dir, tmp_path) -> None:
    data = _json_data(data_dir, tmp_path)
    retain = json.loads((tmp_path / "retain.json").read_text())
    retain[0]["question"] = "Tell me " * 40 + "?"  # the prompt alone fills max_length = 48
    (tmp_path / "retain.json").write_text(json.dumps(retain))
    config = tiny_config(model_dir, data_dir, tmp_path / "run", data={**data, "forget_subdomains": ["alpha", "beta"]})
    with pytest.warns(UserWarning, match="1 of .* 'retain' examples have no answer token"):
        trainer = AlterRun(config)
    assert trainer.truncated == {"retain": 1} and len(trainer.retain_examples) == len(retain) - 1


def test_examples_are_encoded_in_the_configured_prompt_format(model_dir, data_dir, tmp_path) -> None:
    from train.data.prompting import TOFU_LLAMA2_FORMAT

    config = tiny_config(model_dir, data_dir, tmp_path / "run", data={"prompt_format": "tofu-llama2"})
    trainer = AlterRun(config)
    record = trainer.data.retain[0]
    example = trainer.retain_examples[0]
    expected = encode_example(trainer.tokenizer, record["question"], record["answer"], TOFU_LLAMA2_FORMAT)
    assert list(example.input_ids) == expected.input_ids[:config.data.max_length]
    assert trainer.tokenizer.decode(example.input_ids[:expected.prompt_length]).startswith("[INST] ")
    assert config.model_dump(mode="json")["data"]["prompt_format"] == "tofu-llama2"  # recorded in the bundle


def test_heads_start_from_a_seeded_random_sample_of_their_examples(model_dir, data_dir, tmp_path, monkeypatch) -> None:
    """Not the first rows of the data (one author's, in TOFU-style files)."""
    class Stop(Exception):
        pass

    seen: dict[str, list[tuple[int, ...]]] = {}

    def spy(alter, head_batches, init_scale, max_tokens):
        for head, batches in head_batches.items():
            seen[head] = [tuple(row[row_mask.bool()].tolist())
                          for ids, mask, _ in batches for row, row_mask in zip(ids, mask)]
        raise Stop

    monkeypatch.setattr(alter_run_module, "init_heads", spy)
    config = tiny_config(model_dir, data_dir, tmp_path / "run", adapter={"init_tokens": 40})
    samples = []
    for _ in range(2):
        trainer = AlterRun(config)
        with pytest.raises(Stop):
            trainer.train()
        samples.append(dict(seen))
    assert samples[0] == samples[1]  # seeded
    for head, examples in (("retain", trainer.retain_examples), ("alpha", trainer.forget_examples["alpha"])):
        sampled = samples[0][head]
        assert 0 < len(sampled) < len(examples)
        assert sampled != [e.input_ids for e in examples[: len(sampled)]]  # not the first rows
        assert sum(answer_tokens(e) for e in examples if e.input_ids in sampled) >= 40


def test_a_phase_meter_measures_the_peak_of_its_own_blocks_only() -> None:
    import mmap
    import os

    from train.runtime import PhaseMeter, peak_memory_bytes

    cpu = torch.device("cpu")
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("this platform cannot reset the RSS high-water mark")
    # 256 MiB of fresh pages, touched, then unmapped. Not a tensor: malloc may serve a big tensor
    # from heap memory that is resident already and keep it after `del`, so neither the peak nor
    # the RSS would move (seen in the full suite, where earlier tests leave a large heap behind).
    region = mmap.mmap(-1, 256 << 20)
    for offset in range(0, len(region), mmap.PAGESIZE):
        region[offset] = 1
    earlier_peak = peak_memory_bytes(cpu)
    region.close()
    with PhaseMeter("small", cpu) as meter:
        torch.ones(1024).sum()
    assert meter.peak_memory_bytes < earlier_peak - 128 * 2**20
    assert meter.summary()["peak_memory_bytes"] == meter.peak_memory_bytes


def test_the_frozen_npo_reference_is_a_compute_dtype_copy(model_dir) -> None:
    from types import SimpleNamespace

    from train.baselines.baseline_run import BaselineRun
    from train.baselines.baseline_steps import Reference

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    reference = Reference(model, "full", needed=True, dtype=torch.bfloat16)
    frozen = reference.frozen
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the trained model is untouched
    assert frozen.get_output_embeddings().weight is frozen.get_input_embeddings().weight  # still tied
    ids = torch.tensor([[5, 17, 33, 80, 120, 9]])
    with torch.no_grad():
        assert torch.allclose(frozen(input_ids=ids).logits.float(), model(input_ids=ids).logits, atol=0.1)
    # The trainer's choice: bf16 under CUDA bf16 autocast, the configured dtype otherwise.
    on = lambda device, bf16: SimpleNamespace(device=torch.device(device), compute_dtype=torch.float32,  # noqa: E731
                                              config=SimpleNamespace(runtime=SimpleNamespace(bf16=bf16)))
    assert BaselineRun._reference_dtype(on("cuda", True)) == torch.bfloat16
    assert BaselineRun._reference_dtype(on("cpu", True)) == torch.float32


def test_anchored_forget_heads_train_the_same_fused_or_sequential(model_dir, data_dir, tmp_path) -> None:
    """optim.forget_anchor: every forget head logs its anchor KL each step, and the fused step
    trains the heads to the weights the sequential reference step gives (same views, same data)."""
    common = {"forget_anchor": 1.0, "anchor_batch_size": 2, "retain_kl": 0.5, "router_epochs": 0}
    heads = {}
    for fused in (True, False):
        result = run(tiny_config(model_dir, data_dir, tmp_path / f"fused-{fused}",
                                 optim={**common, "fused_step": fused}, runtime={"report_eval": False}))
        report = json.loads((result.run_dir / "report.json").read_text())
        for head in ("alpha", "beta"):
            assert len(report["losses"][f"phase2/anchor_{head}"]) == 4
            assert all(value > 0 for value in report["losses"][f"phase2/anchor_{head}"])
        heads[fused] = load_bundle(result.bundle_dir, module_shapes(model_dir), fingerprint(model_dir)).to_tensors()
    assert heads[True].keys() == heads[False].keys()
    # Adam divides each gradient element by its own scale, so fp32 rounding in a near-zero element
    # can move it by up to lr: compare whole tensors, not elements.
    for name, tensor in heads[True].items():
        difference = (tensor - heads[False][name]).norm() / heads[False][name].norm().clamp(min=1e-12)
        assert float(difference) < 1e-3, name
