"""The chat page: `GET /` and its plain HTML/CSS/JS (serve/static, shipped as package data; no build step, no CDN).

The page speaks to the server's own OpenAI routes: GET /v1/models (the model id, whether it sees images; a 401
there means the server wants a key) and POST /v1/chat/completions with `stream: true`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).parent / "static"
# Everything the page loads is its own: a script injected into a model's answer could not run or call out.
# Uploaded images are shown from data: URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

page = APIRouter()


@page.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)
