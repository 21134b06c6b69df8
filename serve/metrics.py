"""`GET /metrics` in Prometheus' text format (version 0.0.4), written here: a few counters and histograms are
simpler than a client library's process-wide registry (several apps in one test process would collide in it).

All updates come from the event loop's thread, so nothing here locks.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable

PREFIX = "gemma3_serve_"
# seconds: prefill of a long prompt on CPU can take tens of seconds, a decode step a few milliseconds
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped)) + "}"


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.labels = PREFIX + name, help, labels
        self.values: dict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, *labels: str, by: float = 1.0) -> None:
        self.values[labels] += by

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        values = self.values or ({(): 0.0} if not self.labels else {})
        lines += [f"{self.name}{_labels(self.labels, k)} {v:g}" for k, v in sorted(values.items())]
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.help, self.buckets = PREFIX + name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bucket (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, n in zip(self.buckets, self.counts):
            total += n
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {total}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:g}",
                  f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    """The server's metrics; `engine_stats` gives the live gauges (queue depth, batch size) at each scrape."""

    def __init__(self, engine_stats: Callable[[], dict[str, int]]) -> None:
        self.engine_stats = engine_stats
        self.requests = Counter("requests_total", "HTTP requests answered, by route and status", ("route", "status"))
        self.prompt_tokens = Counter("prompt_tokens_total", "prompt tokens of the generation requests")
        self.generated_tokens = Counter("generation_tokens_total", "tokens generated")
        self.ttft = Histogram("time_to_first_token_seconds", "request received to first token (queue included)")
        self.itl = Histogram("inter_token_latency_seconds", "time between two tokens of one request")
        self.batch = Histogram("batch_size", "sequences in the engine's batch, seen at each generated token",
                               buckets=(1, 2, 4, 8, 16, 32, 64))

    def render(self) -> str:
        stats = self.engine_stats()
        lines: list[str] = []
        for metric in (self.requests, self.prompt_tokens, self.generated_tokens, self.ttft, self.itl, self.batch):
            lines += metric.render()
        for key, name, help in (("queued", "queue_depth", "jobs waiting for the engine"),
                                ("active", "active_sequences", "sequences the engine is generating now")):
            lines += [f"# HELP {PREFIX}{name} {help}", f"# TYPE {PREFIX}{name} gauge",
                      f"{PREFIX}{name} {stats.get(key, 0)}"]
        return "\n".join(lines) + "\n"
