"""The request log, buffered: one row per finished request, kept in memory and written to the
registry in batches (`request_log_flush_s`), so a request never waits for a database write.

A batch the registry refuses is kept for the next flush, before the rows logged since; bounded:
beyond `MAX_PENDING_ROWS` the oldest rows are dropped, counted and logged, so an unreachable
registry costs request history, never the server's memory.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import datetime, timezone

from .. import metrics
from ..registry import Registry, RequestLogEntry

log = logging.getLogger(__name__)


class RequestLog:
    MAX_PENDING_ROWS = 100_000  # rows kept in memory while the registry cannot be written

    def __init__(self, registry: Registry):
        self.registry = registry
        self._rows: list[RequestLogEntry] = []
        self.dropped_rows = 0  # rows given up on while the registry could not be written

    def append(self, row: RequestLogEntry) -> None:
        # Stamped now, not when its batch is written (maybe much later, after a failed write): the
        # statistics count an experiment's rows from its creation time (`Registry._samples_of`).
        self._rows.append(row if row.created_at is not None else replace(row, created_at=datetime.now(timezone.utc)))

    async def flush(self) -> None:
        """Write the rows logged so far (in a worker thread); a failed write keeps them and raises."""
        rows, self._rows = self._rows, []
        if not rows:
            return
        try:
            await asyncio.to_thread(self.registry.log_requests, rows)
        except Exception:
            self._keep_for_retry(rows)
            raise

    def _keep_for_retry(self, rows: list[RequestLogEntry]) -> None:
        """Put a batch the registry refused back before the rows logged since (bounded, see the
        module docstring)."""
        pending = rows + self._rows
        overflow = len(pending) - self.MAX_PENDING_ROWS
        if overflow > 0:
            self.dropped_rows += overflow
            metrics.REQUEST_LOG_DROPPED.inc(overflow)
            log.error("request log: %d rows are waiting for the registry, more than the %d kept; dropped the "
                      "%d oldest (%d since start)", len(pending), self.MAX_PENDING_ROWS, overflow, self.dropped_rows)
            pending = pending[overflow:]
        self._rows = pending
