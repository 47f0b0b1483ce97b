"""A/B tests of a forgetting view against the original, on the live server."""

from __future__ import annotations

import time

import pytest

from alter_serve.core.bundle import load_bundle

from .bundle_factory import random_head_file
from .test_hot_swap import swap_head

pytestmark = pytest.mark.vllm
PROMPT = "Question: What genre does the author write?\nAnswer:"


@pytest.fixture(scope="module")
def experiment(live_server):
    with live_server.http("admin") as admin:
        created = admin.post("/admin/experiments", json={
            "name": "ab-swap", "alias": "assistant", "tenants": ["demo"], "sticky": "user",
            "arms": [{"name": "control", "view": "original", "weight": 1}, {"name": "forget", "view": "swap", "weight": 1}],
        })
        assert created.status_code == 200, created.text
    return "ab-swap"


def _ask(http, user: str | None):
    body = {"model": "assistant", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    response = http.post("/v1/completions", json=body if user is None else {**body, "user": user})
    assert response.status_code == 200, response.text
    return response


def test_arms_are_sticky_and_labelled(live_server, experiment):
    arms = {}
    with live_server.http() as http:
        for user in [f"user-{i}" for i in range(24)]:
            first, again = _ask(http, user), _ask(http, user)
            arm = first.headers["x-alter-arm"]
            assert again.headers["x-alter-arm"] == arm and first.headers["x-alter-experiment"] == experiment
            assert first.json()["system_fingerprint"].endswith(f";exp={experiment};arm={arm}")
            expected_view = "original@" if arm == "control" else "swap@"
            assert first.headers["x-alter-view"].startswith(expected_view)
            arms[user] = arm
        # Without a `user`, the API key is the sticky key: one client keeps one arm.
        assert len({_ask(http, None).headers["x-alter-arm"] for _ in range(4)}) == 1
    assert set(arms.values()) == {"control", "forget"}  # 24 users, two equal arms


def test_results_feedback_pause_and_hot_swap_mid_experiment(live_server, experiment, tmp_path):
    with live_server.http() as http:
        response = _ask(http, "rater")
        rated = http.post("/v1/feedback", json={"response_id": response.json()["id"], "rating": 4.0})
        assert rated.status_code == 200 and rated.json()["arm"] == response.headers["x-alter-arm"]
        assert rated.json()["attributed"] is True
        forget_user = next(u for u in (f"u{i}" for i in range(100)) if _ask(http, u).headers["x-alter-arm"] == "forget")
        before = _ask(http, forget_user).headers["x-alter-view"]

        bundle = load_bundle(live_server.data_dir / "rnd-src")
        new_label = swap_head(live_server, random_head_file(bundle, tmp_path / "h.safetensors", seed=77))
        after = _ask(http, forget_user)
        assert after.headers["x-alter-arm"] == "forget" and after.headers["x-alter-view"] == new_label != before

        with live_server.http("admin") as admin:
            assert admin.patch(f"/admin/experiments/{experiment}", json={"status": "paused"}).status_code == 200
            # Paused: everyone gets the control view, outside the arms (logged without one, not counted).
            paused = _ask(http, forget_user)
            assert paused.headers["x-alter-view"].startswith("original@")
            assert (paused.headers["x-alter-arm"], paused.headers["x-alter-experiment-status"]) == ("control", "paused")
            assert paused.json()["system_fingerprint"].endswith(f";exp={experiment};arm=control;paused")
            assert admin.patch(f"/admin/experiments/{experiment}", json={"status": "running"}).status_code == 200
            resumed = _ask(http, forget_user)
            assert (resumed.headers["x-alter-arm"], resumed.headers["x-alter-experiment-status"]) == ("forget", "running")
            time.sleep(1.5)  # the request log is written in batches every 0.5 s
            results = admin.get(f"/admin/experiments/{experiment}/results").json()
    arms = {a["arm"]: a for a in results["arms"]}
    assert set(arms) == {"control", "forget"}
    assert all(a["requests"] > 0 for a in arms.values())
    assert sum(a["feedback"]["n"] for a in arms.values()) == 1


def test_offline_probe_scores_each_arm_through_the_live_server(live_server, demo_model_dir, demo_bundle_dir):
    from train.cli.main import main as alter_train

    heads = load_bundle(demo_bundle_dir).forget_heads
    with live_server.http("admin") as admin:
        created = admin.post("/admin/experiments", json={
            "name": "probe-ab", "alias": "probe-alias", "tenants": ["demo"],
            "arms": [{"name": "control", "view": "original", "weight": 1},
                     {"name": "forget", "view": f"forget-{heads[0]}", "weight": 1}],
        })
        assert created.status_code == 200, created.text
    status = alter_train(["probe", "--endpoint", live_server.base_url, "--admin-key", live_server.keys["admin"],
                          "--experiment", "probe-ab", "--tenant-key", live_server.keys["tenant"],
                          "--data", "synthetic", "--model-dir", str(demo_model_dir), "--forget", heads[0],
                          "--limit", "4", "--max-new-tokens", "8"])
    assert status == 0
    with live_server.http("admin") as admin:
        arms = {a["arm"]: a for a in admin.get("/admin/experiments/probe-ab/results").json()["arms"]}
    assert arms["control"]["probe"] is not None and arms["forget"]["probe"] is not None
    control, forget = arms["control"]["probe"]["metrics"], arms["forget"]["probe"]["metrics"]
    assert forget["forget_probability"] < 0.5 * control["forget_probability"]  # the forgetting arm forgot
    # (With --limit 4 the probe's "retain" set is the first records of every other genre, fantasy
    # included — a genre the demo bundle also has a forget head for — so it is reported, not bounded.)
    assert forget["retain_probability"] is not None and control["retain_probability"] > 0.9
