"""Errors in the OpenAI body format: {"error": {"message", "type", "param", "code"}}.

Every failure a client can see goes through here, so no raw traceback ever reaches one. The
service's own errors (`serving.errors`) get their status code, OpenAI `type` and headers here
(`openai_error`), and nowhere else.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..serving.errors import (ENGINE_CLIENT_ERRORS, Forbidden, InvalidRequest, ModelNotFound, RateLimited,
                              ResourceConflict, ResourceNotFound, ServingError, Unauthenticated, Unavailable,
                              ViewLoadFailed, as_serving_error)

log = logging.getLogger(__name__)


class OpenAIError(Exception):
    """An error to return to the client as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def not_found(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(404, message, "invalid_request_error", param, "not_found")


class BodyTooLarge(StarletteHTTPException):
    """Raised while a request body streams in past `limit` bytes. An HTTPException, because
    FastAPI re-raises those from body parsing as they are (any other error there becomes a 400
    "error parsing the body"); the handler below answers it as the OpenAI-format 413."""

    def __init__(self, limit: int):
        super().__init__(413)
        self.limit = limit


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"Request body exceeds the {limit}-byte limit.", "invalid_request_error", None, "request_too_large")


# Each kind of service error: its HTTP status and OpenAI error `type`.
_STATUS: dict[type[ServingError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    Unauthenticated: (401, "authentication_error"),
    Forbidden: (403, "permission_error"),
    ModelNotFound: (404, "invalid_request_error"),
    ResourceNotFound: (404, "invalid_request_error"),
    ResourceConflict: (409, "invalid_request_error"),
    RateLimited: (429, "rate_limit_error"),
    ViewLoadFailed: (500, "server_error"),
    Unavailable: (503, "server_error"),
}


def openai_error(exc: ServingError) -> OpenAIError:
    """A service error in the OpenAI format: its status and type by its class, Retry-After where
    waiting helps, and WWW-Authenticate on a 401."""
    status, kind = next(found for cls, found in _STATUS.items() if isinstance(exc, cls))
    headers = {} if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    return OpenAIError(status, exc.message, kind, exc.param, exc.code, headers=headers)


def error_body(exc: OpenAIError) -> dict:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


def as_openai_error(exc: BaseException) -> OpenAIError | None:
    """What a request's failure tells the client, or None for a server fault (a 500): the service's
    errors (and the engine's, as `serving.errors.as_serving_error` classifies them) as
    `openai_error` says."""
    if isinstance(exc, OpenAIError):
        return exc
    refusal = as_serving_error(exc)
    return None if refusal is None else openai_error(refusal)


# pydantic names the member of a union a value was tried against in an error's location
# ("prompt", "list[int]", 0): those are types, not parameters. Field names here are lowercase
# identifiers, so a part that is not one (or names a builtin type, or a model class) is a tag.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "none", "list", "dict", "tuple", "set"})


def _param(loc: tuple) -> str | None:
    """An error location as the OpenAI `param`: field names and list indexes ('messages.0.content')."""
    parts = list(loc[1:] if loc[:1] == ("body",) else loc)
    kept = [str(p) for p in parts if isinstance(p, int) or not _is_union_tag(p)]
    return ".".join(kept) or None


def _is_union_tag(part: str) -> bool:
    return not part.isidentifier() or part in _TYPE_TAGS or part[:1].isupper()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid" and len(loc) == 2 and isinstance(loc[1], int):  # the body itself
        return "We could not parse the JSON body of your request: " + str(first.get("ctx", {}).get("error", first.get("msg"))), None
    param = _param(loc)
    if first.get("type") == "extra_forbidden":  # OpenAI's words for a field it does not know
        message = f"Unrecognized request argument supplied: {param}"
    else:
        message = f"{first.get('msg', 'invalid value')}" + (f" (parameter '{param}')" if param else "")
    others = list(dict.fromkeys(_param(tuple(e.get("loc", ()))) or "body" for e in errors[1:]))
    others = [p for p in others if p != (param or "body")][:3]
    if others:
        message += f"; also invalid: {', '.join(others)}"
    return message, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        # No key check here: `app.AuthGate` refused a bad key before the body was parsed.
        message, param = _validation_message(exc)
        return invalid(message, param).response()

    async def _known(_: Request, exc: Exception):
        return as_openai_error(exc).response()

    for known in (ServingError, *ENGINE_CLIENT_ERRORS):
        app.add_exception_handler(known, _known)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        if isinstance(exc, BodyTooLarge):
            return too_large(exc.limit).response()
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        # Its headers too: a 405's Allow, a 401's WWW-Authenticate.
        return OpenAIError(exc.status_code, str(exc.detail), kind, None, code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return OpenAIError(500, "The server had an error while processing your request.", "server_error",
                           None, "internal_error").response()
