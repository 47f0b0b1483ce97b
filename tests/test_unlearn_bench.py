"""The unlearning benchmark end to end at the smoke scale (a tiny model): every stage runs, the
gates and goals are reported, a second run finds every stage cached, and bad input is refused.
The numbers mean nothing at this scale; the full benchmark is `make bench-unlearn`."""

from __future__ import annotations

import json

import pytest

from benchmarks import unlearn_bench
from benchmarks.stages import StageCache, stage_key

METHODS = ["alter", "lora-npo", "full-npo"]  # the paper's ALTER differs from "alter" in its config only


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlearn")
    argv = ["--scale", "smoke", "--work-dir", str(root / "work"), "--out-dir", str(root / "out"),
            "--no-progress", "--ignore-gates", "--methods", *METHODS, "--omega-sweep", "0.5"]
    assert unlearn_bench.main(argv) == 0
    return root, argv


def test_the_smoke_run_writes_results_with_gates_goals_and_plots(smoke):
    root, _ = smoke
    out = root / "out"
    payload = json.loads((out / "unlearn_smoke.json").read_text())
    settings, rows = payload["settings"], payload["results"]
    assert [g["name"] for g in settings["gates"]] == ["G1", "G2", "G3", "G4", "G5"]
    assert {(r["method"], r["view"]) for r in rows} >= {
        ("full", "reference"), ("retain-a", "reference"), ("retain-b", "reference"),
        ("alter", "served"), ("alter", "all heads, ω=0.5"), ("alter", "all heads, ω=1"),
        ("lora-npo", "model"), ("full-npo", "model")}
    for row in rows:
        assert 0.0 <= row["fq"] <= 1.0 and 0.0 <= row["ks_d"] <= 1.0
        assert row["fq_low"] <= row["fq_high"]
        assert set(row["mu_terms"]) == {"retain/probability", "retain/rouge_l_recall", "retain/truth_ratio",
                                        "real_authors/probability", "real_authors/rouge_l_recall",
                                        "real_authors/truth_ratio", "world_facts/probability",
                                        "world_facts/rouge_l_recall", "world_facts/truth_ratio"}
    # retain-a against itself: D = 0, FQ = 1, no privacy leak.
    retain_a = next(r for r in rows if r["method"] == "retain-a")
    assert retain_a["ks_d"] == 0.0 and retain_a["fq"] == 1.0 and retain_a["privacy_leak"] == 0.0
    assert settings["goals"]["evaluated"] is True
    isolation = settings["isolation"]["alter-s0"]
    assert set(isolation["checks"]) == {"own_subdomain_max", "other_subdomains_min", "retain_ra_wf_min",
                                        "stacked_log_drop_min"}
    assert all(t["cpu"] and t["wall_s"] >= 0 for t in settings["stages"])
    for name in ("unlearn_smoke_pareto.png", "unlearn_smoke_isolation.png", "unlearn_smoke.md"):
        assert (out / name).stat().st_size > 0


def test_a_second_run_takes_every_stage_from_the_cache(smoke, capsys):
    _, argv = smoke
    capsys.readouterr()
    assert unlearn_bench.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[stage]")]
    assert lines and all(": cached (" in line for line in lines), lines


def test_a_failed_gate_stops_the_run_and_stores_the_gates(smoke, monkeypatch, capsys):
    root, argv = smoke
    failing = [{"name": "G4", "passed": False, "detail": "MU ratio out of bounds"}]
    monkeypatch.setattr(unlearn_bench, "check_gates", lambda scores, scale: failing)
    out = root / "gates-out"
    strict = [a for a in argv if a != "--ignore-gates"]
    strict[strict.index("--out-dir") + 1] = str(out)
    assert unlearn_bench.main(strict) == 3
    assert "validity gates ['G4'] failed" in capsys.readouterr().err
    payload = json.loads((out / "unlearn_smoke_gates.json").read_text())
    assert payload["settings"]["gates"] == failing
    assert {r["method"] for r in payload["results"]} == {"full", "retain-a", "retain-b"}
    assert not (out / "unlearn_smoke.json").exists()  # the method report is left as it was


def test_stage_cache_reruns_an_interrupted_stage_and_keys_by_inputs(tmp_path):
    cache = StageCache(tmp_path, log=lambda line: None)
    calls = []

    def boom(folder):
        calls.append(folder)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.run("s", {"a": 1}, boom)
    record = cache.run("s", {"a": 1}, lambda folder: {"x": 2})
    assert record.result == {"x": 2} and not record.cached and record.folder == calls[0]
    assert cache.run("s", {"a": 1}, boom).cached
    assert cache.folder("s", {"a": 2}) != record.folder and stage_key({"a": 1}) != stage_key({"a": 2})


def test_bad_input_is_refused_with_a_clear_message(tmp_path, capsys):
    argv = ["--scale", "smoke", "--work-dir", str(tmp_path), "--out-dir", str(tmp_path), "--no-progress"]
    assert unlearn_bench.main([*argv, "--tofu-root", str(tmp_path / "nowhere")]) == 2
    assert "full.json" in capsys.readouterr().err
    assert unlearn_bench.main([*argv, "--forget-authors", "5", "250"]) == 2
    err = capsys.readouterr().err
    assert "unknown forget author ids [250]" in err and "forget authors [5] have no paraphrased" in err
    assert unlearn_bench.main([*argv, "--forget-authors", "2", "199"]) == 2  # the smoke scale retains 0-2
    assert "both retain and forget authors" in capsys.readouterr().err
    for weight in ("1", "-0.1", "nan", "half"):  # ω = 1 is always scored; the sweep is [0, 1)
        with pytest.raises(SystemExit):
            unlearn_bench.main([*argv, "--omega-sweep", weight])
        assert "is not a head weight in [0, 1)" in capsys.readouterr().err


def test_the_omega_sweep_views_put_every_head_at_one_weight():
    split = type("Split", (), {"heads": ("a", "b")})()
    views = unlearn_bench.scored_views(unlearn_bench.METHODS["alter"], split, [0.25, 0.5])
    assert views == {"served": "calibrated:a+b", "all heads, ω=0.25": "a*0.25+b*0.25",
                     "all heads, ω=0.5": "a*0.5+b*0.5", "all heads, ω=1": "a+b"}
    assert unlearn_bench.scored_views(unlearn_bench.METHODS["lora-npo"], split, [0.5]) == {"model": "forget"}
