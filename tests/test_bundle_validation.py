"""A bundle is untrusted input (DESIGN.md §4): the manifest is parsed strictly (exact types, finite
numbers, no duplicate keys), every tensor value is bounded, router tensors have their kind's names
and shapes, every independent problem is listed at once, a calibration block must be consistent,
files are read without following links, and only linear projections of the base model can be
adapted. Whatever `save` writes, `load_bundle` reads back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from alter_serve.core import validation
from alter_serve.core.bundle import AlterBundle, BundleError, load_bundle
from alter_serve.core.manifest import MAX_MANIFEST_BYTES, Calibration, Manifest
from alter_serve.core.names import MANIFEST_FILE, WEIGHTS_FILE
from alter_serve.core.fingerprint import module_shapes
from alter_serve.core.validation import MAX_WEIGHT_MAGNITUDE
from train.alter.calibration import CalibrationSettings, calibrate_views

from .test_calibration import FakeAlter
from .test_registry import BASE_SHAPES, FINGERPRINT, Q0, make_bundle

V1 = "model.layers.1.self_attn.v_proj"


def manifest_dict(**changes) -> dict:
    manifest = json.loads(make_bundle(0).manifest.model_dump_json())
    manifest.update(changes)
    return manifest


def write(folder: Path, *, manifest: dict | None = None, text: str | None = None,
          tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A bundle folder written without `save`'s validation."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(make_bundle(0).to_tensors() if tensors is None else tensors, str(folder / WEIGHTS_FILE))
    (folder / MANIFEST_FILE).write_text(text if text is not None else json.dumps(manifest or manifest_dict()))
    return folder


def tensors_with(replace: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """make_bundle(0)'s tensors with some replaced or added."""
    return {**make_bundle(0).to_tensors(), **replace}


def problems_of(folder: Path, shapes=BASE_SHAPES) -> list[str]:
    with pytest.raises(BundleError) as info:
        load_bundle(folder, shapes, FINGERPRINT)
    return info.value.problems


def assert_listed(problems: list[str], *expected: str) -> None:
    text = "\n".join(problems)
    for snippet in expected:
        assert snippet in text, f"{snippet!r} not in:\n{text}"


# ---- 1, 7: strict manifest ---------------------------------------------------------------------

GOOD = json.dumps(manifest_dict())
DEEP: list = [1]
for _ in range(40):
    DEEP = [DEEP]

MANIFEST_CASES = {
    "alpha_1e309": (GOOD.replace('"alpha": 16.0', '"alpha": 1e309'), "alpha: Input should be a finite number"),
    "alpha_Infinity": (GOOD.replace('"alpha": 16.0', '"alpha": Infinity'), "alpha: Input should be a finite number"),
    "alpha_huge": (json.dumps(manifest_dict(alpha=1e300)), "alpha: Input should be less than or equal to 4096"),
    "scale_huge": (json.dumps(manifest_dict(alpha=1024.0)), "scale alpha/rank = 1024.0/8 = 128 exceeds 64"),
    "entropy_nan": (json.dumps(manifest_dict(entropy={"q": float("nan"), "threshold": 1.0})),
                    "entropy.q: Input should be a finite number"),
    "entropy_q_negative": (json.dumps(manifest_dict(entropy={"q": -5, "threshold": 1.0})), "entropy.q"),
    "router_param_nan": (json.dumps(manifest_dict(router={"kind": "entropy_softmax", "params": {"q": float("nan")}})),
                         "router.params.q: Input should be a finite number"),
    "router_param_unknown": (json.dumps(manifest_dict(router={"kind": "entropy_softmax", "params": {"a": [1] * 10}})),
                             "router.params.a: Extra inputs are not permitted"),
    "router_kind_unknown": (json.dumps(manifest_dict(router={"kind": "evil\u0000", "params": {}})), "router.kind"),
    "training_nan": (json.dumps(manifest_dict(training={"metrics": {"x": float("nan")}})),
                     "training.metrics.x: nan is not a finite number"),
    "training_too_deep": (json.dumps(manifest_dict(training={"x": DEEP})), "nested deeper than 32 levels"),
    "format_version_true": (json.dumps(manifest_dict(format_version=True)), "format_version: Input should be a valid integer"),
    "rank_string": (json.dumps(manifest_dict(rank="8")), "rank: Input should be a valid integer"),
    "rank_float": (json.dumps(manifest_dict(rank=8.0)), "rank: Input should be a valid integer"),
    "alpha_string": (json.dumps(manifest_dict(alpha="16")), "alpha: Input should be a valid number"),
    "duplicate_key": (GOOD.replace('"rank": 8', '"rank": 3, "rank": 8'), "key 'rank' appears more than once"),
    "duplicate_nested_key": (GOOD.replace('"retain": "retain"', '"retain": "retain", "retain": "retain"'),
                             "key 'retain' appears more than once"),
    "target_empty": (json.dumps(manifest_dict(target_modules=["q_proj", "v_proj", ""])), "target_modules.2: String should match"),
    "target_regex": (json.dumps(manifest_dict(target_modules=["q_proj", "v_proj", ".*"])), "target_modules.2: String should match"),
    "target_path": (json.dumps(manifest_dict(target_modules=["q_proj", "v_proj", "../../etc"])), "target_modules.2: String should match"),
    "target_none": (json.dumps(manifest_dict(target_modules=[])), "target_modules: List should have at least 1 item"),
    "name_or_path_control": (json.dumps(manifest_dict(base_model={"name_or_path": "x\n\u0000", "fingerprint": FINGERPRINT})),
                             "base_model.name_or_path"),
    "created_at_junk": (json.dumps(manifest_dict(created_at="not a date")), "created_at: Value error, must be an ISO 8601"),
    "created_at_number": (json.dumps(manifest_dict(created_at=12345)), "created_at: Value error, must be an ISO 8601"),
    "not_an_object": ("[1, 2]", "must be a JSON object"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_a_loose_or_non_finite_manifest_is_refused(case, tmp_path):
    text, expected = MANIFEST_CASES[case]
    assert_listed(problems_of(write(tmp_path / "b", text=text)), expected)


def test_a_manifest_that_is_not_utf8_is_refused(tmp_path):
    folder = write(tmp_path / "b")
    (folder / MANIFEST_FILE).write_bytes(b'{"rank": "\xff"}')
    assert_listed(problems_of(folder), "not UTF-8 text")


def test_the_files_train_writes_still_parse(tmp_path):
    """Timestamps as train writes them (isoformat with +00:00) and as pydantic writes them (Z)."""
    for stamp in ("2026-11-28T12:02:00.097660+00:00", "2026-11-28T12:02:00.097660Z", "2026-11-28T12:02:00"):
        loaded = load_bundle(write(tmp_path / stamp[-6:], manifest=manifest_dict(created_at=stamp)), BASE_SHAPES, FINGERPRINT)
        assert loaded.manifest.created_at.year == 2026


def test_in_code_manifests_refuse_non_finite_values():
    with pytest.raises(ValidationError, match="finite number"):
        Manifest.model_validate({**manifest_dict(), "alpha": float("inf")})
    with pytest.raises(ValidationError, match="finite number"):
        Calibration(min_retain_ratio=0.9, weights={1: float("nan")})


def test_save_refuses_what_load_would_refuse_and_round_trips_the_rest(tmp_path):
    bundle = make_bundle(0)
    bundle.manifest.training = {"metrics": {"ratio": float("nan")}}  # assignment: pydantic does not re-validate
    bundle.manifest.alpha = float("inf")
    with pytest.raises(BundleError) as info:
        bundle.save(tmp_path / "bad")
    assert_listed(info.value.problems, "manifest: alpha: Input should be a finite number",
                  "training.metrics.ratio: nan is not a finite number")
    assert not (tmp_path / "bad" / MANIFEST_FILE).exists()

    good = make_bundle(0)
    good.manifest.training = {"metrics": {"ratio": 0.97, "tokens": 12}, "config": {"lr": 1e-3, "tags": ["a", None, True]}}
    loaded = load_bundle(good.save(tmp_path / "good"), BASE_SHAPES, FINGERPRINT)
    assert loaded.content_hash() == good.content_hash()
    assert loaded.manifest == good.manifest
    again = load_bundle(loaded.save(tmp_path / "again"), BASE_SHAPES, FINGERPRINT)
    assert again.content_hash() == good.content_hash()


# ---- 2: bounded values ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [3e38, 7e4, -2 * MAX_WEIGHT_MAGNITUDE], ids=str)
def test_values_beyond_the_documented_magnitude_are_refused(value, tmp_path):
    tensors = tensors_with({f"{Q0}.B.retain": torch.full((16, 8), value), f"{V1}.lora_A": torch.full((8, 12), value)})
    assert_listed(problems_of(write(tmp_path / "b", tensors=tensors)),
                  f"{Q0}.B.retain: |value| reaches", f"{V1}.lora_A: |value| reaches", f"{MAX_WEIGHT_MAGNITUDE:g}")


def test_values_at_the_bound_are_accepted(tmp_path):
    tensors = tensors_with({f"{Q0}.B.retain": torch.full((16, 8), -MAX_WEIGHT_MAGNITUDE)})
    load_bundle(write(tmp_path / "b", tensors=tensors), BASE_SHAPES, FINGERPRINT)


# ---- 3: router tensors -----------------------------------------------------------------------------


def test_a_0d_router_tensor_is_refused_not_a_crash(tmp_path):
    tensors = tensors_with({"router.temperature": torch.tensor(0.8), "router.weight": torch.zeros(())})
    assert_listed(problems_of(write(tmp_path / "b", tensors=tensors)),
                  "router.temperature: router kind 'entropy_softmax' has no tensor 'temperature'",
                  "router.weight: must be at least 1-D, got a 0-d scalar")


def test_content_hash_handles_a_0d_tensor():
    bundle = make_bundle(0)
    bundle.router = {"scalar": torch.tensor(0.8)}
    assert len(bundle.content_hash()) == 64


def test_router_weight_must_fit_the_heads_and_have_its_params(tmp_path):
    manifest = manifest_dict(router={"kind": "entropy_softmax", "params": {"tau_high": 0.8}})
    tensors = tensors_with({"router.weight": torch.zeros(5, 10)})  # 2 forget heads: 1 + 2 rows
    assert_listed(problems_of(write(tmp_path / "b", manifest=manifest, tensors=tensors)),
                  "router.weight: shape (5, 10), expected (3, hidden + 2)",
                  "router.params: ['q', 'threshold'] missing")
    good = manifest_dict(router={"kind": "entropy_softmax", "params": {"q": 1.5, "threshold": 1.2}})
    loaded = load_bundle(write(tmp_path / "ok", manifest=good, tensors=tensors_with({"router.weight": torch.zeros(3, 10)})),
                         BASE_SHAPES, FINGERPRINT)
    assert loaded.router["weight"].shape == (3, 10)


def test_odd_router_names_are_refused(tmp_path):
    tensors = tensors_with({"router.": torch.zeros(1), "router.../../x": torch.ones(3)})
    assert_listed(problems_of(write(tmp_path / "b", tensors=tensors)), "'router.': name must match",
                  "'router.../../x': name must match")


def test_an_unexpected_exception_is_a_listed_problem(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("self.dim() cannot be 0")

    monkeypatch.setattr(validation, "_router_problems", broken)
    assert_listed(problems_of(write(tmp_path / "b")), "could not be validated (RuntimeError: self.dim() cannot be 0)")
    with pytest.raises(BundleError, match="could not be validated"):
        make_bundle(0).save(tmp_path / "saved")


# ---- 4: every independent problem --------------------------------------------------------------


def test_a_bad_manifest_does_not_hide_tensor_problems(tmp_path):
    tensors = tensors_with({"junk": torch.zeros(1)})
    tensors[f"{Q0}.B.retain"][0, 0] = float("nan")
    tensors[f"{Q0}.lora_A"] = tensors[f"{Q0}.lora_A"].double()
    assert_listed(problems_of(write(tmp_path / "b", manifest=manifest_dict(rank=0), tensors=tensors)),
                  "manifest.json: rank: Input should be greater than 0", "'junk': unknown name",
                  f"{Q0}.lora_A: dtype torch.float64 not allowed", f"{Q0}.B.retain: contains NaN or Inf")


def test_an_unknown_module_still_has_its_tensors_checked(tmp_path):
    tensors = {k.replace("layers.0", "layers.9"): v for k, v in make_bundle(0).to_tensors().items()}
    q9 = "model.layers.9.self_attn.q_proj"
    tensors[f"{q9}.B.forget.bio"] = torch.full((3, 3), float("nan"))
    assert_listed(problems_of(write(tmp_path / "b", tensors=tensors)),
                  f"{q9}: the base model has no such linear layer", f"{q9}.B.forget.bio: contains NaN or Inf",
                  f"{q9}.B.forget.bio: shape (3, 3), expected (16, 8)")


def test_a_bad_dtype_does_not_hide_a_bad_shape_and_a_bad_a_does_not_hide_its_heads(tmp_path):
    tensors = tensors_with({f"{Q0}.lora_A": torch.zeros(8, 7, dtype=torch.int32), f"{V1}.lora_A": torch.zeros(8, 12, 1)})
    tensors[f"{V1}.B.retain"] = torch.full((8, 8), float("inf"))
    assert_listed(problems_of(write(tmp_path / "b", tensors=tensors)),
                  f"{Q0}.lora_A: dtype torch.int32 not allowed", f"{Q0}.lora_A: shape (8, 7), expected (8, 12)",
                  f"{V1}.lora_A: must be 2-D [rank, in], got shape (8, 12, 1)", f"{V1}.B.retain: contains NaN or Inf")


def test_missing_weights_still_report_manifest_problems(tmp_path):
    folder = write(tmp_path / "b", manifest=manifest_dict(rank=3))
    (folder / WEIGHTS_FILE).unlink()
    assert_listed(problems_of(folder), "weights.safetensors: missing", "rank 3 is not one vLLM serves")


# ---- 5: calibration ----------------------------------------------------------------------------

CALIBRATION_CASES = {
    "empty": ({"min_retain_ratio": 0.9, "weights": {}}, "no weight for head count(s) [1, 2]"),
    "missing_count": ({"min_retain_ratio": 0.9, "weights": {"1": 1.0}}, "no weight for head count(s) [2]"),
    "increasing": ({"min_retain_ratio": 0.9, "weights": {"1": 0.5, "2": 0.9}},
                   "calibration.weights[2] = 0.9 exceeds weights[1] = 0.5"),
    "ratio_out_of_range": ({"min_retain_ratio": 0.9, "weights": {"1": 1.0, "2": 0.5}, "retain_ratio": {"7": 0.95, "-3": 0.95}},
                           "retain_ratio[7]: no calibrated weight"),
    "keys_1_and_01": ({"min_retain_ratio": 0.9, "weights": {"1": 0.9, "01": 0.5, "2": 0.5}}, "keys ['01'] are not head counts"),
    "key_1.0": ({"min_retain_ratio": 0.9, "weights": {"1.0": 0.9, "2": 0.5}}, "keys ['1.0'] are not head counts"),
    "ratio_below_floor": ({"min_retain_ratio": 0.9, "weights": {"1": 0.5, "2": 0.5}, "retain_ratio": {"1": 0.2}},
                          "retain_ratio[1]: 0.2 is below min_retain_ratio 0.9 although weights[1] > 0"),
    "examples_huge": ({"min_retain_ratio": 0.9, "weights": {"1": 1.0, "2": 0.5}, "retain_examples": 10**30},
                      "retain_examples: Input should be less than or equal to"),
}


@pytest.mark.parametrize("case", list(CALIBRATION_CASES))
def test_a_contradictory_calibration_is_refused(case, tmp_path):
    calibration, expected = CALIBRATION_CASES[case]
    assert_listed(problems_of(write(tmp_path / "b", manifest=manifest_dict(calibration=calibration))), expected)


def test_a_zero_weight_may_keep_less_than_the_floor(tmp_path):
    """ω = 0 means even the retain head alone missed the floor: that ratio is the honest record."""
    calibration = {"min_retain_ratio": 0.9, "weights": {"1": 0.0, "2": 0.0}, "retain_ratio": {"1": 0.5, "2": 0.5}}
    loaded = load_bundle(write(tmp_path / "b", manifest=manifest_dict(calibration=calibration)), BASE_SHAPES, FINGERPRINT)
    assert loaded.manifest.calibration.weights == {1: 0.0, 2: 0.0}


class CheapPairs(FakeAlter):
    """One head alone costs much retain, two together little: unconstrained, ω(2) > ω(1)."""

    def score(self, examples) -> float:
        self.calls += 1
        if self.weights is None:
            return 1.0
        on = [w for w in self.weights.values() if w]
        cost = 0.5 if len(on) == 1 else 0.01
        return 1.0 - cost * sum(w * w for w in on)


def test_the_producer_writes_non_increasing_weights_that_load(tmp_path):
    fake = CheapPairs(["bio", "cyber"], cost=0.0)
    calibration = calibrate_views(fake, ["x"], fake.score, CalibrationSettings(min_retain_ratio=0.95, steps=8))
    assert calibration.weights[2] <= calibration.weights[1] < 1.0
    assert all(calibration.retain_ratio[n] >= 0.95 for n in (1, 2))
    bundle = make_bundle(0)
    bundle.manifest.calibration = calibration
    loaded = load_bundle(bundle.save(tmp_path / "b"), BASE_SHAPES, FINGERPRINT)
    assert loaded.manifest.calibration == calibration


# ---- 6: only linear projections are adaptable ---------------------------------------------------


def test_module_shapes_are_the_linear_projections_only(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    save_file({
        "model.embed_tokens.weight": torch.zeros(100, 12),
        "lm_head.weight": torch.zeros(100, 12),
        "model.norm.weight": torch.zeros(12),
        "model.layers.0.input_layernorm.weight": torch.zeros(12),
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(16, 12),
        "model.layers.0.self_attn.v_proj.weight": torch.zeros(8, 12),
        "model.layers.0.mlp.down_proj.weight": torch.zeros(12, 24),
    }, str(model / "model.safetensors"))
    shapes = module_shapes(model)
    assert shapes == {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.0.self_attn.v_proj": (8, 12),
                      "model.layers.0.mlp.down_proj": (12, 24)}

    embed = "model.embed_tokens"
    tensors = tensors_with({f"{embed}.lora_A": torch.zeros(8, 12), f"{embed}.B.retain": torch.zeros(100, 8),
                            f"{embed}.B.forget.bio": torch.zeros(100, 8), f"{embed}.B.forget.cyber": torch.zeros(100, 8)})
    folder = write(tmp_path / "b", manifest=manifest_dict(target_modules=["q_proj", "v_proj", "embed_tokens"]), tensors=tensors)
    assert_listed(problems_of(folder, shapes), "model.embed_tokens: the base model has no such linear layer")


# ---- 8: heads of a module agree on out, even without base shapes -------------------------------


def test_heads_must_agree_on_out_without_base_shapes(tmp_path):
    bundle = make_bundle(0)
    bundle.forget["bio"][Q0] = torch.zeros(5, 8)
    with pytest.raises(BundleError) as info:
        bundle.save(tmp_path / "saved")
    assert_listed(info.value.problems, f"{Q0}.B.forget.bio: shape (5, 8), expected (16, 8)")
    folder = write(tmp_path / "raw", tensors=bundle.to_tensors())
    assert_listed(problems_of(folder, shapes=None), f"{Q0}.B.forget.bio: shape (5, 8), expected (16, 8)")


# ---- 9: files are regular files inside the folder -----------------------------------------------


@pytest.mark.parametrize("name", [MANIFEST_FILE, WEIGHTS_FILE])
def test_symlinked_files_are_not_followed(name, tmp_path):
    folder = write(tmp_path / "b")
    outside = tmp_path / f"outside-{name}"
    (folder / name).rename(outside)
    (folder / name).symlink_to(outside)  # a valid file, but outside the folder
    assert_listed(problems_of(folder), f"{name}: is a symbolic link")


def test_a_link_to_a_device_or_a_fifo_is_refused_without_reading_it(tmp_path):
    folder = write(tmp_path / "b")
    (folder / WEIGHTS_FILE).unlink()
    (folder / WEIGHTS_FILE).symlink_to("/dev/zero")
    (folder / MANIFEST_FILE).unlink()
    os.mkfifo(folder / MANIFEST_FILE)  # reading it would block forever
    assert_listed(problems_of(folder), f"{WEIGHTS_FILE}: is a symbolic link", f"{MANIFEST_FILE}: not a regular file")


def test_an_oversized_manifest_is_refused(tmp_path):
    folder = write(tmp_path / "b")
    (folder / MANIFEST_FILE).write_text(" " * (MAX_MANIFEST_BYTES + 1))
    assert_listed(problems_of(folder), "larger than the 1048576-byte limit")


def test_a_valid_bundle_loads_identically(tmp_path):
    bundle = make_bundle(0)
    loaded = load_bundle(bundle.save(tmp_path / "b"), BASE_SHAPES, FINGERPRINT)
    assert isinstance(loaded, AlterBundle) and loaded.content_hash() == bundle.content_hash()
