"""A live gemma3-serve for tests: uvicorn on a free port in a thread, and engine wrappers that slow the decoder or
record how each job ended."""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import uvicorn

from gemma3.runtime.api import Model
from gemma3.runtime.jobs import Job
from gemma3.serve.app import create_app
from gemma3.serve.engines import SerialEngine
from gemma3.serve.state import Settings

MODEL_ID = "tiny"


class SlowDecoder:
    """The model's decoder, `delay` seconds slower per decoding step: long enough generations to interrupt."""

    def __init__(self, decoder: Any, delay: float) -> None:
        self.decoder, self.delay = decoder, delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self.decoder, name)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.delay)
        return self.decoder.step(*args, **kwargs)


def slowed(model: Model, delay: float) -> Model:
    slow = copy.copy(model)
    slow.decoder = SlowDecoder(model.decoder, delay)
    return slow


class Recording(SerialEngine):
    """A SerialEngine that keeps how every job ended: (finish reason, tokens generated)."""

    def __init__(self, model: Model, max_queue: int = 64) -> None:
        super().__init__(model, max_queue)
        self.ends: list[tuple[str, int]] = []

    def submit(self, job: Job) -> None:
        count = [0]
        on_token, on_done = job.on_token, job.on_done

        def token(t: int, lp: Any) -> None:
            count[0] += 1
            on_token(t, lp)

        def done(reason: str, error: BaseException | None) -> None:
            self.ends.append((reason, count[0]))
            on_done(reason, error)

        job.on_token, job.on_done = token, done
        super().submit(job)


@dataclass
class Live:
    url: str
    engine: SerialEngine
    server: uvicorn.Server

    def client(self, api_key: str = "none", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, **{"max_retries": 0, "timeout": 60, **kwargs})


@contextlib.contextmanager
def live_server(model: Model, engine: SerialEngine | None = None, **settings: Any) -> Iterator[Live]:
    """The app on 127.0.0.1:<free port> until the block ends (then a graceful shutdown, as on SIGTERM)."""
    engine = engine if engine is not None else SerialEngine(model)
    app = create_app(model, engine, Settings(model_id=settings.pop("model_id", MODEL_ID), **settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{port}", engine, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
