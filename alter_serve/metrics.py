"""Prometheus collectors of alter-serve, labelled by tenant, view and A/B arm where they apply.

vLLM registers its own `vllm:*` collectors (including `vllm:lora_requests_info`) in the same
default registry, so one `/metrics` scrape exports both.

Their labels name every tenant, view, experiment and arm, so they are not for tenants: on the API
port `/metrics` needs an admin key, and Prometheus scrapes a separate listener (`metrics_port`)
that only the monitoring network can reach.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, Summary, generate_latest,
                               start_http_server)

log = logging.getLogger(__name__)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_REQUEST_LABELS = ("tenant", "view", "arm", "endpoint")

REQUESTS = Counter("alter_requests", "Requests served, by outcome.", (*_REQUEST_LABELS, "status"))
LATENCY = Histogram("alter_request_latency_seconds", "Request latency (until the last byte).",
                    _REQUEST_LABELS, buckets=_LATENCY_BUCKETS)
TTFT = Histogram("alter_time_to_first_token_seconds", "Time to first streamed token.", _REQUEST_LABELS,
                 buckets=_LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("alter_prompt_tokens", "Prompt tokens processed.", ("tenant", "view", "arm"))
COMPLETION_TOKENS = Counter("alter_completion_tokens", "Completion tokens generated.", ("tenant", "view", "arm"))
ADAPTER_OPS = Counter("alter_adapter_operations", "Adapter operations.", ("op", "result"))
ADAPTER_OP_SECONDS = Histogram("alter_adapter_operation_seconds", "Adapter operation durations.", ("op",),
                               buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
LOADED_VIEWS = Gauge("alter_loaded_views", "View versions loaded in the engine (current + draining).", ("state",))
REJECTED = Counter("alter_rejected_requests", "Requests refused before reaching the engine.", ("reason",))
# A Summary, not a Counter: ratings may be negative; it exports _count and _sum (mean = sum / count).
FEEDBACK = Summary("alter_feedback_rating", "Feedback ratings received.", ("tenant", "experiment", "arm"))
ENGINE_READY = Gauge("alter_engine_ready", "1 when the vLLM engine accepts requests.")
ENGINE_RESTARTS = Counter("alter_engine_restarts", "vLLM engine restarts after a crash.")
REQUEST_LOG_DROPPED = Counter("alter_request_log_dropped_rows",
                              "Request-log rows dropped because the registry could not be written for too long.")


@contextmanager
def adapter_op(op: str):
    """Count and time one adapter operation (compose, load, swap, remove)."""
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        ADAPTER_OPS.labels(op, "error").inc()
        raise
    ADAPTER_OPS.labels(op, "ok").inc()
    ADAPTER_OP_SECONDS.labels(op).observe(time.perf_counter() - started)


def observe_request(tenant: str, view: str, arm: str, endpoint: str, status: int, latency_s: float,
                    ttft_s: float | None, prompt_tokens: int, completion_tokens: int) -> None:
    labels = (tenant, view, arm, endpoint)
    REQUESTS.labels(*labels, str(status)).inc()
    LATENCY.labels(*labels).observe(latency_s)
    if ttft_s is not None:
        TTFT.labels(*labels).observe(ttft_s)
    PROMPT_TOKENS.labels(tenant, view, arm).inc(prompt_tokens)
    COMPLETION_TOKENS.labels(tenant, view, arm).inc(completion_tokens)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def serve(host: str, port: int | None) -> WSGIServer | None:
    """Export the metrics on their own listener, `http://host:port/metrics` (any path answers), with
    no authentication: bind it where only Prometheus reaches it. None when `port` is None."""
    if port is None:
        return None
    server, _ = start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
