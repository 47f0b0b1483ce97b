"""What the service refuses, in its own words. No HTTP here: `api.errors` alone turns each class
into an OpenAI error body with its status code and headers.

Every error carries the message the client reads (what was wrong and what to do), `param` (the
request field to change, if one is to blame) and `code` (a machine-readable reason). Errors that
waiting cures carry `retry_after_s` (at least 1). The classes say *what kind* of refusal it is:

    InvalidRequest     it could never run as sent (change `param`)
    Unauthenticated    no valid API key
    Forbidden          a valid key that may not do this (a tenant key on an admin route)
    ModelNotFound      a model name the caller may not use: one answer for "does not exist" and
                       "not yours", so it never tells a tenant what exists
    ResourceNotFound   an admin object (bundle, view, tenant, key, experiment) that does not exist
    ResourceConflict   an admin change that clashes with what exists
    RateLimited        the tenant is over one of its limits now
    Unavailable        the server cannot take it now (engine not ready, view loading, server busy)
    ViewLoadFailed     the registry took an admin change, but the engine could not load a view
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from vllm.exceptions import VLLMClientError

from ..core.bundle import BundleError
from ..engine.vllm_engine import EngineUnavailable
from ..registry import Conflict, InvalidInput, NotFound, RegistryError

T = TypeVar("T")


class ServingError(Exception):
    """A refusal the client is told about as-is (a server fault is any other exception)."""

    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        self.code = code if code is not None else self.default_code
        self.retry_after_s = None if retry_after_s is None else max(1, int(retry_after_s))


class InvalidRequest(ServingError):
    pass


class Unauthenticated(ServingError):
    default_code = "invalid_api_key"

    def __init__(self, message: str = "Invalid or missing API key. Send 'Authorization: Bearer <key>'."):
        super().__init__(message)


class Forbidden(ServingError):
    default_code = "forbidden"


class ModelNotFound(ServingError):
    default_code = "model_not_found"

    def __init__(self, model: str | None):
        super().__init__(f"The model '{model}' does not exist or you do not have access to it.", param="model")


class ResourceNotFound(ServingError):
    default_code = "not_found"


class ResourceConflict(ServingError):
    default_code = "conflict"


class RateLimited(ServingError):
    default_code = "rate_limit_exceeded"


class Unavailable(ServingError):
    default_code = "service_unavailable"


class ViewLoadFailed(ServingError):
    """The registry has an admin change, but the engine could not load the new version of a view
    (the message names each view and its error)."""

    default_code = "view_load_failed"


async def registry_call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a registry operation in a worker thread; its refusals become the service's errors (a
    missing object, a conflict, an invalid bundle or input)."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except NotFound as exc:
        raise ResourceNotFound(exc.message) from None
    except Conflict as exc:
        raise ResourceConflict(exc.message) from None
    except BundleError as exc:
        raise InvalidRequest(str(exc), param="bundle", code="invalid_bundle") from None
    except (InvalidInput, RegistryError) as exc:
        raise InvalidRequest(exc.message) from None


# The engine's exceptions that are the client's to see (`as_serving_error` says how).
ENGINE_CLIENT_ERRORS: tuple[type[Exception], ...] = (EngineUnavailable, VLLMClientError)


def as_serving_error(exc: BaseException) -> ServingError | None:
    """What a request's failure tells the client, or None for a server fault: a ServingError as it
    is; the engine not taking requests now is `Unavailable`; an error vLLM blames on the request
    (VLLMClientError, e.g. a prompt it will not take) is an `InvalidRequest`, as in vLLM's server."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, EngineUnavailable):
        return Unavailable(str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, VLLMClientError):
        return InvalidRequest(str(exc), param=getattr(exc, "parameter", None))
    return None
