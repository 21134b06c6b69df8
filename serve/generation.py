"""One request's job seen from the event loop: token ids in (from the engine's thread), text deltas out.

The engine speaks ids; text is the server's (runtime/jobs.py): each id goes through the tokenizer's incremental
detokenizer, and text that could still grow into a stop string is held back until it cannot. When a stop
string completes, the text before it is the last delta and the job is cancelled, which frees its slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from gemma3.runtime.chat import STOP_IDS
from gemma3.runtime.jobs import Engine, Job, TokenLogprobs
from gemma3.runtime.sampling import SamplingParams
from gemma3.runtime.tokenizer import Tokenizer
from gemma3.serve.errors import APIError
from gemma3.serve.metrics import Metrics

# the engine's reasons as OpenAI's: the context filling up is a length limit too
FINISH = {"stop": "stop", "length": "length", "context": "length"}


class StopText:
    """Finds the first of `stops` in a growing text; holds back any tail that may still become one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.held = stops, ""
        self.longest = max((len(s) for s in stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that is safe to emit now, and whether a stop string ended it (it is not included)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = next((k for k in range(min(len(buf), self.longest - 1), 0, -1)
                     if any(s.startswith(buf[-k:]) for s in self.stops)), 0)
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


@dataclass
class Delta:
    text: str
    tokens: list[tuple[int, TokenLogprobs | None]] = field(default_factory=list)  # the ids that made it


@dataclass
class Outcome:
    finish_reason: str | None = None  # "stop" / "length" once the run ended normally
    completion_tokens: int = 0


class Run:
    """Submit a job and iterate its `deltas()`; leaving the iteration early cancels the job."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, metrics: Metrics, prompt_ids: list[int],
                 params: SamplingParams, max_new_tokens: int, stops: list[str], logprobs: int | None,
                 image_features: np.ndarray | None, received: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple] = asyncio.Queue()
        self.tokenizer, self.metrics, self.engine = tokenizer, metrics, engine
        self.stops, self.received = StopText(stops), received
        self.prompt_tokens, self.outcome = len(prompt_ids), Outcome()
        self.job = Job(prompt_ids, params, max_new_tokens, STOP_IDS, on_token=self._on_token, on_done=self._on_done,
                       image_features=image_features, logprobs=logprobs)
        engine.submit(self.job)  # QueueFull / ContextLengthError / EngineClosed: before anything is sent
        metrics.prompt_tokens.inc(by=len(prompt_ids))

    # --- the engine's thread -----------------------------------------------------------------------------

    def _post(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.job.cancel()

    def _on_token(self, token: int, logprobs: TokenLogprobs | None) -> None:
        self._post(("token", token, logprobs, time.perf_counter()))

    def _on_done(self, reason: str, error: BaseException | None) -> None:
        self._post(("done", reason, error))

    # --- the event loop ----------------------------------------------------------------------------------

    async def deltas(self) -> AsyncIterator[Delta]:
        stream = self.tokenizer.stream()
        pending: list[tuple[int, TokenLogprobs | None]] = []
        last = None
        try:
            while True:
                event = await self.events.get()
                if event[0] == "token":
                    _, token, logprobs, at = event
                    self._count(at, last)
                    last = at
                    pending.append((token, logprobs))
                    text, stopped = self.stops.feed(stream.push(token))
                    if stopped:
                        self.outcome.finish_reason = "stop"
                        self.job.cancel()
                        yield Delta(text, pending)
                        return
                    if text:
                        yield Delta(text, pending)
                        pending = []
                    continue
                _, reason, error = event
                if reason not in FINISH:
                    raise _failure(reason, error)
                text, stopped = self.stops.feed(stream.flush())
                text += "" if stopped else self.stops.flush()
                self.outcome.finish_reason = "stop" if stopped else FINISH[reason]
                if text or pending:
                    yield Delta(text, pending)
                return
        finally:
            self.abandon()  # the client left, or an error: free the slot now

    def abandon(self) -> None:
        """Cancel the job unless it ended normally: for responses torn down before `deltas()` ever ran."""
        if self.outcome.finish_reason is None:
            self.job.cancel()

    def _count(self, at: float, last: float | None) -> None:
        self.outcome.completion_tokens += 1
        m = self.metrics
        m.generated_tokens.inc()
        if last is None:
            m.ttft.observe(at - self.received)
        else:
            m.itl.observe(at - last)
        m.batch.observe(max(1, self.engine.active))

    async def collect(self) -> tuple[str, list[tuple[int, TokenLogprobs | None]]]:
        """The whole answer: its text and every token (with its logprobs)."""
        texts, tokens = [], []
        async for delta in self.deltas():
            texts.append(delta.text)
            tokens += delta.tokens
        return "".join(texts), tokens


def _failure(reason: str, error: BaseException | None) -> APIError:
    if reason == "cancelled":
        return APIError(503, "the request was cancelled: the server is shutting down", None, "cancelled",
                        type="server_error")
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", None, "generation_failed",
                    type="server_error")
