"""`GET /`: a page to try the model in a browser (static/chat.html: one file of HTML, CSS and JavaScript, no
build step and nothing fetched from elsewhere). It chats through the server's own API: the models and adapters
from `GET /v1/models`, answers streamed from `POST /v1/chat/completions`; it asks for the API key when a call
answers 401 and shows every refusal as the API words it.

The page itself needs no key (it holds nothing secret); the API calls it makes carry the key the user types.
Its Content-Security-Policy lets it reach only its own server: no script, style, image or connection elsewhere.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = (files(__package__) / "static" / "chat.html").read_text(encoding="utf-8")
"""The page, read once at import (it ships as package data)."""

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter()


@router.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
async def chat_page() -> HTMLResponse:
    """The chat page (HTML), with headers that keep it to its own server."""
    return HTMLResponse(PAGE, headers=HEADERS)
