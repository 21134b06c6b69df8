"""The HTTP routes: OpenAI's chat completions, completions and models, plus /health and /metrics (the chat page at
`/` is serve/page.py)."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from gemma3.runtime.jobs import EngineClosed, QueueFull
from gemma3.runtime.kv_cache import ContextLengthError
from gemma3.serve.errors import APIError, unauthorized, validation_error
from gemma3.serve.generation import Run
from gemma3.serve.prompts import Prepared, prepare_chat, prepare_completion, refuse_unknown_model
from gemma3.serve.responses import DONE, Shape, chat_logprobs, completion_logprobs, sse, usage
from gemma3.serve.schemas import ChatRequest, CompletionRequest, _Generation
from gemma3.serve.state import ServerState

B = TypeVar("B", bound=BaseModel)
T = TypeVar("T")
CLIENT_GONE = 499  # nginx's status for a client that closed the connection: only the metrics see it
DISCONNECT_POLL_S = 0.25


def server(request: Request) -> ServerState:
    return request.app.state.server


def require_key(request: Request) -> None:
    """`Authorization: Bearer KEY` on every /v1 route when the server has a key (compared in constant time)."""
    key = server(request).settings.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise unauthorized()


v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
plain = APIRouter()


async def parse(request: Request, schema: type[B]) -> B:
    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as e:
        raise validation_error(e.errors()) from None


@v1.get("/models")
async def models(request: Request) -> dict[str, Any]:
    s = server(request)
    # sees_images: an extra field (OpenAI's clients keep unknown ones) telling the chat page to offer uploads
    return {"object": "list", "data": [{"id": s.settings.model_id, "object": "model", "created": s.started,
                                        "owned_by": "gemma3-export", "sees_images": s.model.sees_images}]}


@v1.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    received = time.perf_counter()
    s = server(request)
    body = await parse(request, ChatRequest)
    refuse_unknown_model(s.settings.model_id, body.model)
    prepared = await prepare_chat(s.model, body, s.vision, s.settings.allow_local_images)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return await respond(request, body, prepared, Shape(True, s.settings.model_id), logprobs, "messages", received)


@v1.post("/completions")
async def completions(request: Request) -> Response:
    received = time.perf_counter()
    s = server(request)
    body = await parse(request, CompletionRequest)
    refuse_unknown_model(s.settings.model_id, body.model)
    prepared = prepare_completion(s.model, body)
    return await respond(request, body, prepared, Shape(False, s.settings.model_id), body.logprobs, "prompt",
                         received)


def start(s: ServerState, prepared: Prepared, logprobs: int | None, stops: list[str], prompt_param: str,
          received: float) -> Run:
    """Submit the job, or the error a client can act on: too long (400), try later (429), shutting down (503)."""
    try:
        return Run(s.engine, s.model.tokenizer, s.metrics, prepared.prompt_ids, prepared.params,
                   prepared.max_new_tokens, stops, logprobs, prepared.image_features, received)
    except ContextLengthError as e:
        raise APIError(400, str(e), prompt_param, "context_length_exceeded") from None
    except QueueFull as e:
        raise APIError(429, f"the server is busy ({e}): retry shortly", None, "queue_full", type="rate_limit_error",
                       headers={"Retry-After": str(s.settings.retry_after_s)}) from None
    except EngineClosed as e:
        raise APIError(503, str(e), None, "shutting_down", type="server_error") from None


async def respond(request: Request, body: _Generation, prepared: Prepared, shape: Shape, logprobs: int | None,
                  prompt_param: str, received: float) -> Response:
    s = server(request)
    run = start(s, prepared, logprobs, body.stop_strings(), prompt_param, received)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return JobStream(run, events(s, run, shape, logprobs, include_usage), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        text, tokens = await unless_disconnected(request, run.collect())
    except ConnectionAbortedError:
        return Response(status_code=CLIENT_GONE)
    finally:
        run.abandon()  # a cancelled handler (shutdown) may not have started the collection
    lp = None
    if logprobs is not None:
        tok = s.model.tokenizer
        lp = chat_logprobs(tok, tokens) if shape.chat else completion_logprobs(tok, tokens, 0)
    out = run.outcome
    return JSONResponse(shape.full(text, out.finish_reason, lp, usage(run.prompt_tokens, out.completion_tokens)))


class JobStream(StreamingResponse):
    """A streamed answer whose job is cancelled however the response ends, even before its first chunk."""

    def __init__(self, run: Run, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run = run

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.abandon()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; cancelled (so its job is cancelled) as soon as the client hangs up."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ConnectionAbortedError
    finally:
        task.cancel()


async def events(s: ServerState, run: Run, shape: Shape, logprobs: int | None,
                 include_usage: bool) -> AsyncIterator[str]:
    """The SSE stream. Starlette cancels this generator when the client disconnects: `run.deltas()`'s
    cleanup then cancels the job, which frees its slot before the engine's next step."""
    tok = s.model.tokenizer
    if shape.chat:
        yield sse(shape.chunk(None, first=True))
    offset = 0
    try:
        async for delta in run.deltas():
            lp = None
            if logprobs is not None:
                lp = chat_logprobs(tok, delta.tokens) if shape.chat else completion_logprobs(tok, delta.tokens, offset)
            offset += len(delta.text)
            if delta.text or lp:
                yield sse(shape.chunk(delta.text, None, lp))
        yield sse(shape.chunk(None, run.outcome.finish_reason))
    except APIError as e:  # the status line is sent already: the error is an event (OpenAI's clients raise it)
        yield sse(e.body())
    if include_usage:
        yield sse(shape.usage_chunk(usage(run.prompt_tokens, run.outcome.completion_tokens)))
    yield DONE


@plain.get("/health")
async def health(request: Request) -> dict[str, Any]:
    s = server(request)
    return {"status": "ok", "model": s.settings.model_id, "engine": type(s.engine).__name__, **s.engine.stats()}


@plain.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(server(request).metrics.render(), media_type="text/plain; version=0.0.4")
