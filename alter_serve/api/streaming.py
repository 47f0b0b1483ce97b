"""Server-sent events: a generator's event stream framed for the client, ending in [DONE], with a
failure answered as an OpenAI error event (the same mapping as a non-streamed answer), and a
response that always finishes the request (lease and permit released) however the client leaves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi.responses import StreamingResponse

from ..serving.generation import SSE_DONE, sse
from .errors import as_openai_error, error_body


async def sse_stream(
    events: AsyncIterator[str], on_finish: Callable[[int, BaseException | None], None]
) -> AsyncIterator[str]:
    """Wrap an event stream: errors become an SSE error event, [DONE] ends it, `on_finish` always
    runs — after `events` is closed, so its engine requests are aborted before the lease goes."""
    status, failure = 200, None
    try:
        async with aclosing(events):
            async for event in events:
                yield event
        yield SSE_DONE
    except (asyncio.CancelledError, GeneratorExit) as exc:  # client went away (cancelled, or closed mid-send)
        status, failure = 499, exc
        raise
    except Exception as exc:
        error = as_openai_error(exc)
        if error is None:
            status, failure = 500, exc
            yield sse({"error": {"message": "The server had an error while streaming.", "type": "server_error",
                                 "param": None, "code": "internal_error"}})
        else:
            status, failure = error.status, exc
            yield sse(error_body(error))
    finally:
        on_finish(status, failure)


class FinishingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always runs `finish`, even when the client leaves before the body
    iterator starts (then the iterator's own `finally` never runs and the lease would leak).

    A client that leaves while a chunk is being sent leaves the body iterator suspended, not
    closed; it is closed here, so its engine requests are aborted before the lease is released."""

    def __init__(self, content, finish, **kwargs):
        super().__init__(content, **kwargs)
        self._finish = finish

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self._finish(499)
