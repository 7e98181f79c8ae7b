"""The steering console: a browser page at /console (docs/console.md).

One HTML page and its script, style sheet and icon, shipped in this package (static/) and
served as they are: no build step, nothing fetched from elsewhere. The page holds no data and
needs no key to load (its routes are open in server/policy.py); everything it shows comes from
the public API, called from the browser with the key the user types, so it can do nothing the
API would refuse that key. Every response here carries a strict Content-Security-Policy (no
inline script or style, connections to this server only, no framing) and `nosniff`.

`unipool-serve --no-console` (UNIPOOL_CONSOLE=0) leaves these routes unmounted.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from starlette.responses import Response

from ..errors import openai_error

PAGE_ROUTE = "/console"
ASSET_ROUTE = "/console/static/{asset}"
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self' data:", "connect-src 'self'",
    "frame-ancestors 'none'", "base-uri 'none'", "form-action 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated: an upgraded server's page never runs an old script
}
PAGE = "console.html"
ASSETS = {  # the only files served (no path from the URL ever reaches the file system)
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}

router = APIRouter()


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


@router.get(PAGE_ROUTE, include_in_schema=False)
async def page():
    return Response(_read(PAGE), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get(ASSET_ROUTE, include_in_schema=False)
async def asset(asset: str):
    if asset not in ASSETS:
        return openai_error(404, f"no console asset {asset[:80]!r}", code="not_found")
    return Response(_read(asset), media_type=ASSETS[asset], headers=SECURITY_HEADERS)
