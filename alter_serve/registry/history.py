"""History and statistics: the request log, feedback on responses, offline probe results, and what
an experiment's arms made of them (totals, raw samples, the statistics report of `stats.py`).

The request log and feedback are append-only history keyed by names, not foreign keys
(`models.py`), so they outlive the tenants, views and experiments they mention. Which rows count
for an experiment is decided when statistics are computed, never when a row is written:
- a sample is a request-log row logged under the experiment's name, on an arm, and not older than
  the experiment (`_samples_of`);
- a rating counts through its response's request-log row (same tenant and response id), and only
  the newest rating of each response counts (`_ratings_of`), so one response is one sample however
  often it was rated and whichever replica logged it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from sqlalchemy import and_, case, func, insert, select
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement, Subquery

from . import stats
from .database import Database
from .errors import InvalidInput, NotFound
from .experiments import Arm
from .models import INT32_MAX, ExperimentRow, FeedbackRow, ProbeResultRow, RequestLogRow, ViewRow, utcnow
from .records import ArmResult, ArmSamples, FeedbackInfo, ProbeResult, RequestLogEntry
from .rows import experiment_info, experiment_row

MAX_COMMENT_CHARS = 10_000
MAX_RESPONSE_ID_CHARS = 128
MAX_PROBE_METRICS = 64
MAX_PROBE_SOURCE_CHARS = 2000
_METRIC_NAME_RE = re.compile(r"[a-z][a-z0-9_./-]{0,63}\Z")


class History(Database):
    """The request log, feedback, probes and experiment statistics (see the module docstring)."""

    def record_feedback(self, tenant: str, response_id: str, rating: float, *, comment: str | None = None,
                        require_logged: bool = False) -> FeedbackInfo:
        """Store `tenant`'s rating of one response. Rating a response again replaces its rating (one
        response is one sample; a race that leaves two rows is settled when counting: the newest
        wins). A response the request log has for another tenant is not found (a tenant cannot rate,
        or learn of, another tenant's responses); one it has not (yet) is stored all the same and
        counts once it is logged, because statistics attribute ratings through the request log when
        they are computed (see `FeedbackInfo`) — unless `require_logged` (the API's choice: a rating
        of an id nobody was served is refused, so a client cannot fill the table with made-up ids)."""
        if not isinstance(response_id, str) or not 0 < len(response_id) <= MAX_RESPONSE_ID_CHARS:
            raise InvalidInput(f"response id must be 1 to {MAX_RESPONSE_ID_CHARS} characters")
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
            raise InvalidInput(f"rating {rating!r} of response {response_id!r} must be a finite number")
        if comment is not None and len(comment) > MAX_COMMENT_CHARS:
            raise InvalidInput(f"comment on response {response_id!r} is {len(comment)} characters; the limit is "
                               f"{MAX_COMMENT_CHARS}")
        log, fb = RequestLogRow, FeedbackRow
        with self._writing(f"feedback on response {response_id!r}") as s:
            logged = s.execute(select(log.tenant, log.experiment, log.arm, log.view)
                               .where(log.response_id == response_id).limit(1)).first()
            if (logged is None and require_logged) or (logged is not None and logged.tenant != tenant):
                raise NotFound(f"response {response_id!r} not found for tenant {tenant!r}")
            row = s.scalar(select(fb).where(fb.tenant == tenant, fb.response_id == response_id)
                           .order_by(fb.id.desc()).limit(1).with_for_update())
            if row is None:
                row = FeedbackRow(response_id=response_id, tenant=tenant)
                s.add(row)
            row.rating, row.comment, row.created_at = float(rating), comment, utcnow()
            s.flush()
            info = self._feedback_info(row, logged)
            # What the log says now, for the record; statistics and listings join the log again.
            row.experiment, row.arm, row.view = info.experiment, info.arm, info.view
            return info

    def list_feedback(self, *, experiment: str | None = None, tenant: str | None = None,
                      limit: int = 1000) -> list[FeedbackInfo]:
        """Feedback, newest first, optionally for one experiment and/or tenant, each attributed
        through the request log as it is now."""
        log, fb = RequestLogRow, FeedbackRow
        with self._reading() as s:
            query = (select(fb, log.id.label("log_id"), log.experiment, log.arm, log.view)
                     .outerjoin(log, and_(log.tenant == fb.tenant, log.response_id == fb.response_id))
                     .order_by(fb.id.desc()).limit(limit))
            if experiment is not None:
                query = query.where(log.experiment == experiment)
            if tenant is not None:
                query = query.where(fb.tenant == tenant)
            return [self._feedback_info(r.FeedbackRow, r if r.log_id is not None else None) for r in s.execute(query)]

    def log_requests(self, rows: Iterable[RequestLogEntry | Mapping[str, Any]]) -> int:
        """Append a batch of request records in one transaction and one executemany. Blocking: the
        server calls it from a worker thread with the batch it has buffered. Returns the count."""
        now = utcnow()
        values = []
        for index, row in enumerate(rows):
            try:
                entry = row if isinstance(row, RequestLogEntry) else RequestLogEntry(**row)
            except TypeError as exc:
                raise InvalidInput(f"request log entry {index}: {exc}; use the fields of RequestLogEntry") from exc
            record = asdict(entry)
            record["created_at"] = record["created_at"] or now
            values.append(record)
        if not values:
            return 0
        with self._writing("request log") as s:
            s.execute(insert(RequestLogRow.__table__), values)  # a list of params: DBAPI executemany
        return len(values)

    @staticmethod
    def _samples_of(row: ExperimentRow) -> tuple[ColumnElement[bool], ...]:
        """Which request-log rows are samples of experiment `row`: logged under its name, on an arm
        (paused traffic is logged without one: it was not randomized, see `experiments`), and not
        older than the experiment (the log keys experiments by name, so an earlier experiment of the
        same name, deleted since, left rows under it too)."""
        log = RequestLogRow
        return log.experiment == row.name, log.arm.is_not(None), log.created_at >= row.created_at

    def _ratings_of(self, row: ExperimentRow) -> Subquery:
        """`(id, arm, rating)` of each rated sample of experiment `row`. A rating is attributed here,
        by joining it to its response's request-log row (same tenant and response id), so it counts
        whichever replica served the response and whenever that replica wrote its log; and only the
        newest rating of each (tenant, response) counts, so one response is one sample for the
        t-test however often it was rated."""
        log, fb = RequestLogRow, FeedbackRow
        samples = select(log.tenant, log.response_id, log.arm).where(*self._samples_of(row)).distinct().subquery()
        same_response = and_(fb.tenant == samples.c.tenant, fb.response_id == samples.c.response_id)
        newest = (select(func.max(fb.id)).select_from(fb).join(samples, same_response)
                  .group_by(fb.tenant, fb.response_id))
        return (select(fb.id, samples.c.arm, fb.rating).select_from(fb).join(samples, same_response)
                .where(fb.id.in_(newest)).subquery())

    def experiment_results(self, name: str) -> list[ArmResult]:
        """Per-arm totals of an experiment from the request log and feedback (the rows of
        `_samples_of` and `_ratings_of`); the current arms first (in their order), then any arm that
        only appears in the logs (it was removed later)."""
        log = RequestLogRow
        with self._reading() as s:
            row = experiment_row(s, name)
            arms = [Arm.model_validate(a) for a in row.arms]
            requests = {
                r.arm: r
                for r in s.execute(
                    select(
                        log.arm,
                        func.count().label("requests"),
                        func.sum(case((log.status_code >= 400, 1), else_=0)).label("errors"),
                        func.avg(log.latency_ms).label("latency"),
                        func.avg(log.ttft_ms).label("ttft"),
                        func.coalesce(func.sum(log.prompt_tokens), 0).label("prompt"),
                        func.coalesce(func.sum(log.completion_tokens), 0).label("completion"),
                    ).where(*self._samples_of(row)).group_by(log.arm)
                )
            }
            rated = self._ratings_of(row)
            ratings = {
                r.arm: r
                for r in s.execute(
                    select(rated.c.arm, func.count().label("n"), func.avg(rated.c.rating).label("mean"))
                    .group_by(rated.c.arm)
                )
            }
        views = {a.name: a.view for a in arms}
        order = [a.name for a in arms] + sorted((set(requests) | set(ratings)) - set(views))
        results = []
        for arm in order:
            req, rat = requests.get(arm), ratings.get(arm)
            results.append(ArmResult(
                arm=arm,
                view=views.get(arm),
                requests=int(req.requests) if req else 0,
                errors=int(req.errors or 0) if req else 0,
                mean_latency_ms=float(req.latency) if req and req.latency is not None else None,
                mean_ttft_ms=float(req.ttft) if req and req.ttft is not None else None,
                prompt_tokens=int(req.prompt) if req else 0,
                completion_tokens=int(req.completion) if req else 0,
                feedback_count=int(rat.n) if rat else 0,
                mean_rating=float(rat.mean) if rat and rat.mean is not None else None,
            ))
        return results

    MAX_STAT_SAMPLES = 100_000  # newest latencies / ratings per arm that percentiles and tests use

    def experiment_samples(self, name: str) -> list[ArmSamples]:
        """Per-arm raw observations of experiment `name` (see `ArmSamples`), in the order of
        `experiment_results`: exact totals, plus the newest `MAX_STAT_SAMPLES` latencies, times to
        first token and ratings of each arm."""
        totals = self.experiment_results(name)
        with self._reading() as s:
            row = experiment_row(s, name)
            weights = {a.name: a.weight for a in map(Arm.model_validate, row.arms)}
            rated = self._ratings_of(row)
            samples = []
            for total in totals:
                latency, ttft = self._arm_timings(s, row, total.arm)
                ratings = tuple(s.scalars(select(rated.c.rating).where(rated.c.arm == total.arm)
                                          .order_by(rated.c.id.desc()).limit(self.MAX_STAT_SAMPLES)))
                samples.append(ArmSamples(
                    arm=total.arm, view=total.view, weight=weights.get(total.arm), requests=total.requests,
                    errors=total.errors, prompt_tokens=total.prompt_tokens, completion_tokens=total.completion_tokens,
                    feedback_count=total.feedback_count, latency_ms=latency, ttft_ms=ttft, ratings=ratings))
        return samples

    def _arm_timings(self, s: Session, row: ExperimentRow, arm: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        rows = s.execute(
            select(RequestLogRow.latency_ms, RequestLogRow.ttft_ms)
            .where(*self._samples_of(row), RequestLogRow.arm == arm)
            .order_by(RequestLogRow.id.desc()).limit(self.MAX_STAT_SAMPLES)
        ).all()
        return tuple(r.latency_ms for r in rows), tuple(r.ttft_ms for r in rows if r.ttft_ms is not None)

    def experiment_report(self, name: str, *, confidence: float = stats.DEFAULT_CONFIDENCE) -> stats.ExperimentReport:
        """Per-arm statistics of experiment `name` — requests, errors (rate with interval), latency
        and TTFT percentiles, tokens, feedback mean with interval, the latest offline probe — and each
        arm's significance tests against the control arm. See `registry.stats` for the methods."""
        with self._reading() as s:
            experiment = experiment_info(s, experiment_row(s, name))
            views = {n: h for n, h in s.execute(select(ViewRow.name, ViewRow.content_hash))}
        samples = self.experiment_samples(name)
        try:
            return stats.experiment_report(experiment, samples, self.list_probe_results(name), views, confidence)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc

    def record_probe_results(self, experiment: str, results: Sequence[Mapping[str, Any]], *,
                             source: str | None = None) -> list[ProbeResult]:
        """Store one probe run: per arm `{"arm", "view", "view_version"?, "metrics", "samples"?}`.
        Each arm must be a current arm of the experiment and `view` the view it serves now (a probe
        of a view the arm no longer serves is refused); metrics are finite numbers or None."""
        if source is not None and len(source) > MAX_PROBE_SOURCE_CHARS:
            raise InvalidInput(f"probe source is {len(source)} characters; the limit is {MAX_PROBE_SOURCE_CHARS}")
        if not results:
            raise InvalidInput(f"probe of experiment {experiment!r} has no results; send one entry per arm")
        with self._writing(f"probe results of experiment {experiment!r}") as s:
            row = experiment_row(s, experiment)
            views = {a.name: a.view for a in map(Arm.model_validate, row.arms)}
            rows = [self._probe_row(row.id, views, index, r, source) for index, r in enumerate(results)]
            s.add_all(rows)
            s.flush()
            return [self._probe_info(experiment, r) for r in rows]

    @staticmethod
    def _probe_row(experiment_id: int, views: Mapping[str, str], index: int, result: Mapping[str, Any],
                   source: str | None) -> ProbeResultRow:
        arm, view = result.get("arm"), result.get("view")
        if arm not in views:
            raise InvalidInput(f"probe result {index}: arm {arm!r} is not an arm of the experiment; its arms are "
                               f"{sorted(views)}")
        if view != views[arm]:
            raise InvalidInput(f"probe result {index}: arm {arm!r} serves view {views[arm]!r} now, not {view!r}; "
                               "probe again")
        samples = result.get("samples", 0)
        if isinstance(samples, bool) or not isinstance(samples, int) or not 0 <= samples <= INT32_MAX:
            raise InvalidInput(f"probe result {index}: samples {samples!r} must be an integer from 0 to {INT32_MAX}")
        version = result.get("view_version")
        if version is not None and (not isinstance(version, str) or len(version) > 64):
            raise InvalidInput(f"probe result {index}: view_version must be a content hash (at most 64 characters)")
        return ProbeResultRow(experiment_id=experiment_id, arm=arm, view=view, view_version=version,
                              metrics=_probe_metrics(index, result.get("metrics")), samples=samples, source=source)

    def list_probe_results(self, experiment: str, *, limit: int = 1000) -> list[ProbeResult]:
        """Probe results of `experiment`, newest first."""
        with self._reading() as s:
            row = experiment_row(s, experiment)
            rows = s.scalars(select(ProbeResultRow).where(ProbeResultRow.experiment_id == row.id)
                             .order_by(ProbeResultRow.id.desc()).limit(limit))
            return [self._probe_info(experiment, r) for r in rows]

    @staticmethod
    def _probe_info(experiment: str, row: ProbeResultRow) -> ProbeResult:
        return ProbeResult(row.id, experiment, row.arm, row.view, row.view_version, dict(row.metrics), row.samples,
                           row.source, row.created_at)

    @staticmethod
    def _feedback_info(row: FeedbackRow, logged: Any | None) -> FeedbackInfo:
        """A rating with the attribution of `logged` (its response's request-log row, or None)."""
        experiment, arm, view = (logged.experiment, logged.arm, logged.view) if logged is not None else (None,) * 3
        return FeedbackInfo(row.id, row.response_id, row.tenant, experiment, arm, view, row.rating, row.comment,
                            row.created_at, logged is not None)


def _probe_metrics(index: int, metrics: Any) -> dict[str, float | None]:
    """Check a probe's `{metric name: finite number or None}` mapping; return it with floats."""
    if not isinstance(metrics, Mapping) or not metrics:
        raise InvalidInput(f"probe result {index}: metrics must be a non-empty object of metric name → number")
    if len(metrics) > MAX_PROBE_METRICS:
        raise InvalidInput(f"probe result {index}: {len(metrics)} metrics; the limit is {MAX_PROBE_METRICS}")
    problems, clean = [], {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not _METRIC_NAME_RE.match(key):
            problems.append(f"metric name {key!r} must match {_METRIC_NAME_RE.pattern}")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                    or not math.isfinite(value)):
            problems.append(f"metric {key!r} = {value!r} must be a finite number or null")
        else:
            clean[key] = None if value is None else float(value)
    if problems:
        raise InvalidInput(f"probe result {index} has invalid metrics:", problems)
    return clean
