"""Generation jobs: what a server hands an engine, and how the engine answers.

A `Job` is one sequence at the token level: prompt ids (chat template and image soft tokens already applied),
the image feature rows of its soft tokens, sampling parameters, a token budget and stop ids. Text (incremental
detokenization, stop strings) stays with the caller: the engine only speaks ids.

An `Engine` runs jobs on its own thread. It calls `on_token` once per generated token and `on_done` exactly once
at the end, both from its thread (a caller in asyncio hops back with `loop.call_soon_threadsafe`). `cancel()` may
be called from any thread (a client disconnected, a stop string matched): the engine drops the job before its
next step and reports "cancelled". Engines: `runtime.batching.BatchEngine` (one decoder call advances every
active sequence) and `serve.engines.SerialEngine` (one job at a time, for decoders without a batch dimension).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gemma3.runtime.sampling import SamplingParams, apply_repetition_penalty, apply_temperature

FINISH_REASONS = ("stop", "length", "context", "cancelled", "error")


class QueueFull(RuntimeError):
    """The engine's queue holds `max_queue` jobs already: the caller answers 429 / 503."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no more jobs."""


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability and the `n` most likely alternatives (ids, log-probabilities), all
    from the distribution after the sampling filters' temperature (before top-k/top-p/min-p truncation)."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()

    @classmethod
    def from_logits(cls, logits: np.ndarray, params: SamplingParams, token: int, top: int,
                    seen_ids: np.ndarray | None = None) -> TokenLogprobs:
        """`token`'s entry of the logits `sample` saw (after the repetition penalty over `seen_ids`), at the
        sampling temperature (greedy: the raw distribution), and the `top` most likely tokens', best first."""
        x = np.asarray(logits, dtype=np.float32).reshape(-1)
        if seen_ids is not None:
            x = apply_repetition_penalty(x, seen_ids, params.repetition_penalty)
        if not params.greedy:
            x = apply_temperature(x, params.temperature)
        # one log-sum-exp over the row (float32 terms, a float64 sum); only the entries reported are subtracted
        peak = float(x.max())
        lse = peak + math.log(float(np.exp(x - np.float32(peak)).sum(dtype=np.float64)))
        best = np.argpartition(x, x.size - top)[x.size - top:] if 0 < top < x.size else np.arange(x.size if top else 0)
        best = best[np.argsort(-x[best], kind="stable")]
        return cls(float(x[token]) - lse, tuple(int(i) for i in best), tuple(float(x[i]) - lse for i in best))


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_ids: frozenset[int]
    on_token: Callable[[int, TokenLogprobs | None], None]
    # (finish reason, the error when it is "error"): "stop" a stop id, "length" max_new_tokens, "context" the
    # exported context is full, "cancelled" `cancel()` or engine shutdown
    on_done: Callable[[str, BaseException | None], None]
    image_features: np.ndarray | None = None  # [rows, hidden]: one row per image soft token in prompt_ids
    logprobs: int | None = None  # None: none; n >= 0: the chosen token's and the top n alternatives'
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Engine(Protocol):
    max_batch: int

    def submit(self, job: Job) -> None:
        """Queue `job` (raises `QueueFull`, `EngineClosed`, or ValueError for a prompt past the context, before
        queueing)."""
        ...

    @property
    def active(self) -> int:
        """Sequences in the batch now: a cheap read without the engine's lock (per-token metrics read it)."""
        ...

    def stats(self) -> dict[str, int]:
        """At least {"queued": jobs waiting, "active": sequences in the batch}."""
        ...

    def close(self, cancel: bool = False) -> None:
        """Stop taking jobs; finish the in-flight ones (or cancel them) and join the engine's thread."""
        ...
