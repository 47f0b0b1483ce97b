"""Probing a live A/B experiment: every arm's view scored through the server, stored with the experiment.

For each arm's view, `run_probe` runs the TOFU evaluation (:func:`train.evaluation.tofu_eval.evaluate_tofu`)
with a scorer on the served model name = the view, then POSTs the per-arm summary (probability,
ROUGE-L recall and truth ratio of each set, and model utility when the sets allow it) to
``/admin/experiments/{name}/probes``. What is measured is what is served. Each result records the
view version it measured; a view whose version changes during the probe (a hot-swap) is reported
as such and not stored, since its scores would mix two versions. `alter-train probe`
(`train.cli.probe_cli`) is the command line.

The serving package never imports this module (``alter_serve`` must not import ``train``); the two
meet only over HTTP.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from train.data.prompting import QA_FORMAT, PromptFormat
from train.evaluation.scorers import Scorer
from train.evaluation.tofu_eval import Record, evaluate_tofu

DEFAULT_SETS = ("forget", "retain")
SUMMARY_METRICS = ("probability", "rouge_l_recall", "truth_ratio")
DEFAULT_MAX_NEW_TOKENS = 64


class ProbeError(RuntimeError):
    """The probe cannot run or store its results; the message says what to fix."""


@dataclass(frozen=True)
class ArmProbe:
    """One arm's scores: the view measured, its version (content hash; None for the base model)."""

    arm: str
    view: str
    view_version: str | None
    metrics: dict[str, float | None]
    samples: int

    def payload(self) -> dict[str, Any]:
        return {"arm": self.arm, "view": self.view, "view_version": self.view_version,
                "metrics": self.metrics, "samples": self.samples}


# ---- the probe --------------------------------------------------------------------------------------


def summarize(report: Mapping[str, Any]) -> dict[str, float | None]:
    """Flat metrics of an :func:`evaluate_tofu` report: ``<set>_<metric>`` for each set and each of
    :data:`SUMMARY_METRICS` (e.g. ``forget_probability``), plus ``model_utility`` when computed."""
    metrics: dict[str, float | None] = {}
    for name, set_report in report["sets"].items():
        for metric in SUMMARY_METRICS:
            value = set_report.get(metric)
            metrics[f"{name}_{metric}"] = None if value is None else float(value)
    if report.get("model_utility") is not None:
        metrics["model_utility"] = float(report["model_utility"])
    return metrics


def response_json(response: httpx.Response, what: str) -> Any:
    """The JSON body of a successful response; else ProbeError naming `what` and the server's message."""
    if response.is_success:
        return response.json()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    raise ProbeError(f"{what}: HTTP {response.status_code}: {message}")


def view_versions(admin: httpx.Client) -> dict[str, str | None]:
    """Current composed content hash of every view (None for "original")."""
    views = response_json(admin.get("/admin/views"), "listing views")["data"]
    return {v["name"]: v["content_hash"] for v in views}


def run_probe(
    admin: httpx.Client,
    experiment: str,
    sets: Mapping[str, Sequence[Record]],
    scorer_for: Callable[[str], Scorer],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    prompt_format: PromptFormat = QA_FORMAT,
    source: str | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> list[ArmProbe]:
    """Score each arm's view with ``scorer_for(view)`` on ``sets``, store the results through the
    admin client ``admin`` (base URL + admin bearer header set), and return what was stored.

    Arms that serve the same view are scored once. Raises :class:`ProbeError` when the experiment
    or the admin API refuses, or when no arm could be measured on a stable view version."""
    info = response_json(admin.get(f"/admin/experiments/{experiment}"), f"reading experiment {experiment!r}")
    arms = info["arms"]
    before = view_versions(admin)
    n_samples = min(len(records) for records in sets.values())
    scored: dict[str, dict[str, float | None]] = {}
    for view in dict.fromkeys(arm["view"] for arm in arms):
        log(f"probe: scoring view {view!r} on sets {sorted(sets)}")
        scored[view] = summarize(evaluate_tofu(scorer_for(view), sets, max_new_tokens=max_new_tokens,
                                               prompt_format=prompt_format))
    after = view_versions(admin)
    results = []
    for arm in arms:
        view = arm["view"]
        if before.get(view) != after.get(view):
            log(f"probe: view {view!r} of arm {arm['name']!r} changed version during the probe; not stored, run again")
            continue
        results.append(ArmProbe(arm["name"], view, before.get(view), scored[view], n_samples))
    if not results:
        raise ProbeError(f"no arm of experiment {experiment!r} kept the same view version during the probe")
    body = {"source": source, "results": [r.payload() for r in results]}
    response_json(admin.post(f"/admin/experiments/{experiment}/probes", json=body), "storing the probe results")
    return results


def check_tenant_access(endpoint: str, tenant_key: str, views: Sequence[str], timeout_s: float = 30.0) -> None:
    """Fail early, with the fix, when the tenant key cannot use every view to be probed."""
    response = httpx.get(endpoint.rstrip("/") + "/v1/models", headers={"Authorization": f"Bearer {tenant_key}"},
                         timeout=timeout_s)
    served = {card["id"] for card in response_json(response, "listing the tenant's models")["data"]}
    missing = sorted(set(views) - served)
    if missing:
        raise ProbeError(f"the tenant key cannot use view(s) {missing}; grant them to its tenant "
                         f"(alter-serve tenants update TENANT --grant VIEW) or probe with another tenant's key")
