"""OpenAI-compatible routes: /v1/models, /v1/models/{id}, /v1/completions, /v1/chat/completions,
/v1/feedback.

A model request is begun by the service (`AlterService.begin`: authorize, admit, plan, lease) and
answered here, as JSON or as server-sent events; whichever way it ends (answered, failed, client
gone), its run is finished with the status the client got.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..engine.vllm_engine import cancel_and_wait
from ..registry import Principal, experiments
from ..serving.errors import ModelNotFound
from ..serving.routing import StickyLookup
from ..serving.runs import Endpoint
from ..serving.schemas import ChatCompletionRequest, CompletionRequest, FeedbackRequest
from ..serving.service import AlterService
from .auth import model_request_key, tenant_principal
from .dependencies import ServiceDep
from .errors import as_openai_error
from .streaming import FinishingStreamingResponse, sse_stream

router = APIRouter()
Tenant = Annotated[Principal, Depends(tenant_principal)]
ModelKey = Annotated[str, Depends(model_request_key)]


@router.get("/v1/models")
async def list_models(service: ServiceDep, principal: Tenant) -> dict:
    cards = await service.catalog.cards(principal)
    return {"object": "list", "data": [cards[name] for name in sorted(cards)]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(service: ServiceDep, model_id: str, principal: Tenant) -> dict:
    """One model of the caller's; anything else is the same 404 as a completion for it."""
    card = (await service.catalog.cards(principal)).get(model_id)
    if card is None:
        raise ModelNotFound(model_id)
    return card


def _sticky_lookup(request: Request, user: str | None) -> StickyLookup:
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


async def _serve(request: Request, service: AlterService, secret: str, body: CompletionRequest | ChatCompletionRequest,
                 endpoint: Endpoint):
    run = await service.begin(secret, body, endpoint, _sticky_lookup(request, body.user))
    if body.stream:
        return FinishingStreamingResponse(sse_stream(run.events(), run.finish), run.finish,
                                          media_type="text/event-stream",
                                          headers={**run.headers, "Cache-Control": "no-cache"})
    try:
        payload = await _unless_disconnected(request, run.respond())
    except ClientGone:
        run.finish(499)
        return Response(status_code=499)  # nobody reads it
    except Exception as exc:
        error = as_openai_error(exc)
        run.finish(500 if error is None else error.status)
        raise  # the app's exception handlers answer it with the same mapping (errors.install_error_handlers)
    except BaseException:
        run.finish(499)
        raise
    run.finish(200)
    return JSONResponse(payload, headers=run.headers)


@router.post("/v1/completions")
async def completions(request: Request, service: ServiceDep, body: CompletionRequest, secret: ModelKey):
    return await _serve(request, service, secret, body, "completions")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, service: ServiceDep, body: ChatCompletionRequest, secret: ModelKey):
    return await _serve(request, service, secret, body, "chat")


@router.post("/v1/feedback")
async def feedback(service: ServiceDep, body: FeedbackRequest, principal: Tenant) -> dict:
    info = await service.record_feedback(principal, body.response_id, body.rating, body.comment)
    return {"object": "feedback", "id": info.id, "response_id": info.response_id, "attributed": info.attributed,
            "experiment": info.experiment, "arm": info.arm, "view": info.view}
