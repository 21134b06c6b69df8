"""gemma3-serve end to end with the real `openai` client against a live uvicorn server on a tiny model with
Gemma's real tokenizer: answers equal the runtime's own (`load(dir).generate`) for the same seed, streamed or
not; usage, stop strings, logprobs, models/health/metrics, a mid-stream disconnect freeing the engine, and
concurrent clients with random parameters (SERVE_STRESS_S seconds, default 15)."""

from __future__ import annotations

import os
import random
import threading
import time

import httpx
import pytest

from gemma3.runtime.api import load
from gemma3.runtime.chat import render_chat
from tests.serve_live import MODEL_ID, Recording, live_server, slowed

STRESS_S = float(os.environ.get("SERVE_STRESS_S", "15"))
CLIENTS = 16
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def live(model):
    with live_server(model) as server:
        yield server


def test_chat_equals_the_runtime_for_the_same_seed(model, live):
    client = live.client()
    out = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=12, temperature=0.9, seed=7)
    want = model.generate(HELLO, max_new_tokens=12, temperature=0.9, seed=7)
    choice = out.choices[0]
    assert choice.message.content == want.text and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and out.object == "chat.completion" and out.model == MODEL_ID
    assert out.usage.prompt_tokens == len(render_chat(model.tokenizer, HELLO))
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12
    # Gemma's own knobs as extra body fields reach the sampler
    knobs = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3}
    out = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_completion_tokens=10, seed=2,
                                         extra_body=knobs)
    assert out.choices[0].message.content == model.generate(HELLO, max_new_tokens=10, seed=2, **knobs).text


def test_streaming_equals_the_whole_answer(live):
    client = live.client()
    args = {"model": MODEL_ID, "messages": HELLO, "max_tokens": 20, "temperature": 1.0, "seed": 11}
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_completions_are_raw_prompts(model, live):
    client = live.client()
    out = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=9, temperature=0.7,
                                    seed=4)
    want = model.generate("Once upon a time", raw=True, max_new_tokens=9, temperature=0.7, seed=4)
    assert out.choices[0].text == want.text and out.object == "text_completion"
    assert out.usage.prompt_tokens == len(model.prompt_ids("Once upon a time", raw=True))
    stream = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=9, temperature=0.7,
                                       seed=4, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == want.text


def test_stop_strings_end_the_answer_and_are_not_returned(model, live):
    client = live.client()
    full = model.generate(HELLO, max_new_tokens=30, temperature=0).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.find(stop)]
    for stops in (stop, ["\x00never", stop]):
        out = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=30, temperature=0,
                                             stop=stops)
        assert out.choices[0].message.content == cut and out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens < 30
        chunks = list(client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=30, temperature=0,
                                                     stop=stops, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(model, live):
    client = live.client()
    out = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob) and entry.logprob <= 0
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
    comp = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(top) <= 2 for top in lp.top_logprobs)


def test_models_health_and_metrics(live):
    client = live.client()
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["engine"] == "SerialEngine" and health["queued"] == 0
    text = httpx.get(live.url + "/metrics").text
    for name in ("requests_total", "prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds",
                 "inter_token_latency_seconds", "queue_depth", "batch_size"):
        assert f"gemma3_serve_{name}" in text
    assert 'gemma3_serve_requests_total{route="/v1/models",status="200"}' in text


def test_api_key(model):
    import openai

    with live_server(model, api_key="sekret") as live:
        with pytest.raises(openai.AuthenticationError) as e:
            live.client(api_key="wrong").models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        r = httpx.post(live.url + "/v1/chat/completions", json={"messages": HELLO})
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
        assert [m.id for m in live.client(api_key="sekret").models.list().data] == [MODEL_ID]
        assert httpx.get(live.url + "/health").status_code == 200  # probes need no key


def test_a_client_leaving_mid_stream_frees_its_slot(model):
    engine = Recording(slowed(model, 0.02))
    with live_server(model, engine=engine) as live:
        body = {"model": MODEL_ID, "messages": HELLO, "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(4):  # the role chunk and a few tokens, then hang up
                next(lines)
        deadline = time.monotonic() + 3
        while not engine.ends and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.ends and engine.ends[0][0] == "cancelled" and engine.ends[0][1] < 50
        assert engine.stats() == {"queued": 0, "active": 0}
        # the same for a non-streamed request whose client times out
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)
        deadline = time.monotonic() + 3
        while len(engine.ends) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.ends[1][0] == "cancelled" and engine.ends[1][1] < 60


def test_concurrent_clients_with_random_parameters(model, live):
    """16 clients for STRESS_S seconds: each request twice with one seed, streamed and not; the two agree."""
    client = live.client(timeout=120)
    failures: list[str] = []
    done = [0]
    stop_at = time.monotonic() + STRESS_S

    def one(rng: random.Random) -> None:
        chat = rng.random() < 0.6
        args = {"model": MODEL_ID, "max_tokens": rng.randint(1, 24), "temperature": rng.choice([0, 0.5, 1.0, 1.5]),
                "seed": rng.randrange(2**31), "top_p": rng.choice([0.5, 0.9, 1.0])}
        if rng.random() < 0.3:
            args["stop"] = rng.choice(["e", "the", ["a", "o"]])
        if chat:
            args["messages"] = [{"role": "user", "content": rng.choice(["Hi", "Tell me a story", "2+2?"])}]
            whole = client.chat.completions.create(**args)
            parts = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
            expected = whole.choices[0].message.content
        else:
            args["prompt"] = rng.choice(["Once", "The weather", "1, 2, 3,"])
            whole = client.completions.create(**args)
            parts = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in parts if c.choices)
            expected = whole.choices[0].text
        finish = [c.choices[0].finish_reason for c in parts if c.choices and c.choices[0].finish_reason]
        if text != expected or finish != [whole.choices[0].finish_reason] or parts[-1].usage != whole.usage:
            failures.append(f"{args}: {text!r} != {expected!r} or {finish} or {parts[-1].usage} != {whole.usage}")
        if whole.usage.completion_tokens > args["max_tokens"]:
            failures.append(f"{args}: {whole.usage.completion_tokens} tokens")

    def worker(k: int) -> None:
        rng = random.Random(k)
        while time.monotonic() < stop_at and not failures:
            try:
                one(rng)
                done[0] += 1
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert done[0] >= CLIENTS
    # A stop string ends the response at once and cancels the job, which the engine sees before its next step:
    # idle soon after, never a slot held for good.
    idle_by = time.monotonic() + 5.0
    while live.engine.stats() != {"queued": 0, "active": 0} and time.monotonic() < idle_by:
        time.sleep(0.01)
    assert live.engine.stats() == {"queued": 0, "active": 0}
    print(f"{done[0]} request pairs from {CLIENTS} clients in {STRESS_S:g} s")


@pytest.mark.real270m
def test_real_270m_answers_like_the_runtime(ort_270m_fp32):
    """The real 270M (the session's shared export): greedy chat through the server equals the runtime's."""
    model = load(ort_270m_fp32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with live_server(model, model_id="gemma-3-270m") as live:
        out = live.client().chat.completions.create(model="gemma-3-270m", messages=messages, max_tokens=16,
                                                    temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in out if c.choices)
    assert text == model.generate(messages, max_new_tokens=16, temperature=0).text and text.strip()
