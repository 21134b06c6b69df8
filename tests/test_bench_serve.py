"""bench.serve's client side without a server: the SSE reading and the statistics (httpx.MockTransport)."""

from __future__ import annotations

import json

import httpx
import pytest

from bench.serve import prompt
from bench.serve_client import Stream, percentile, read_stream, request_body, summarize


def _sse(events: list[str]) -> bytes:
    return "".join(f"{e}\r\n\r\n" for e in events).encode()


def _chunk(text: str | None, finish: str | None = None) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})


def _read(body: bytes, status: int = 200) -> Stream:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    with httpx.Client(transport=transport) as http:
        return read_stream(http, "http://x/v1/completions", request_body("bench", "p", 4, 1), Stream(0))


def test_reads_usage_when_the_server_sends_it() -> None:
    usage = "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 9}})
    s = _read(_sse([_chunk("a"), _chunk("b"), _chunk(None, "length"), usage, "data: [DONE]"]))
    assert (s.text, s.tokens, s.prompt_tokens, s.finish_reason, s.error) == ("ab", 3, 9, "length", None)
    assert len(s.text_times) == 2 and s.ttft is not None and len(s.gaps) == 1


def test_counts_text_events_without_usage_and_skips_pings() -> None:
    s = _read(_sse([": ping - 2026-01-01", _chunk("x"), _chunk(""), _chunk("y", "length"), "data: [DONE]"]))
    assert (s.text, s.tokens, s.usage_tokens, s.finish_reason) == ("xy", 2, None, "length")


def test_records_http_and_stream_errors() -> None:
    assert _read(b'{"error": "busy"}', status=429).error.startswith("HTTP 429")
    s = _read(_sse([_chunk("a"), "data: " + json.dumps({"error": {"message": "boom"}})]))
    assert "boom" in s.error and s.text == "a"


def test_summary_rates_and_percentiles() -> None:
    streams = [Stream(0, sent=0.0, ended=2.0, text_times=[0.5, 1.0, 1.5]),
               Stream(1, sent=0.0, ended=4.0, text_times=[1.0, 2.0, 3.0], usage_tokens=3)]
    out = summarize(streams)
    assert out["aggregate_tok_s"] == pytest.approx(6 / 4)
    assert out["ttft_ms"] == [500.0, 1000.0] and out["ttft_p50_ms"] == 750.0
    assert out["itl_p50_ms"] == 750.0 and out["itl_gaps"] == 4
    assert out["token_count_source"] == "text events"  # one stream had no usage
    assert percentile([], 50) is None and percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)


def test_prompts_differ_from_the_start_and_have_one_shape() -> None:
    prompts = [prompt(i) for i in range(8)]
    assert len(set(prompts)) == 8 and len({len(p) for p in prompts}) == 1
    assert len({p.split(".")[0] for p in prompts}) == 8  # no shared prefix past "Sequence "
