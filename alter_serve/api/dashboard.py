"""`GET /dashboard`: a static page that shows the experiments (per-arm charts of requests, latency,
feedback and probe scores, with the significance tests) and the views of every tenant.

The page itself holds no data and needs no key, so it is served without auth. Its script reads the
admin key from the URL fragment (`/dashboard#key=as-...`; a fragment is never sent to a server, and
the script removes it from the address bar) or from a form, keeps it in the tab's sessionStorage,
and calls the admin JSON API with `Authorization: Bearer <key>` — so the dashboard can show nothing
that the admin API would not. Everything is local: no CDN, charts are inline SVG drawn by plain JS.

A strict Content-Security-Policy allows only this origin's own script, styles and API calls, so
data shown on the page (names come from the registry) can never run as script.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from .errors import not_found

router = APIRouter(include_in_schema=False)
STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE = "dashboard.html"
ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


@router.get("/dashboard")
async def dashboard_page() -> Response:
    return Response(_read(PAGE), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/dashboard/{asset}")
async def dashboard_asset(asset: str) -> Response:
    media_type = ASSETS.get(asset)
    if media_type is None:  # only the known files: never a path into the file system
        raise not_found(f"The dashboard has no file '{asset}'.")
    return Response(_read(asset), media_type=media_type, headers=SECURITY_HEADERS)
