"""Experiment statistics: the numbers against independent hand calculations, the registry report
from logged requests and feedback, the admin endpoints (results, probes), and `alter-train probe`
end to end with a local PyTorch scorer standing in for the endpoint scorer."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import httpx
import numpy as np
import pytest
from scipy import stats as sps

from alter_serve.registry import ArmSamples, ExperimentInfo, InvalidInput, Registry, RequestLogEntry
from alter_serve.registry.experiments import Arm
from alter_serve.registry.models import FeedbackRow
from alter_serve.registry.stats import (
    distribution,
    error_rate_test,
    experiment_report,
    mean_interval,
    proportion_interval,
    welch_test,
)

from .admin_app import AdminApp, store_random_bundle

# ---- the statistics ----------------------------------------------------------------------------------


def test_distribution_percentiles():
    d = distribution([10.0, 20.0, 30.0, 40.0, 1000.0])
    assert (d.n, d.mean, d.p50) == (5, 220.0, 30.0)
    assert d.p95 == pytest.approx(40.0 + 0.8 * 960.0)  # linear interpolation at rank 0.95 × 4 = 3.8
    assert distribution([]) == distribution(()) and distribution([]).mean is None


def test_mean_interval_is_the_student_t_interval():
    est = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * math.sqrt(2.5 / 5)  # t(0.975, 4) × s / √n
    assert (est.n, est.mean, est.std) == (5, 3.0, pytest.approx(math.sqrt(2.5)))
    assert (est.low, est.high) == (pytest.approx(3.0 - half), pytest.approx(3.0 + half))
    assert mean_interval([4.0]).low is None and mean_interval([4.0]).mean == 4.0
    assert (mean_interval([2.0, 2.0, 2.0]).low, mean_interval([2.0, 2.0, 2.0]).high) == (2.0, 2.0)
    wider = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0], confidence=0.99)
    assert wider.low < est.low and wider.high > est.high


def test_wilson_interval_of_an_error_rate():
    zero = proportion_interval(0, 10)
    z2 = 1.959963984540054**2
    assert (zero.mean, zero.low) == (0.0, pytest.approx(0.0, abs=1e-12))
    assert zero.high == pytest.approx(z2 / (10 + z2))  # Wilson upper bound at 0 successes
    half = proportion_interval(5, 10)
    assert half.low == pytest.approx(1 - half.high) and half.mean == 0.5
    assert proportion_interval(0, 0).mean is None


def test_welch_t_test_matches_the_formula():
    arm, control = [4.0, 5.0, 5.0, 4.0, 5.0, 3.0], [1.0, 2.0, 1.0, 3.0]
    a, c = np.array(arm), np.array(control)
    va, vc = a.var(ddof=1) / len(a), c.var(ddof=1) / len(c)
    t = (a.mean() - c.mean()) / math.sqrt(va + vc)
    df = (va + vc) ** 2 / (va**2 / (len(a) - 1) + vc**2 / (len(c) - 1))  # Welch–Satterthwaite
    result = welch_test(arm, control)
    assert result.test == "welch_t" and result.statistic == pytest.approx(t)
    assert result.p_value == pytest.approx(2 * sps.t.sf(abs(t), df))
    assert result.difference == pytest.approx(a.mean() - c.mean()) and result.significant is True
    assert welch_test([1.0], control).p_value is None and "at least 2" in welch_test([1.0], control).note
    flat = welch_test([3.0, 3.0], [3.0, 3.0])
    assert flat.p_value is None and flat.difference == 0.0


def test_error_rate_test_is_the_two_proportion_test_or_fisher_when_small():
    result = error_rate_test(30, 100, 10, 100)
    pooled = 40 / 200
    z = (0.3 - 0.1) / math.sqrt(pooled * (1 - pooled) * (1 / 100 + 1 / 100))
    assert result.test == "chi2" and result.statistic == pytest.approx(z**2)  # χ² = z² = 12.5
    assert result.p_value == pytest.approx(2 * sps.norm.sf(z)) and result.significant is True
    assert result.difference == pytest.approx(0.2)
    none_failed = error_rate_test(0, 10, 0, 12)
    assert (none_failed.test, none_failed.p_value, none_failed.significant) == ("fisher_exact", 1.0, False)
    assert error_rate_test(1, 5, 0, 0).p_value is None


def _samples(arm: str, view: str, **kwargs) -> ArmSamples:
    base = dict(weight=1.0, requests=0, errors=0, prompt_tokens=0, completion_tokens=0, feedback_count=0,
                latency_ms=(), ttft_ms=(), ratings=())
    return ArmSamples(arm=arm, view=view, **{**base, **kwargs})


def test_report_tests_every_arm_against_the_control_and_refuses_a_bad_confidence():
    now = datetime.now(timezone.utc)
    info = ExperimentInfo(1, "ab", "chat", ("acme",), (Arm(name="a", view="original", weight=1.0),
                          Arm(name="b", view="no-bio", weight=1.0)), "user", "salt", "running", "a", now, now)
    arms = [_samples("a", "original", requests=4, errors=1, ratings=(1.0, 2.0)),
            _samples("b", "no-bio", requests=4, errors=0, ratings=(4.0, 5.0))]
    report = experiment_report(info, arms, [], {"original": None, "no-bio": "f" * 64})
    control, other = report.arms
    assert control.control and control.vs_control is None
    assert other.vs_control.feedback.difference == pytest.approx(3.0)
    assert other.vs_control.errors.difference == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="confidence"):
        experiment_report(info, arms, [], {}, confidence=0.2)


# ---- the registry report -----------------------------------------------------------------------------


@pytest.fixture
def reg(registry_url, tmp_path):
    registry = Registry(registry_url, tmp_path / "data")  # SQLite and PostgreSQL (conftest.py)
    registry.create_all()
    yield registry
    registry.close()


def _log(reg: Registry, arm: str, latencies: list[float], statuses: list[int], ttft: float | None = None) -> None:
    reg.log_requests([
        RequestLogEntry(f"{arm}-{i}", "acme", "chat", "original", status, latency, None, "ab", arm, ttft, 10, 5)
        for i, (latency, status) in enumerate(zip(latencies, statuses))
    ])


def _two_arms(reg: Registry) -> None:
    """Experiment "ab" for tenant acme: arms control and treat, both serving "original"."""
    reg.create_experiment("ab", alias="chat", tenants=["acme"], control_arm="control",
                          arms=[{"name": "control", "view": "original", "weight": 1},
                                {"name": "treat", "view": "original", "weight": 1}])


def test_registry_report_from_logged_requests_and_feedback(reg):
    reg.create_tenant("acme", views=["original"])
    _two_arms(reg)
    control_latency = [float(x) for x in range(10, 110, 10)]  # 10 … 100
    _log(reg, "control", control_latency, [200] * 9 + [500], ttft=5.0)
    _log(reg, "treat", [200.0] * 4, [200] * 4)
    for i, rating in enumerate([1, 2, 2, 3]):
        reg.record_feedback("acme", f"control-{i}", rating)
    for i, rating in enumerate([4, 5, 5, 4]):
        reg.record_feedback("acme", f"treat-{i}", rating)

    report = reg.experiment_report("ab")
    assert (report.experiment, report.alias, report.control_arm, report.confidence) == ("ab", "chat", "control", 0.95)
    control, treat = report.arms
    assert (control.arm, control.requests, control.errors, control.prompt_tokens, control.completion_tokens) == \
        ("control", 10, 1, 100, 50)
    assert control.latency_ms.p50 == pytest.approx(55.0) and control.latency_ms.p95 == pytest.approx(95.5)
    assert (control.ttft_ms.n, control.ttft_ms.p50) == (10, 5.0)
    assert (treat.ttft_ms.n, treat.ttft_ms.p50) == (0, None)
    assert control.error_rate.mean == pytest.approx(0.1)
    assert (control.feedback.n, control.feedback.mean) == (4, 2.0)
    assert treat.feedback.mean == 4.5 and treat.vs_control.feedback.significant is True
    assert treat.vs_control.feedback.p_value == pytest.approx(
        sps.ttest_ind([4, 5, 5, 4], [1, 2, 2, 3], equal_var=False).pvalue)
    assert treat.vs_control.errors.test == "fisher_exact" and treat.vs_control.errors.difference == pytest.approx(-0.1)
    assert control.probe is None and treat.probe is None


def test_a_recreated_experiment_does_not_inherit_the_old_ones_log(reg):
    """The request log and feedback name experiments by name: a new experiment of a deleted one's
    name counts only what was logged since it was created."""
    reg.create_tenant("acme", views=["original"])
    _two_arms(reg)
    _log(reg, "treat", [5000.0] * 6, [500] * 6)
    for i in range(6):
        reg.record_feedback("acme", f"treat-{i}", 1.0)
    reg.delete_experiment("ab")
    _two_arms(reg)
    assert [(a.arm, a.requests, a.errors, a.feedback_count) for a in reg.experiment_results("ab")] == [
        ("control", 0, 0, 0), ("treat", 0, 0, 0)]
    reg.log_requests([RequestLogEntry("new-0", "acme", "chat", "original", 200, 10.0, None, "ab", "treat")])
    reg.record_feedback("acme", "new-0", 5.0)
    reg.record_feedback("acme", "treat-0", 2.0)  # re-rating an old response does not bring it back
    treat = reg.experiment_report("ab").arms[1]
    assert (treat.requests, treat.errors, treat.latency_ms.p50, treat.feedback.n, treat.feedback.mean) == (
        1, 0, 10.0, 1, 5.0)


def test_each_response_counts_once_with_its_latest_rating(reg):
    """Rating one response many times is one sample (its latest rating), not many: otherwise the
    Welch t-test would see a fake sample size."""
    reg.create_tenant("acme", views=["original"])
    _two_arms(reg)
    _log(reg, "control", [10.0] * 3, [200] * 3)
    _log(reg, "treat", [10.0] * 3, [200] * 3)
    for i, rating in enumerate([1, 2, 1]):
        reg.record_feedback("acme", f"control-{i}", rating)
    for _ in range(30):
        reg.record_feedback("acme", "treat-0", 5.0)
    last = reg.record_feedback("acme", "treat-0", 4.0, comment="changed my mind")
    reg.record_feedback("acme", "treat-1", 5.0)
    assert [(f.id, f.rating, f.comment) for f in reg.list_feedback(tenant="acme") if f.response_id == "treat-0"] == [
        (last.id, 4.0, "changed my mind")]
    # Two rows for one response (two replicas storing at the same moment): only the newest counts.
    with reg.engine.begin() as conn:
        conn.execute(FeedbackRow.__table__.insert().values(response_id="treat-1", tenant="acme", rating=3.0,
                                                           created_at=datetime.now(timezone.utc)))
    control, treat = reg.experiment_report("ab").arms
    assert (treat.feedback.n, treat.feedback.mean) == (2, 3.5)
    assert [(a.arm, a.feedback_count, a.mean_rating) for a in reg.experiment_results("ab")] == [
        ("control", 3, pytest.approx(4 / 3)), ("treat", 2, 3.5)]
    assert treat.vs_control.feedback.p_value == pytest.approx(
        sps.ttest_ind([4.0, 3.0], [1.0, 2.0, 1.0], equal_var=False).pvalue)


def test_ratings_are_attributed_through_the_request_log_when_counted(reg):
    """A rating stored before its response is logged (served by another replica, or rated during a
    flush) counts once the log has it; a rating of a response never served, or of another tenant's
    response, never counts."""
    reg.create_tenant("acme", views=["original"])
    reg.create_tenant("globex", views=["original"])
    _two_arms(reg)
    early = reg.record_feedback("acme", "treat-0", 5.0)
    ghost = reg.record_feedback("acme", "never-served", 1.0)
    assert not early.attributed and not ghost.attributed
    assert reg.experiment_report("ab").arms[1].feedback.n == 0
    _log(reg, "treat", [10.0, 10.0], [200, 200])  # the other replica's flush
    reg.log_requests([RequestLogEntry("g-0", "globex", "chat", "original", 200, 1.0, None, "ab", "treat")])
    with reg.engine.begin() as conn:  # a rating stored under another tenant never joins acme's response
        conn.execute(FeedbackRow.__table__.insert().values(response_id="treat-1", tenant="globex", rating=1.0,
                                                           created_at=datetime.now(timezone.utc)))
    treat = reg.experiment_report("ab").arms[1]
    assert (treat.requests, treat.feedback.n, treat.feedback.mean) == (3, 1, 5.0)


def test_paused_traffic_is_logged_outside_the_arms(reg):
    """A paused experiment serves the control view to everyone; those requests are logged with the
    experiment but no arm, and stay out of every arm's numbers (they were not randomized)."""
    reg.create_tenant("acme", views=["original"])
    _two_arms(reg)
    _log(reg, "control", [10.0, 20.0], [200, 200])
    reg.log_requests([RequestLogEntry(f"p{i}", "acme", "chat", "original", 500, 999.0, None, "ab", None)
                      for i in range(5)])
    reg.record_feedback("acme", "p0", 1.0)
    control, treat = reg.experiment_report("ab").arms
    assert (control.requests, control.errors, control.latency_ms.mean, control.feedback.n) == (2, 0, 15.0, 0)
    assert [a.arm for a in reg.experiment_results("ab")] == ["control", "treat"]


def test_probe_results_are_validated_stored_and_the_latest_counts(reg):
    reg.create_tenant("acme", views=["original"])
    reg.create_experiment("ab", alias="chat", tenants=["acme"],
                          arms=[{"name": "control", "view": "original", "weight": 1}])
    reg.record_probe_results("ab", [{"arm": "control", "view": "original", "metrics": {"forget_probability": 0.5}}])
    stored = reg.record_probe_results("ab", [{"arm": "control", "view": "original", "samples": 7,
                                              "metrics": {"forget_probability": 0.25, "model_utility": None}}],
                                      source="test")
    assert [p.metrics for p in reg.list_probe_results("ab")] == [
        {"forget_probability": 0.25, "model_utility": None}, {"forget_probability": 0.5}]
    probe = reg.experiment_report("ab").arms[0].probe
    assert (probe.metrics["forget_probability"], probe.samples, probe.source, probe.stale) == (0.25, 7, "test", False)
    assert stored[0].experiment == "ab"
    bad = [
        ({"arm": "nope", "view": "original", "metrics": {"x": 1.0}}, "not an arm"),
        ({"arm": "control", "view": "other", "metrics": {"x": 1.0}}, "serves view 'original' now"),
        ({"arm": "control", "view": "original", "metrics": {"x": float("nan")}}, "finite number"),
        ({"arm": "control", "view": "original", "metrics": {"Bad Name": 1.0}}, "metric name"),
        ({"arm": "control", "view": "original", "metrics": {}}, "non-empty"),
    ]
    for result, message in bad:
        with pytest.raises(InvalidInput, match=message):
            reg.record_probe_results("ab", [result])
    reg.delete_experiment("ab")
    reg.create_experiment("ab", alias="chat", tenants=["acme"],
                          arms=[{"name": "control", "view": "original", "weight": 1}])
    assert reg.list_probe_results("ab") == []  # a new experiment of the same name starts clean


# ---- over HTTP, and the probe command ----------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with AdminApp.start(tmp_path_factory.mktemp("stats")) as running:
        yield running


@pytest.fixture(scope="module")
def experiment(app):
    """Experiment 'bio-ab' for tenant 'acme': control = original, forget = view 'forget-x' of a random bundle."""
    registry = app.service.registry
    folder = store_random_bundle(app.service, "rnd", ["x", "y"], seed=3)
    with app.client() as admin:
        assert admin.post("/admin/bundles", json={"name": "rnd", "path": str(folder)}).status_code == 200
        assert admin.put("/admin/views/forget-x", json={"bundle": "rnd", "forget": {"x": 1.0}}).status_code == 200
        assert admin.post("/admin/tenants", json={"name": "acme", "views": ["original", "forget-x"]}).status_code == 200
        created = admin.post("/admin/experiments", json={
            "name": "bio-ab", "alias": "chat", "tenants": ["acme"], "control_arm": "control",
            "arms": [{"name": "control", "view": "original", "weight": 1},
                     {"name": "forget", "view": "forget-x", "weight": 1}]})
        assert created.status_code == 200, created.text
    registry.log_requests([
        RequestLogEntry(f"r{i}", "acme", "chat", view, 200 if i % 5 else 503, 40.0 + i, None, "bio-ab", arm, 4.0, 12, 6)
        for i, (arm, view) in enumerate([("control", "original"), ("forget", "forget-x")] * 10)
    ])
    for i in range(20):
        registry.record_feedback("acme", f"r{i}", 1.0 + (i % 2) * 3 + (i % 3) * 0.5)
    return folder


def test_results_endpoint_serves_the_full_report(app, experiment):
    with app.client() as admin:
        body = admin.get("/admin/experiments/bio-ab/results").json()
        assert admin.get("/admin/experiments/bio-ab/results", params={"confidence": 0.3}).status_code == 400
        assert admin.get("/admin/experiments/nope/results").json()["error"]["code"] == "not_found"
    assert body["experiment"] == "bio-ab" and body["control_arm"] == "control" and body["tenants"] == ["acme"]
    control, forget = body["arms"]
    assert (control["arm"], control["view"], control["requests"], control["errors"]) == ("control", "original", 10, 2)
    assert (forget["arm"], forget["view"], forget["requests"], forget["errors"]) == ("forget", "forget-x", 10, 2)
    assert control["latency_ms"]["p50"] == pytest.approx(np.percentile([40.0 + i for i in range(0, 20, 2)], 50))
    assert forget["ttft_ms"]["p95"] == 4.0 and control["prompt_tokens"] == 120
    assert control["feedback"]["n"] == 10 and control["feedback"]["low"] < control["feedback"]["mean"]
    assert control["vs_control"] is None
    assert set(forget["vs_control"]) == {"feedback", "errors"}
    assert forget["vs_control"]["feedback"]["test"] == "welch_t"
    assert forget["vs_control"]["errors"]["p_value"] == 1.0  # 2/10 vs 2/10


def test_probe_endpoint_validates_and_results_mark_a_stale_probe(app, experiment):
    with app.client() as admin:
        refused = admin.post("/admin/experiments/bio-ab/probes", json={
            "results": [{"arm": "forget", "view": "original", "metrics": {"forget_probability": 0.1}}]})
        assert refused.status_code == 400 and "serves view 'forget-x' now" in refused.json()["error"]["message"]
        tenant_key = admin.post("/admin/tenants/acme/keys").json()["key"]
        as_tenant = httpx.post(app.url + "/admin/experiments/bio-ab/probes", json={"results": []},
                               headers={"Authorization": f"Bearer {tenant_key}"})
        assert as_tenant.status_code == 403


def test_probe_command_scores_each_arm_and_the_results_show_it(app, experiment, tmp_path):
    from train.evaluation.bundle_views import local_view_scorers
    from train.evaluation.eval_sets import load_eval_sets
    from train.evaluation.tofu_eval import evaluate_tofu
    from train.evaluation.probe import run_probe, summarize

    sets, _ = load_eval_sets("synthetic", None, limit=3)
    local = local_view_scorers(str(app.service.model_dir), str(experiment), ["original", "x"], device="cpu",
                               progress=False)
    scorers = {"original": local["original"], "forget-x": local["x"]}  # the bundle's view x = registry view forget-x
    with app.client() as admin:
        stored = run_probe(admin, "bio-ab", sets, scorers.__getitem__, max_new_tokens=4, source="unit test",
                           log=lambda line: None)
        body = admin.get("/admin/experiments/bio-ab/results").json()
        history = admin.get("/admin/experiments/bio-ab/probes").json()["data"]
    assert [(p.arm, p.view, p.samples) for p in stored] == [("control", "original", 3), ("forget", "forget-x", 3)]
    expected = summarize(evaluate_tofu(scorers["forget-x"], sets, max_new_tokens=4))
    assert set(expected) == {f"{s}_{m}" for s in ("forget", "retain")
                             for m in ("probability", "rouge_l_recall", "truth_ratio")}
    control, forget = body["arms"]
    assert forget["probe"]["metrics"] == pytest.approx(expected)
    assert forget["probe"]["view_version"] == app.service.registry.get_view("forget-x").content_hash
    assert control["probe"]["metrics"]["forget_probability"] != forget["probe"]["metrics"]["forget_probability"]
    assert not control["probe"]["stale"] and not forget["probe"]["stale"]
    assert history[0]["source"] == "unit test" and len(history) == 2

    # A new version of the probed view (here: other head weights) makes its probe stale.
    with app.client() as admin:
        admin.put("/admin/views/forget-x", json={"bundle": "rnd", "forget": {"x": 0.5}})
        after = admin.get("/admin/experiments/bio-ab/results").json()["arms"]
    assert after[1]["probe"]["stale"] and not after[0]["probe"]["stale"]
