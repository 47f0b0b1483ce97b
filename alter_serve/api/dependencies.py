"""What a route depends on: the service, typed (`ServiceDep`), instead of reaching into
`request.app.state` in every handler."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..serving.service import AlterService


def get_service(request: Request) -> AlterService:
    """The service `create_app` was built for."""
    return request.app.state.service


ServiceDep = Annotated[AlterService, Depends(get_service)]
