"""The ASGI app: routes, OpenAI-shaped errors for everything, a request body limit, metrics, and the engine's
shutdown in the lifespan (uvicorn runs it after its graceful shutdown has drained or timed out the requests)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gemma3.runtime.api import Model
from gemma3.runtime.jobs import Engine
from gemma3.serve.errors import APIError, too_large, validation_error
from gemma3.serve.page import STATIC, page
from gemma3.serve.routes import plain, v1
from gemma3.serve.state import ServerState, Settings

log = logging.getLogger(__name__)


def create_app(model: Model, engine: Engine, settings: Settings) -> FastAPI:
    state = ServerState(model, engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # Requests still running here outlived uvicorn's graceful timeout: cancel them, then join the engine.
        await asyncio.to_thread(engine.close, True)
        state.vision.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="gemma3-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.include_router(v1)
    app.include_router(plain)
    app.include_router(page)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return validation_error(list(e.errors())).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return APIError(e.status_code, str(e.detail), None, code).response()

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(e).__name__}", None, "internal_error",
                        type="server_error").response()

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(CountRequests, state=state)
    return app


class BodyLimit:
    """413 for a body over `limit` bytes: at once from Content-Length, or while a chunked body arrives."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, too_large(self.limit))
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise too_large(self.limit)  # inside the route's body read: the app's handler answers it
            return message

        await self.app(scope, limited, send)


async def _send_json(send: Send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class CountRequests:
    """requests_total by route (the matched path, so unknown paths share one label) and status (499: the client
    left before an answer started)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: dict[str, Any] = {}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:  # answered 500 by Starlette's outermost error middleware
            status.setdefault("code", 500)
            raise
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.state.metrics.requests.inc(route, str(status.get("code", 499)))
