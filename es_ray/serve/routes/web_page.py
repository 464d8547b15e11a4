"""GET /: search with click feedback and the lifecycle at a glance (es_ray/serve/web/index.html)."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

# The page's script and style are inline and it talks only to this API: nothing else may load or run.
WEB_PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
                "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@cache
def _page() -> str:
    """Read once per replica."""
    return resources.files("es_ray.serve").joinpath("web/index.html").read_text(encoding="utf-8")


@router.get("/", include_in_schema=False, response_class=HTMLResponse)
def web_page() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Content-Security-Policy": WEB_PAGE_CSP})
