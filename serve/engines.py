"""Engines the server can run on: `SerialEngine` here, `runtime.batching.BatchEngine` where it exists.

`SerialEngine` runs one job at a time on its own thread with the runtime's own generation loop
(`runtime.generate.generate`: prefill, `sample`, decode steps), so a seeded job gives exactly the tokens
`load(dir).generate(...)` gives. It is the engine for decoders without a batch dimension (older exports, the
TensorRT backend): later requests wait in its queue.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

import numpy as np

from gemma3.runtime.api import Model
from gemma3.runtime.generate import GenerationStats, SeenIds, check_prompt_fits, generate
from gemma3.runtime.jobs import Engine, EngineClosed, Job, QueueFull, TokenLogprobs

log = logging.getLogger(__name__)


class _LogitsTap:
    """The decoder, remembering the logits of its last call: what `generate` sampled the yielded token from."""

    def __init__(self, decoder: Any) -> None:
        self.decoder, self.logits = decoder, None

    def prefill(self, *args: Any, **kwargs: Any) -> np.ndarray:
        self.logits = self.decoder.prefill(*args, **kwargs)
        return self.logits

    def step(self, *args: Any, **kwargs: Any) -> np.ndarray:
        self.logits = self.decoder.step(*args, **kwargs)
        return self.logits


class SerialEngine:
    """One job at a time on one thread; up to `max_queue` more wait (first come, first served)."""

    max_batch = 1

    def __init__(self, model: Model, max_queue: int = 64) -> None:
        self.model, self.max_queue = model, max_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._current: Job | None = None
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="gemma3-serial-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        check_prompt_fits(len(job.prompt_ids), self.model.manifest.max_context)  # ContextLengthError
        with self._cond:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting")
            self._queue.append(job)
            self._cond.notify()

    @property
    def active(self) -> int:
        return int(self._current is not None)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"queued": len(self._queue), "active": self.active}

    def close(self, cancel: bool = False) -> None:
        with self._cond:
            self._closing = True
            if cancel:
                for job in [*self._queue, *([self._current] if self._current else [])]:
                    job.cancel()
            self._cond.notify_all()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                self._current = job = self._queue.popleft()
            try:
                reason, error = self._run(job)
            finally:
                with self._cond:
                    self._current = None
            job.on_done(reason, error)  # after the slot is free: a client told "done" sees an idle engine

    def _run(self, job: Job) -> tuple[str, BaseException | None]:
        """The job's tokens through `on_token`; returns its finish reason and error for `on_done`."""
        if job.cancelled.is_set():
            return "cancelled", None
        decoder = self.model.decoder
        tap = _LogitsTap(decoder) if job.logprobs is not None else None
        # what `generate` penalises, for the logprobs (tracked only when both are on)
        seen = SeenIds(self.model.manifest.model.vocab_size, job.prompt_ids,
                       job.logprobs is not None and job.params.repetition_penalty != 1.0)
        stats = GenerationStats()
        try:
            pieces = generate(tap or decoder, decoder.new_cache(len(job.prompt_ids) + 1), job.prompt_ids,
                              job.params, job.max_new_tokens, stop_ids=job.stop_ids, stats=stats,
                              image_features=job.image_features)
            reason = None
            for piece in pieces:  # no text stream: every piece is one token
                logprobs = None
                if tap is not None and job.logprobs is not None:
                    logprobs = TokenLogprobs.from_logits(tap.logits, job.params, piece.token_id, job.logprobs,
                                                         seen.ids())
                    seen.add(piece.token_id)
                job.on_token(piece.token_id, logprobs)
                if job.cancelled.is_set():  # before the next decoder step
                    pieces.close()
                    reason = "cancelled"
                    break
        except Exception as e:  # the job fails, the engine goes on
            log.exception("generation failed")
            return "error", e
        return reason or stats.finish_reason or "length", None


def make_engine(model: Model, max_batch: int, max_queue: int) -> Engine:
    """`BatchEngine` when the runtime has it and the export can batch, else `SerialEngine`."""
    if max_batch > 1:
        try:
            from gemma3.runtime.batching import BatchEngine  # written alongside this server
        except ImportError:
            BatchEngine = None  # noqa: N806
        if BatchEngine is not None:
            try:
                return BatchEngine(model, max_batch, max_queue)
            except (ValueError, NotImplementedError) as e:  # an export without a batch dimension
                log.warning("batching is not available for this export (%s): serving one request at a time", e)
    return SerialEngine(model, max_queue)
