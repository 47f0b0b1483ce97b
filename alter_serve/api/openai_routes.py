"""OpenAI-compatible routes: /v1/models, /v1/models/{id}, /v1/completions, /v1/chat/completions,
/v1/feedback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from .. import metrics
from ..registry import Principal, RequestLogEntry, experiments
from .auth import model_request_key, tenant_principal
from ..engine.vllm_engine import EngineUnavailable, cancel_and_wait
from ..serving.errors import ModelNotFound
from .errors import OpenAIError, as_openai_error, not_found, registry_call
from ..serving.generation import Outcome, new_response_id
from ..serving.routing import Target
from .streaming import FinishingStreamingResponse, sse_stream
from ..serving.schemas import DEFAULT_MODEL, ChatCompletionRequest, CompletionRequest, FeedbackRequest

router = APIRouter()
Tenant = Annotated[Principal, Depends(tenant_principal)]
ModelKey = Annotated[str, Depends(model_request_key)]


@router.get("/v1/models")
async def list_models(request: Request, principal: Tenant) -> dict:
    cards = await _model_cards(request.app.state.service, principal)
    return {"object": "list", "data": [cards[name] for name in sorted(cards)]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(request: Request, model_id: str, principal: Tenant) -> dict:
    """One model of the caller's; anything else is the same 404 as a completion for it."""
    card = (await _model_cards(request.app.state.service, principal)).get(model_id)
    if card is None:
        raise ModelNotFound(model_id)
    return card


def _catalog(registry, principal: Principal) -> tuple[list, list]:
    """Every view, and the unstopped experiments of the principal's tenant (one worker-thread hop)."""
    exps = registry.list_experiments(tenant=principal.tenant_name) if principal.tenant_name else []
    return registry.list_views(), [e for e in exps if e.status != experiments.STOPPED]


def _max_model_len(engine) -> int | None:
    """The context length, as vLLM's model cards give it: the running engine's, else the configured
    one (None: the model's own, known once the engine is up)."""
    try:
        return engine.max_model_len
    except EngineUnavailable:
        return engine.config.max_model_len


async def _model_cards(service, principal: Principal) -> dict[str, dict]:
    """The model names `principal` may send, as OpenAI model objects by id: its granted views, the
    aliases of its tenant's unstopped experiments (routed before a view of the same name, so the
    alias's card wins), and `default` for its tenant's default view (unless a view or alias has
    that name). Each has the context length (`max_model_len`), as in vLLM's model cards."""
    views, running = await registry_call(_catalog, service.registry, principal)
    by_name = {v.name: v for v in views}
    base = service.model_dir.name
    context = _max_model_len(service.engine)
    cards: dict[str, dict] = {}
    for name in principal.views:
        view = by_name.get(name)
        if view is None:
            continue
        loaded = service.adapters.current(name)
        cards[name] = {
            "id": name, "object": "model", "created": int(view.created_at.timestamp()), "owned_by": "alter-serve",
            "root": str(base), "parent": None, "max_model_len": context,
            "lineage": {
                "base_model": base,
                "base_fingerprint": service.registry.base_fingerprint,
                "bundle": view.bundle,
                "heads": view.spec.spec_dict() if not view.is_original else {},
                "version": view.version or "base",
                "loaded": loaded is not None and service.ready,
                # This version failed to load here (the error itself is for admins: GET /admin/views).
                "load_failed": _load_failed(service, view),
            },
        }
    for exp in running:
        cards[exp.alias] = {
            "id": exp.alias, "object": "model", "created": int(exp.created_at.timestamp()), "owned_by": "alter-serve",
            "root": str(base), "parent": None, "max_model_len": context,
            # The arms' names are in every response's headers; the views behind them are not shown.
            "experiment": {"name": exp.name, "status": exp.status, "arms": [arm.name for arm in exp.arms]},
        }
    if principal.default_view in cards and DEFAULT_MODEL not in cards:
        cards[DEFAULT_MODEL] = {**cards[principal.default_view], "id": DEFAULT_MODEL,
                                "default_view": principal.default_view}
    return cards


def _load_failed(service, view) -> bool:
    return service.publisher.failure(view) is not None


def _sticky_lookup(request: Request, user: str | None):
    """The request's sticky value for an experiment's sticky kind and the key id (see
    `registry.experiments.sticky_value`: `user`, else the API key; a header; or random)."""
    def lookup(kind: str, key_id: int) -> str | None:
        return experiments.sticky_value(kind, user=user, headers=request.headers, key_id=key_id)
    return lookup


class ClientGone(Exception):
    """The client disconnected before its (non-streaming) response was ready."""


async def _unless_disconnected(request: Request, work):
    """Await `work` unless the client disconnects first: then cancel it (its engine requests are
    aborted, and have been once this returns) and raise ClientGone. The request body has been read
    by now, so the next ASGI message is `http.disconnect` (what StreamingResponse waits for too)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself was cancelled
        await cancel_and_wait((task, watch))
        raise
    if task.done():
        await cancel_and_wait((watch,))
        return task.result()
    await cancel_and_wait((task,))
    raise ClientGone


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _serve(request: Request, secret: str, body, endpoint: str, plan_fn, once, stream):
    service = request.app.state.service
    principal, routed = await service.router.authorize(secret, body.model, _sticky_lookup(request, body.user))
    # 400 for what could never run, 429 over a tenant limit, 503 over the server's sequence cap.
    permit = service.limiter.admit(principal, body)
    try:
        plan = await plan_fn(body, permit.max_tokens, permit.budget)  # tokenised in a worker thread
        permit.reserve(plan.prompt_tokens, plan.max_tokens)  # the exact worst case, prompt included
        target: Target = service.router.lease(body.model, routed, principal)
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
        permit.release(plan.prompt_tokens + outcome.completion_tokens)  # what it really used: prompt + generated
        latency = time.perf_counter() - outcome.started
        metrics.observe_request(tenant, routed.view, routed.sample_arm or "", endpoint, status, latency, outcome.ttft_s,
                                outcome.prompt_tokens, outcome.completion_tokens)
        service.request_log.append(RequestLogEntry(
            response_id=outcome.response_id, tenant=tenant, model=body.model, view=routed.view,
            status_code=status, latency_ms=latency * 1000, view_version=target.lease.version.version,
            experiment=routed.experiment, arm=routed.sample_arm,
            ttft_ms=None if outcome.ttft_s is None else outcome.ttft_s * 1000,
            prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens))

    headers = {**target.headers(), "x-request-id": outcome.response_id}
    if body.stream:
        return FinishingStreamingResponse(sse_stream(stream(body, plan, target, outcome), finish), finish,
                                          media_type="text/event-stream",
                                          headers={**headers, "Cache-Control": "no-cache"})
    try:
        payload = await _unless_disconnected(request, once(body, plan, target, outcome))
    except ClientGone:
        finish(499)
        return Response(status_code=499)  # nobody reads it
    except Exception as exc:
        error = as_openai_error(exc)
        finish(500 if error is None else error.status)
        raise  # the app's exception handlers answer it with the same mapping (errors.install_error_handlers)
    except BaseException:
        finish(499)
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
    service.feedback_limiter.take(principal)  # 429 with Retry-After over the tenant's feedback rate
    # The statistics attribute a rating through the request log whenever it is written; flushing ours
    # first only lets this reply (and the metric) name the arm of a response this replica just served.
    # So a failed flush does not fail the rating (the periodic flush logs it and retries the rows).
    with contextlib.suppress(Exception):
        await service.request_log.flush()
    try:
        info = await registry_call(service.registry.record_feedback, principal.tenant_name, body.response_id,
                                   body.rating, comment=body.comment, require_logged=True)
    except OpenAIError as exc:
        if exc.status == 404:  # one message for "never served" and "not yours": it reveals nothing
            raise not_found(f"No response '{body.response_id}' was served to this API key's tenant (a response "
                            "another replica served in the last second may not be logged yet: retry then).",
                            "response_id") from None
        raise
    metrics.FEEDBACK.labels(principal.tenant_name, info.experiment or "", info.arm or "").observe(body.rating)
    return {"object": "feedback", "id": info.id, "response_id": info.response_id, "attributed": info.attributed,
            "experiment": info.experiment, "arm": info.arm, "view": info.view}
