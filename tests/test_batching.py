"""Continuous batching (runtime/batching.py) on a tiny random Gemma 3 written by the real exporter (batch graph).

Every sequence of a batch must produce the tokens it produces alone (`generate` on its own cache): greedy and
seeded sampling, with prompts of different lengths prefilled in chunks between decode steps, jobs joining and
leaving mid-way (rows moved to keep the batch packed), and contexts running far past the local window (window 8 in
a buffer of 24 rows, compacted per sequence).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import numpy as np
import pytest

from gemma3.runtime.api import Model
from gemma3.runtime.batching import BatchEngine, NotBatched
from gemma3.runtime.generate import generate
from gemma3.runtime.jobs import EngineClosed, Job, QueueFull, TokenLogprobs
from gemma3.runtime.kv_cache import ContextLengthError
from gemma3.runtime.manifest import ManifestError, load_manifest
from gemma3.runtime.ort_decoder import OrtDecoder
from gemma3.runtime.sampling import SamplingParams
from tests.test_runtime_tinymodel import write_tiny_model

GREEDY = SamplingParams(temperature=0)
CHUNK = 16  # prefill steps of 16 tokens: a 40-token prompt takes 3 steps, interleaved with decode steps
TIMEOUT = 60


@pytest.fixture(scope="module")
def model(tiny_fp32_export) -> Model:
    folder = tiny_fp32_export  # tests/conftest.py: tiny(), 96 positions, shared with the speculative tests
    manifest = load_manifest(folder)
    assert manifest.decoder.batch
    # the engine reads the manifest and decoder only (tiny()'s 512-row vocabulary is too small for the tokenizer)
    return Model(manifest, None, OrtDecoder(manifest, threads=1, chunk_size=CHUNK))  # type: ignore[arg-type]


def alone(model: Model, prompt: list[int], n: int, params: SamplingParams = GREEDY, stop=()) -> tuple[list[int], str]:
    from gemma3.runtime.generate import GenerationStats

    stats = GenerationStats()
    cache = model.decoder.new_cache()
    tokens = [p.token_id for p in generate(model.decoder, cache, prompt, params, n, stop_ids=stop, stats=stats)]
    return tokens, stats.finish_reason


class Run:
    """One job's record: its tokens, logprobs and end, and an event set when it ends."""

    def __init__(self, prompt: list[int], max_new: int, params: SamplingParams = GREEDY, stop=(),
                 logprobs: int | None = None, after: Callable[[Run], None] | None = None) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprobs | None] = []
        self.reason: str | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.after = after  # called after each token (on the engine's thread)
        self.job = Job(prompt, params, max_new, frozenset(stop), self._token, self._done, logprobs=logprobs)

    def _token(self, token: int, lp: TokenLogprobs | None) -> None:
        self.tokens.append(token)
        self.logprobs.append(lp)
        if self.after is not None:
            self.after(self)

    def _done(self, reason: str, error: BaseException | None) -> None:
        self.reason, self.error = reason, error
        self.done.set()

    def wait(self) -> Run:
        assert self.done.wait(TIMEOUT), "the job never ended"
        return self


PROMPTS = [[2, *range(10, 10 + k)] for k in (3, 17, 40, 9, 70, 5)]
MAX_NEW = [60, 35, 50, 20, 45, 30]


def staggered(engine: BatchEngine, params: list[SamplingParams], logprobs: int | None = None) -> list[Run]:
    """Job 0 first; job k > 0 is submitted (on the engine's thread, so the timeline is deterministic) when job k - 1
    has produced 2 + 2k tokens: jobs join a running batch, and some finish while another is being prefilled."""
    runs: list[Run] = []

    def trigger(k: int) -> Callable[[Run], None] | None:
        if k + 1 >= len(PROMPTS):
            return None

        def after(run: Run) -> None:
            if len(run.tokens) == 4 + 2 * k:
                engine.submit(runs[k + 1].job)
        return after

    for k, (prompt, n) in enumerate(zip(PROMPTS, MAX_NEW)):
        runs.append(Run(prompt, n, params[k], logprobs=logprobs, after=trigger(k)))
    engine.submit(runs[0].job)
    return [run.wait() for run in runs]


def test_batched_greedy_equals_alone(model):
    engine = BatchEngine(model, max_batch=4, prefill_chunk=8)  # the 70-token prompt: 9 prefill steps
    finishes, original = [], engine._finish

    def finish(seq, reason, error=None):  # record whether a row left while another sequence was being prefilled
        finishes.append(engine._prefilling is not None and seq is not engine._prefilling)
        peak.append(engine._cache.nbytes)
        original(seq, reason, error)

    peak: list[int] = []

    engine._finish = finish
    runs = staggered(engine, [GREEDY] * len(PROMPTS))
    engine.close()
    for run, prompt, n in zip(runs, PROMPTS, MAX_NEW):
        assert (run.tokens, run.reason) == alone(model, prompt, n)
    total = sum(MAX_NEW) - len(MAX_NEW)  # decode steps the jobs would take one by one
    assert engine.steps < 0.6 * total  # steps were shared
    assert any(finishes)  # a packed-row move happened under a prefill in flight
    assert engine._cache.slots == 1 and engine.stats()["cache_bytes"] * 4 <= max(peak)  # given back when idle
    assert max(len(p) + n for p, n in zip(PROMPTS, MAX_NEW)) > 3 * 24  # far past the local buffer


def test_seeded_sampling_equals_alone(model):
    params = [SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3, seed=k)
              for k in range(len(PROMPTS))]
    engine = BatchEngine(model, max_batch=3)
    runs = staggered(engine, params, logprobs=2)
    engine.close()
    for run, prompt, n, p in zip(runs, PROMPTS, MAX_NEW, params):
        assert (run.tokens, run.reason) == alone(model, prompt, n, p)
    assert len({tuple(r.tokens[:5]) for r in runs}) > 1


def test_logprobs_match_a_log_softmax_of_the_alone_logits(model):
    prompt, n = PROMPTS[2], 30
    engine = BatchEngine(model)
    other = Run(PROMPTS[1], 30)
    engine.submit(other.job)
    run = Run(prompt, n, logprobs=5)
    engine.submit(run.job)
    run.wait(), other.wait()
    engine.close()
    cache = model.decoder.new_cache()
    logits = model.decoder.prefill(cache, prompt)
    for token, lp in zip(run.tokens, run.logprobs):
        x = logits.astype(np.float64)
        log_softmax = x - x.max() - np.log(np.exp(x - x.max()).sum())
        assert lp is not None and len(lp.top_ids) == 5 and lp.top_ids[0] == token  # greedy picks the top one
        assert lp.logprob == pytest.approx(log_softmax[token], abs=1e-4)
        assert list(lp.top_logprobs) == sorted(lp.top_logprobs, reverse=True)
        np.testing.assert_allclose(lp.top_logprobs, log_softmax[list(lp.top_ids)], atol=1e-4)
        assert np.exp(lp.top_logprobs).sum() <= 1 + 1e-6 and lp.logprob <= 0
        logits = model.decoder.step(cache, [token])


def test_cancel_frees_the_slot_and_others_continue(model):
    engine = BatchEngine(model, max_batch=2)
    cancelled = Run(PROMPTS[0], 50, after=lambda r: r.job.cancel() if len(r.tokens) == 3 else None)
    kept, waiting = Run(PROMPTS[1], 40), Run(PROMPTS[2], 20)
    for run in (cancelled, kept, waiting):
        engine.submit(run.job)  # the third waits for a slot: the cancelled job's
    for run in (cancelled, kept, waiting):
        run.wait()
    engine.close()
    assert cancelled.reason == "cancelled" and cancelled.tokens == alone(model, PROMPTS[0], 3)[0]
    assert (kept.tokens, kept.reason) == alone(model, PROMPTS[1], 40)
    assert (waiting.tokens, waiting.reason) == alone(model, PROMPTS[2], 20)


def test_stop_ids_and_full_context(model):
    greedy, _ = alone(model, PROMPTS[1], 20)
    engine = BatchEngine(model)
    stopped = Run(PROMPTS[1], 20, stop={greedy[4]})
    context = model.manifest.max_context
    long_prompt = [2, *(np.arange(context - 7) % 400 + 3).tolist()]  # 6 positions short of the context
    full = Run(long_prompt, 20)
    engine.submit(stopped.job), engine.submit(full.job)
    stopped.wait(), full.wait()
    engine.close()
    assert (stopped.tokens, stopped.reason) == (greedy[:greedy.index(greedy[4])], "stop")
    assert (full.tokens, full.reason) == alone(model, long_prompt, 20)
    assert full.reason == "context" and len(full.tokens) == 7  # the 7th fills the last position: yielded, never fed


def test_queue_full_and_refusals_before_queueing(model):
    release = threading.Event()
    engine = BatchEngine(model, max_batch=1, max_queue=1)
    blocking = Run(PROMPTS[0], 5, after=lambda r: release.wait(TIMEOUT))
    engine.submit(blocking.job)
    while engine.stats()["active"] == 0:  # wait until the engine holds it (it then blocks in its callback)
        threading.Event().wait(0.01)
    engine.submit(Run(PROMPTS[1], 3).job)
    with pytest.raises(QueueFull):
        engine.submit(Run(PROMPTS[1], 3).job)
    with pytest.raises(ContextLengthError):
        engine.submit(Run([2] * model.manifest.max_context, 3).job)
    for bad in (Run([], 3), Run([2, 99999], 3), Run([2, 3], -1), Run([2, 3], 3, logprobs=-1)):
        with pytest.raises(ValueError):
            engine.submit(bad.job)
    image = Run([2, 3], 3)
    image.job.image_features = np.zeros((1, 64), np.float32)
    with pytest.raises(ValueError, match="text-only"):
        engine.submit(image.job)
    assert engine.stats()["queued"] == 1
    release.set()
    engine.close()
    assert blocking.wait().reason == "length"


def test_close_finishes_or_cancels_in_flight_jobs(model):
    engine = BatchEngine(model, max_batch=2)
    runs = [Run(p, 15) for p in PROMPTS[:3]]
    for run in runs:
        engine.submit(run.job)
    engine.close()  # finishes them all, the queued one included
    assert not engine._thread.is_alive()
    for run, prompt in zip(runs, PROMPTS):
        assert (run.tokens, run.reason) == alone(model, prompt, 15)
    with pytest.raises(EngineClosed):
        engine.submit(Run(PROMPTS[0], 3).job)

    release = threading.Event()
    engine = BatchEngine(model, max_batch=1)
    first = Run(PROMPTS[0], 500, after=lambda r: release.wait(TIMEOUT) if len(r.tokens) == 2 else None)
    queued = Run(PROMPTS[1], 500)
    engine.submit(first.job), engine.submit(queued.job)
    while len(first.tokens) < 2:
        threading.Event().wait(0.01)
    closing = threading.Thread(target=engine.close, kwargs={"cancel": True})
    closing.start()
    while not engine._closing:  # the engine is held in the callback until close() has asked to cancel
        threading.Event().wait(0.01)
    release.set()
    closing.join(TIMEOUT)
    assert not engine._thread.is_alive()
    assert (first.wait().reason, queued.wait().reason) == ("cancelled", "cancelled")
    assert len(first.tokens) == 2 and queued.tokens == []


def test_a_failing_job_does_not_stop_the_others(model):
    engine = BatchEngine(model)

    def explode(run: Run) -> None:
        if len(run.tokens) == 4:
            raise RuntimeError("the client went away badly")

    failing, fine = Run(PROMPTS[0], 30, after=explode), Run(PROMPTS[3], 30)
    engine.submit(failing.job), engine.submit(fine.job)
    failing.wait(), fine.wait()
    engine.close()
    assert failing.reason == "error" and "went away" in str(failing.error) and len(failing.tokens) == 4
    assert (fine.tokens, fine.reason) == alone(model, PROMPTS[3], 30)


def test_exports_without_a_batch_axis_are_refused(tmp_path):
    write_tiny_model(tmp_path)  # a hand-built graph with a 0-d past_len, like exports older than batching
    manifest = load_manifest(tmp_path)
    assert not manifest.decoder.batch
    decoder = OrtDecoder(manifest, threads=1)
    cache = decoder.new_cache()
    assert decoder.prefill(cache, [2, 3, 4]).shape == (64,)  # it still runs one sequence
    with pytest.raises(NotBatched, match="serial engine"):
        BatchEngine(Model(manifest, None, decoder))  # type: ignore[arg-type]
    # a manifest claiming a batch axis the graph lacks fails at load, in one line; a non-boolean one in the reader
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["decoder"]["batch"] = True
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="'past_len' is tensor\\(int64\\) \\[\\]"):
        OrtDecoder(load_manifest(tmp_path), threads=1)
    data["decoder"]["batch"] = "yes"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="decoder.batch"):
        load_manifest(tmp_path)


@pytest.fixture(scope="module")
def mm_model(tiny_mm_export) -> Model:
    folder = tiny_mm_export(4)[2]  # the image graph tests' export (tests/conftest.py)
    manifest = load_manifest(folder)
    assert manifest.multimodal_decoder is not None and manifest.multimodal_decoder.batch
    return Model(manifest, None, OrtDecoder(manifest, threads=1, chunk_size=CHUNK))  # type: ignore[arg-type]


def test_image_jobs_batched_equal_alone(mm_model):
    """An image prompt (its soft tokens' rows fed in its prefill) among text jobs: every job's tokens as alone."""
    m = mm_model.manifest.model
    rows = np.random.default_rng(0).normal(0, 1, (2 * 4, m.hidden_size)).astype(np.float32)  # 2 images, 4 rows each
    image = [m.image_token_id] * 4
    prompt = [2, 20, 21, m.boi_token_id, *image, m.eoi_token_id, 22, m.boi_token_id, *image, m.eoi_token_id, 23]
    engine = BatchEngine(mm_model, max_batch=3)
    with_images = Run(prompt, 40)
    with_images.job.image_features = rows
    texts = [Run(PROMPTS[1], 40), Run(PROMPTS[2], 30)]
    for run in (texts[0], with_images, texts[1]):
        engine.submit(run.job)
    for run in (with_images, *texts):
        run.wait()
    engine.close()
    cache = mm_model.decoder.new_cache()
    want = [p.token_id for p in generate(mm_model.decoder, cache, prompt, GREEDY, 40, stop_ids=(), image_features=rows)]
    assert (with_images.tokens, with_images.reason) == (want, "length")
    bad = Run(prompt, 3)
    bad.job.image_features = rows[:, :-1]
    with pytest.raises(ValueError, match="image features must be"):
        engine.submit(bad.job)
    other = [p.token_id for p in generate(mm_model.decoder, mm_model.decoder.new_cache(), prompt, GREEDY, 40,
                                          stop_ids=(), image_features=rows[::-1].copy())]
    assert other != want  # the rows matter: the engine fed them
    for run, prompt_ids, n in zip(texts, PROMPTS[1:3], (40, 30)):
        assert (run.tokens, run.reason) == alone(mm_model, prompt_ids, n)


def test_the_server_runs_batch_exports_on_the_batch_engine(tmp_path):
    """gemma3-serve over a batch export: make_engine picks BatchEngine, and concurrent seeded requests (streamed
    and not) answer exactly what the runtime answers alone. The hand-built tiny graph with the batch axis is fast."""
    from concurrent.futures import ThreadPoolExecutor

    from gemma3.runtime.api import load
    from gemma3.serve.engines import make_engine
    from tests.serve_live import MODEL_ID, live_server

    write_tiny_model(tmp_path, vocab=262144, max_context=256, seed=5, with_tokenizer=True, batch=True)
    model = load(tmp_path, threads=1)
    engine = make_engine(model, max_batch=4, max_queue=16)
    assert isinstance(engine, BatchEngine)
    questions = [[{"role": "user", "content": f"Tell me about the number {k}"}] for k in range(8)]

    def ask(k: int) -> str:
        client = live.client()
        kwargs = {"model": MODEL_ID, "messages": questions[k], "max_tokens": 16, "temperature": 0.9, "seed": k}
        if k % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs,
                                                                                                   stream=True))
        return client.chat.completions.create(**kwargs).choices[0].message.content

    with live_server(model, engine) as live, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for k, answer in enumerate(answers):
        assert answer == model.generate(questions[k], max_new_tokens=16, temperature=0.9, seed=k).text
    assert engine.steps > 0 and len(set(answers)) > 1
