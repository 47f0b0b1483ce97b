"""View calibration: ω(n) by bisection on a retain calibration set, stored in the bundle manifest,
checked as untrusted input, and used by calibrated views (library, admin API)."""

from __future__ import annotations

import contextlib
import json
import math

import httpx
import pytest

from alter_serve.core.bundle import load_bundle
from alter_serve.core.manifest import Calibration
from alter_serve.core.views import View, calibrated_view
from train.alter.calibration import CalibrationSettings, calibrate_views

from .admin_app import AdminApp, store_random_bundle
from .tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


class FakeAlter:
    """Stands in for an AlterModel: records the mixing mode, and `score` maps it to a retain
    probability retain(ω, n) = 1 − cost·n·ω² (falls with the weight and with the head count)."""

    def __init__(self, heads: list[str], cost: float):
        self.forget_heads, self.cost = heads, cost
        self.weights: dict[str, float] | None = None  # None: adapters off
        self.calls = 0

    @contextlib.contextmanager
    def mixing(self, mode: str = "view", retain: float = 1.0, forget: dict[str, float] | None = None):
        saved, self.weights = self.weights, (None if mode == "off" else dict(forget or {}))
        try:
            yield
        finally:
            self.weights = saved

    def score(self, examples) -> float:
        self.calls += 1
        if self.weights is None:
            return 1.0
        return 1.0 - self.cost * sum(w * w for w in self.weights.values())

    def omega(self, count: int, floor: float) -> float:
        """The exact answer: 1 − cost·n·ω² = floor."""
        return min(1.0, math.sqrt((1.0 - floor) / (self.cost * count)))


def test_bisection_finds_the_largest_weight_that_keeps_the_retain_floor() -> None:
    fake = FakeAlter(["a", "b", "c"], cost=0.2)
    settings = CalibrationSettings(min_retain_ratio=0.95, steps=10)
    calibration = calibrate_views(fake, ["x"], fake.score, settings)
    assert sorted(calibration.weights) == [1, 2, 3]
    for count, omega in calibration.weights.items():
        exact = fake.omega(count, 0.95)
        assert exact - 2 ** -10 <= omega <= exact  # the largest grid point that is feasible
        assert calibration.retain_ratio[count] >= 0.95
    assert calibration.weights[1] > calibration.weights[2] > calibration.weights[3]
    assert calibration.min_retain_ratio == 0.95 and calibration.retain_examples == 1


def test_full_weight_is_kept_when_the_view_already_meets_the_floor() -> None:
    fake = FakeAlter(["a", "b"], cost=0.01)
    calibration = calibrate_views(fake, ["x"], fake.score, CalibrationSettings(min_retain_ratio=0.95))
    assert calibration.weights == {1: 1.0, 2: 1.0}
    assert fake.calls == 1 + 3  # the base score, then one check at ω = 1 per head set (2 singles + the pair)


def test_weight_zero_when_even_the_retain_head_alone_misses_the_floor() -> None:
    fake = FakeAlter(["a"], cost=0.5)
    calibration = calibrate_views(fake, ["x"], lambda ex: 0.5 if fake.weights is not None else 1.0,
                                  CalibrationSettings(min_retain_ratio=0.9, steps=4))
    assert calibration.weights == {1: 0.0}
    assert calibration.retain_ratio[1] == 0.5


def test_a_bad_floor_is_refused() -> None:
    fake = FakeAlter(["a"], cost=0.1)
    with pytest.raises(ValueError, match="min_retain_ratio"):
        calibrate_views(fake, ["x"], fake.score, CalibrationSettings(min_retain_ratio=1.5))


def test_weight_for_counts_beyond_the_calibrated_ones_take_the_largest() -> None:
    calibration = Calibration(min_retain_ratio=0.9, weights={1: 1.0, 2: 0.75})
    assert calibration.weight_for(0) == 1.0
    assert calibration.weight_for(1) == 1.0
    assert calibration.weight_for(2) == 0.75
    assert calibration.weight_for(5) == 0.75


def test_calibrated_view_scales_only_the_heads_that_are_on() -> None:
    calibration = Calibration(min_retain_ratio=0.9, weights={1: 0.9, 2: 0.5})
    view = calibrated_view(View(name="v", retain=1.0, forget={"a": 1.0, "b": 0.5, "c": 0.0}), calibration)
    assert view.forget == {"a": 0.5, "b": 0.25, "c": 0.0}
    assert view.retain == 1.0
    with pytest.raises(ValueError, match="no view calibration"):
        calibrated_view(view, None)


def _set_calibration(folder, calibration: dict) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["calibration"] = calibration
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _bundle_with_calibration(tmp_path, model_dir, calibration: dict):
    from tests.server.bundle_factory import random_bundle

    folder = tmp_path / "bundle"
    random_bundle(model_dir, ["a", "b"]).save(folder)
    _set_calibration(folder, calibration)
    return folder


def test_a_calibration_round_trips_through_the_manifest(tmp_path, tiny_model_dir) -> None:
    folder = _bundle_with_calibration(tmp_path, tiny_model_dir, {
        "min_retain_ratio": 0.95, "weights": {"1": 1.0, "2": 0.625}, "retain_ratio": {"1": 0.97, "2": 0.96}})
    bundle = load_bundle(folder)
    assert bundle.manifest.calibration.weights == {1: 1.0, 2: 0.625}
    bundle.save(tmp_path / "again")
    assert load_bundle(tmp_path / "again").manifest.calibration == bundle.manifest.calibration


def test_a_swapped_head_drops_the_calibration(tmp_path, tiny_model_dir) -> None:
    bundle = load_bundle(_bundle_with_calibration(tmp_path, tiny_model_dir,
                                                  {"min_retain_ratio": 0.95, "weights": {"1": 1.0, "2": 0.5}}))
    swapped = bundle.replace_head("a", bundle.head("b"))
    assert swapped.manifest.calibration is None  # measured with the old head: no longer true


def test_a_bad_calibration_is_refused_with_every_problem(tmp_path, tiny_model_dir) -> None:
    from alter_serve.core.bundle import BundleError

    folder = _bundle_with_calibration(tmp_path, tiny_model_dir, {
        "min_retain_ratio": 0.95, "weights": {"0": 0.5, "2": 1.5, "3": 0.5}, "retain_ratio": {"1": -1.0}})
    with pytest.raises(BundleError) as info:
        load_bundle(folder)
    text = "\n".join(info.value.problems)
    assert "head count 0 is outside 1..2" in text
    assert "head count 3 is outside 1..2" in text
    assert "calibration.weights[2]: 1.5 must be within [0, 1]" in text
    assert "calibration.retain_ratio[1]: -1.0" in text


def test_admin_api_defines_a_calibrated_view(tmp_path) -> None:
    with AdminApp.start(tmp_path) as app:
        folder = store_random_bundle(app.service, "cal", ["a", "b"])
        _set_calibration(folder, {"min_retain_ratio": 0.9, "weights": {"1": 0.8, "2": 0.5}})
        store_random_bundle(app.service, "plain", ["a", "b"])
        with httpx.Client(base_url=app.url, headers=app.admin_headers) as admin:
            admin.post("/admin/bundles", json={"name": "cal", "path": str(folder)}).raise_for_status()
            admin.post("/admin/bundles", json={"name": "plain", "path": str(folder.parent / "plain")}).raise_for_status()
            made = admin.put("/admin/views/both", json={"bundle": "cal", "forget": {"a": 1.0, "b": 1.0}, "calibrated": True})
            assert made.status_code == 200, made.text
            assert made.json()["view"]["spec"]["forget"] == {"a": 0.5, "b": 0.5}
            one = admin.put("/admin/views/one", json={"bundle": "cal", "forget": {"a": 1.0}, "calibrated": True})
            assert one.json()["view"]["spec"]["forget"] == {"a": 0.8}
            refused = admin.put("/admin/views/x", json={"bundle": "plain", "forget": {"a": 1.0}, "calibrated": True})
            assert refused.status_code == 400
            error = refused.json()["error"]
            assert "no view calibration" in error["message"] and error["param"] == "calibrated"


def test_calibration_refuses_a_zero_base_probability():
    fake = FakeAlter(["bio"], cost=0.1)
    with pytest.raises(ValueError, match="retain answer probability is 0.0"):
        calibrate_views(fake, ["x"], lambda examples: 0.0, CalibrationSettings())
