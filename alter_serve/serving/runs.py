"""One model request's life in the service, from admission to its end.

    authorize (API key + model name → view, `routing`) → admit (tenant limits and the server's
    sequence cap, `limits`) → plan (tokenise and check, `planning`) → reserve (the exact worst case,
    prompt included) → lease (the view's current version, `routing`) → run (`generation`) → finish

`AlterService.begin` takes the steps up to the lease and returns a `RequestRun`; a refusal on the
way releases what was taken. `RequestRun.finish(status)` runs exactly once, however the request
ends (answered, failed, client gone; later calls do nothing): it releases the lease (a swapped-out
version drains once its last lease ends) and the permit, charging the tokens really used (prompt +
generated), and records the request in the metrics and the request log.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Literal

from .. import metrics
from ..registry import Principal, RequestLogEntry
from .generation import Generator, Outcome, new_response_id
from .limits import Permit
from .planning import Plan
from .request_log import RequestLog
from .routing import Routed, Target
from .schemas import ChatCompletionRequest, CompletionRequest

Endpoint = Literal["completions", "chat"]


class RequestRun:
    """An admitted, planned and leased model request (see the module docstring)."""

    def __init__(self, generator: Generator, request_log: RequestLog, endpoint: Endpoint,
                 body: CompletionRequest | ChatCompletionRequest, principal: Principal, routed: Routed,
                 permit: Permit, plan: Plan, target: Target):
        self._generator, self._request_log = generator, request_log
        self.endpoint, self.body, self.principal, self.routed = endpoint, body, principal, routed
        self.permit, self.plan, self.target = permit, plan, target
        self.outcome = Outcome(new_response_id("cmpl" if endpoint == "completions" else "chatcmpl"))
        self._finished = False

    @property
    def headers(self) -> dict[str, str]:
        """What served the response (view, experiment arm), and its id."""
        return {**self.target.headers(), "x-request-id": self.outcome.response_id}

    async def respond(self) -> dict:
        """Run the request to its end; the completion or chat completion object."""
        gen = self._generator
        run = gen.completion if self.endpoint == "completions" else gen.chat
        return await run(self.body, self.plan, self.target, self.outcome)

    def events(self) -> AsyncIterator[str]:
        """Run the request streamed: its chunks as server-sent events (without the final [DONE])."""
        gen = self._generator
        stream = gen.completion_stream if self.endpoint == "completions" else gen.chat_stream
        return stream(self.body, self.plan, self.target, self.outcome)

    def finish(self, status: int, _failure: BaseException | None = None) -> None:
        """The request ended with HTTP `status`: release and record it (once; see the module docstring)."""
        if self._finished:
            return
        self._finished = True
        outcome, routed = self.outcome, self.routed
        self.target.lease.release()
        self.permit.release(self.plan.prompt_tokens + outcome.completion_tokens)  # prompt + generated
        tenant = self.principal.tenant_name or "admin"
        latency = time.perf_counter() - outcome.started
        metrics.observe_request(tenant, routed.view, routed.sample_arm or "", self.endpoint, status, latency,
                                outcome.ttft_s, outcome.prompt_tokens, outcome.completion_tokens)
        self._request_log.append(RequestLogEntry(
            response_id=outcome.response_id, tenant=tenant, model=self.body.model, view=routed.view,
            status_code=status, latency_ms=latency * 1000, view_version=self.target.lease.version.version,
            experiment=routed.experiment, arm=routed.sample_arm,
            ttft_ms=None if outcome.ttft_s is None else outcome.ttft_s * 1000,
            prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens))
