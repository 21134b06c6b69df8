"""The load generator of bench.serve: N concurrent streaming clients, the same code for every server.

Each client is a thread with its own httpx connection that POSTs one streaming `/v1/completions` request and
timestamps every server-sent event carrying text. All clients start together (a barrier); the measurement
ends when the last stream ends. Only the stdlib and httpx: nothing here knows which server it talks to.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

REQUEST_TIMEOUT_S = 900.0  # 8 queued 128-token streams on a serial server on a busy 2-core box take minutes


@dataclass
class Stream:
    """One client's streamed answer, as the client saw it."""

    client: int
    sent: float = 0.0  # perf_counter() just before the request went out
    ended: float = 0.0
    text_times: list[float] = field(default_factory=list)  # arrival of every event that carried text
    text: str = ""
    usage_tokens: int | None = None  # completion_tokens, where the server reports usage in the stream
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def tokens(self) -> int:
        """Generated tokens: the server's own count when it sends usage, else one per text event."""
        return self.usage_tokens if self.usage_tokens is not None else len(self.text_times)

    @property
    def ttft(self) -> float | None:
        return self.text_times[0] - self.sent if self.text_times else None

    @property
    def gaps(self) -> list[float]:
        t = self.text_times
        return [b - a for a, b in zip(t, t[1:])]


def request_body(model: str, prompt: str, max_tokens: int, seed: int) -> dict[str, Any]:
    """Greedy (temperature 0, fixed seed), streamed, usage asked for (servers without it ignore the field)."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}


def read_stream(http: httpx.Client, url: str, body: dict[str, Any], out: Stream) -> Stream:
    """POST `body` to `url` and read its server-sent events into `out` (errors are recorded, not raised)."""
    out.sent = time.perf_counter()
    try:
        with http.stream("POST", url, json=body, timeout=REQUEST_TIMEOUT_S) as response:
            if response.status_code != 200:
                response.read()
                out.error = f"HTTP {response.status_code}: {response.text[:300]}"
                return out
            for line in response.iter_lines():
                if not line.startswith("data:"):  # comments (sse-starlette's pings), blank separators
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                _take(json.loads(data), out, time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out.error = f"{type(e).__name__}: {e}"
    finally:
        out.ended = time.perf_counter()
    return out


def _take(chunk: dict[str, Any], out: Stream, at: float) -> None:
    if "error" in chunk:  # an error event after the status line (OpenAI's shape)
        out.error = json.dumps(chunk["error"])[:300]
        return
    for choice in chunk.get("choices") or []:
        if choice.get("text"):
            out.text_times.append(at)
            out.text += choice["text"]
        if choice.get("finish_reason"):
            out.finish_reason = choice["finish_reason"]
    usage = chunk.get("usage")
    if usage:
        out.usage_tokens, out.prompt_tokens = usage.get("completion_tokens"), usage.get("prompt_tokens")


def run_clients(base_url: str, bodies: list[dict[str, Any]]) -> list[Stream]:
    """One thread per body, all released together; returns every client's Stream (in client order)."""
    url = base_url.rstrip("/") + "/v1/completions"
    streams = [Stream(client=i) for i in range(len(bodies))]
    barrier = threading.Barrier(len(bodies))

    def client(i: int) -> None:
        with httpx.Client() as http:
            barrier.wait()
            read_stream(http, url, bodies[i], streams[i])

    threads = [threading.Thread(target=client, args=(i,), name=f"bench-client-{i}") for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return streams


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(streams: list[Stream]) -> dict[str, Any]:
    """Aggregate generated tokens/s over the wall time from the first request to the last stream's end, and
    time to first token / inter-token latency percentiles (ms) over every client's events."""
    wall = max(s.ended for s in streams) - min(s.sent for s in streams)
    tokens = [s.tokens for s in streams]
    ttft = [s.ttft for s in streams if s.ttft is not None]
    gaps = [g for s in streams for g in s.gaps]

    def ms(v: float | None) -> float | None:
        return None if v is None else round(1000 * v, 2)

    return {
        "clients": len(streams),
        "wall_s": round(wall, 3),
        "aggregate_tok_s": round(sum(tokens) / wall, 2) if wall > 0 else None,
        "tokens_per_client": tokens,
        "text_events_per_client": [len(s.text_times) for s in streams],
        "token_count_source": "usage" if all(s.usage_tokens is not None for s in streams) else "text events",
        "prompt_tokens": sorted({s.prompt_tokens for s in streams if s.prompt_tokens is not None}),
        "finish_reasons": [s.finish_reason for s in streams],
        "errors": [s.error for s in streams if s.error],
        "ttft_ms": [ms(v) for v in ttft],
        "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p95_ms": ms(percentile(ttft, 95)),
        "itl_p50_ms": ms(percentile(gaps, 50)), "itl_p95_ms": ms(percentile(gaps, 95)),
        "itl_gaps": len(gaps),
        "texts": sorted({s.text for s in streams}),  # greedy: one text per distinct prompt, at most
    }
