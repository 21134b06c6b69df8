"""What every route reads: the model, its engine, the server's settings and metrics, the vision thread."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gemma3.runtime.api import Model
from gemma3.runtime.jobs import Engine
from gemma3.serve.metrics import Metrics

DEFAULT_MAX_BODY_MB = 32.0  # a few base64 photos (4/3 of their size) fit; a runaway upload does not


@dataclass(frozen=True)
class Settings:
    model_id: str  # the name /v1/models lists and requests must use (or leave out)
    api_key: str | None = None  # Bearer key for /v1 routes; None: open
    allow_local_images: bool = False  # image_url may name a file on the server
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20)
    retry_after_s: int = 1  # the Retry-After of a 429 (queue full)


@dataclass
class ServerState:
    model: Model
    engine: Engine
    settings: Settings
    metrics: Metrics = field(init=False)
    # one worker: images are decoded and encoded one request at a time (memory), off the event loop
    vision: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "gemma3-vision"))
    started: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.engine.stats)
