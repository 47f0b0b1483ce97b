"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/feedback."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import metrics
from ..registry import Principal, RequestLogEntry
from .auth import model_request_key, tenant_principal
from .errors import OpenAIError, not_found, registry_call
from .generation import Outcome, Target, new_response_id, sse_stream
from .schemas import ChatCompletionRequest, CompletionRequest, FeedbackRequest

router = APIRouter()
Tenant = Annotated[Principal, Depends(tenant_principal)]
ModelKey = Annotated[str, Depends(model_request_key)]
# Routes whose key is authenticated after the body is parsed (with the model: one registry read).
KEY_AFTER_BODY = frozenset({"/v1/completions", "/v1/chat/completions"})


@router.get("/v1/models")
async def list_models(request: Request, principal: Tenant) -> dict:
    service = request.app.state.service
    views = {v.name: v for v in await asyncio.to_thread(service.registry.list_views)}
    cards = []
    for name in sorted(principal.views):
        view = views.get(name)
        if view is None:
            continue
        loaded = service.adapters.current(name)
        cards.append({
            "id": name, "object": "model", "created": int(view.created_at.timestamp()), "owned_by": "alter-serve",
            "root": str(service.model_dir.name), "parent": None,
            "lineage": {
                "base_model": service.model_dir.name,
                "base_fingerprint": service.registry.base_fingerprint,
                "bundle": view.bundle,
                "heads": view.spec.spec_dict() if not view.is_original else {},
                "version": view.version or "base",
                "loaded": loaded is not None and service.ready,
            },
        })
    return {"object": "list", "data": cards}


def _sticky_lookup(request: Request, user: str | None):
    def lookup(kind: str) -> str | None:
        if kind == "user":
            return user
        if kind.startswith("header:"):
            return request.headers.get(kind.split(":", 1)[1])
        return None  # random
    return lookup


class FinishingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always runs `finish`, even when the client leaves before the body
    iterator starts (then the iterator's own `finally` never runs and the lease would leak)."""

    def __init__(self, content, finish, **kwargs):
        super().__init__(content, **kwargs)
        self._finish = finish

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._finish(499)


async def _serve(request: Request, secret: str, body, endpoint: str, plan_fn, once, stream):
    service = request.app.state.service
    principal, routed = await service.authorize(secret, body.model, _sticky_lookup(request, body.user))
    permit = service.limiter.admit(principal, body)  # 400 over the max_tokens cap, 429 over a tenant limit
    try:
        plan = plan_fn(body)
        target: Target = service.target(body.model, routed)
    except BaseException:
        permit.release(0)
        raise
    kind = "cmpl" if endpoint == "completions" else "chatcmpl"
    outcome = Outcome(new_response_id(kind))
    tenant = principal.tenant_name or "admin"

    finished = False

    def finish(status: int, _: BaseException | None = None) -> None:
        nonlocal finished
        if finished:
            return
        finished = True
        target.lease.release()
        permit.release(outcome.completion_tokens)
        latency = time.perf_counter() - outcome.started
        metrics.observe_request(tenant, routed.view, routed.arm or "", endpoint, status, latency, outcome.ttft_s,
                                outcome.prompt_tokens, outcome.completion_tokens)
        service.log_request(RequestLogEntry(
            response_id=outcome.response_id, tenant=tenant, model=body.model, view=routed.view,
            status_code=status, latency_ms=latency * 1000, view_version=target.lease.version.version,
            experiment=routed.experiment, arm=routed.arm,
            ttft_ms=None if outcome.ttft_s is None else outcome.ttft_s * 1000,
            prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens))

    headers = {**target.headers(), "x-request-id": outcome.response_id}
    if body.stream:
        return FinishingStreamingResponse(sse_stream(stream(body, plan, target, outcome), finish), finish,
                                          media_type="text/event-stream",
                                          headers={**headers, "Cache-Control": "no-cache"})
    try:
        payload = await once(body, plan, target, outcome)
    except OpenAIError as exc:
        finish(exc.status)
        raise
    except BaseException:
        finish(500)
        raise
    finish(200)
    return JSONResponse(payload, headers=headers)


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest, secret: ModelKey):
    gen = request.app.state.service.generator
    return await _serve(request, secret, body, "completions", gen.plan_completion, gen.completion, gen.completion_stream)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest, secret: ModelKey):
    gen = request.app.state.service.generator
    return await _serve(request, secret, body, "chat", gen.plan_chat, gen.chat, gen.chat_stream)


@router.post("/v1/feedback")
async def feedback(request: Request, body: FeedbackRequest, principal: Tenant) -> dict:
    service = request.app.state.service
    if principal.tenant_name is None:
        raise not_found("Feedback is recorded for tenant responses; admin keys have none.", "response_id")
    await service.flush_request_log()  # a rating right after its response must find the response's arm
    info = await registry_call(service.registry.record_feedback, principal.tenant_name, body.response_id,
                               body.rating, comment=body.comment)
    metrics.FEEDBACK.labels(principal.tenant_name, info.experiment or "", info.arm or "").observe(body.rating)
    return {"object": "feedback", "id": info.id, "response_id": info.response_id, "experiment": info.experiment,
            "arm": info.arm, "view": info.view}
