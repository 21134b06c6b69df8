"""The generation loop: stop rules and bookkeeping on a scripted decoder, then for real on the tiny ONNX model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from gemma3.runtime.generate import ContextLengthError, GenerationStats, Piece, generate
from gemma3.runtime.manifest import load_manifest
from gemma3.runtime.ort_decoder import OrtDecoder
from gemma3.runtime.sampling import SamplingParams
from tests.test_runtime_tinymodel import reference_logits, write_tiny_model

GREEDY = SamplingParams(temperature=0)
VOCAB = 200


@dataclass
class FakeCache:
    max_context: int = 100
    length: int = 0
    nbytes: int = 1234


@dataclass
class ScriptedDecoder:
    """Predicts script[k] after the prompt and k fed generated tokens; records every call."""

    script: list[int]
    prompt_len: int = 0
    calls: list[list[int]] = field(default_factory=list)

    def _logits(self, cache: FakeCache) -> np.ndarray:
        logits = np.zeros(VOCAB, np.float32)
        logits[self.script[cache.length - self.prompt_len]] = 10.0
        return logits

    def step(self, cache, ids, image_features=None, borrow=False):
        ids = list(ids)
        self.calls.append(ids)
        cache.length += len(ids)
        return self._logits(cache)

    def prefill(self, cache, ids):
        self.prompt_len = cache.length + len(ids)
        return self.step(cache, ids)


def run(script, prompt=(3, 4, 5), max_new_tokens=10, cache=None, **kwargs):
    cache = cache or FakeCache()
    dec, stats = ScriptedDecoder(list(script)), GenerationStats()
    pieces = list(generate(dec, cache, list(prompt), GREEDY, max_new_tokens, stats=stats, **kwargs))
    return [p.token_id for p in pieces], stats, dec, cache


@pytest.mark.parametrize("stop", [106, 1])
def test_stops_on_end_of_turn_and_eos(stop):
    tokens, stats, dec, cache = run([7, 8, stop, 9])
    assert tokens == [7, 8] and stats.finish_reason == "stop"
    assert dec.calls == [[3, 4, 5], [7], [8]]  # every yielded token was fed; the stop token was not
    assert cache.length == 5 and stats.generated_tokens == 2 and stats.decode_steps == 2


def test_max_new_tokens():
    tokens, stats, dec, cache = run([7, 8, 9, 10], max_new_tokens=3)
    assert tokens == [7, 8, 9] and stats.finish_reason == "length"
    assert dec.calls == [[3, 4, 5], [7], [8]] and cache.length == 5  # the last token is not fed
    tokens, stats, dec, _ = run([7], max_new_tokens=0)
    assert tokens == [] and stats.finish_reason == "length" and dec.calls == [[3, 4, 5]]


def test_custom_stop_ids():
    tokens, stats, _, _ = run([7, 106, 8, 1], stop_ids={8})
    assert tokens == [7, 106] and stats.finish_reason == "stop"


def test_full_context_ends_generation():
    tokens, stats, _, cache = run(range(10, 30), cache=FakeCache(max_context=6))
    assert tokens == [10, 11, 12, 13] and stats.finish_reason == "context" and cache.length == 6


def test_prompt_too_long_fails_before_running():
    for prompt_len, held in ((6, 0), (5, 1), (100, 0)):
        dec = ScriptedDecoder([7])
        with pytest.raises(ContextLengthError, match="prompt too long"):
            next(generate(dec, FakeCache(max_context=6, length=held), [3] * prompt_len, GREEDY, 5))
        assert dec.calls == []
    tokens, stats, _, _ = run([7, 8], prompt=[3] * 5, cache=FakeCache(max_context=6))  # one more token fits
    assert tokens == [7, 8] and stats.finish_reason == "context"
    with pytest.raises(ValueError, match="empty"):
        next(generate(ScriptedDecoder([7]), FakeCache(), [], GREEDY, 5))


def test_consumer_stopping_early_is_recorded():
    stats = GenerationStats()
    gen = generate(ScriptedDecoder(list(range(10, 30))), FakeCache(), [3], GREEDY, 10, stats=stats)
    assert next(gen) == Piece(10, "")
    gen.close()
    assert stats.finish_reason == "cancelled" and stats.generated_tokens == 1 and stats.kv_cache_bytes == 1234


def test_repetition_penalty_sees_history_prompt_and_output():
    class Flat(ScriptedDecoder):
        def _logits(self, cache):
            logits = np.zeros(VOCAB, np.float32)
            logits[[20, 21, 22, 23]] = [4.0, 3.9, 3.8, 3.7]
            return logits

    params = SamplingParams(temperature=0, repetition_penalty=1.1)
    ids = [p.token_id for p in generate(Flat([]), FakeCache(), [21], params, 3, history=[20])]
    assert ids == [22, 23, 20]  # 20 (history) and 21 (prompt) penalised, then each generated token in turn


def test_stats_and_text_stream():
    class Echo:
        def push(self, token_id):
            return f"<{token_id}>" if token_id != 8 else ""

        def flush(self):
            return "!"

    stats = GenerationStats()
    pieces = list(generate(ScriptedDecoder([7, 8, 106]), FakeCache(), [3, 4], GREEDY, 10, stream=Echo(), stats=stats))
    assert pieces == [Piece(7, "<7>"), Piece(8, ""), Piece(None, "!")]
    assert stats.prompt_tokens == 2 and stats.generated_tokens == 2 and stats.decode_steps == 2
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0 and stats.peak_rss_mb > 10
    d = stats.as_dict()
    assert d["kv_cache_bytes"] == 1234 and d["decode_tokens_per_s"] > 0 and d["prefill_tokens_per_s"] > 0


# --- for real: the tiny GroupQueryAttention model --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_gen")
    weights = write_tiny_model(folder, vocab=VOCAB, max_context=400, seed=3)
    return OrtDecoder(load_manifest(folder), chunk_size=16), weights


def test_greedy_generation_follows_the_reference(tiny):
    dec, weights = tiny
    prompt = np.random.default_rng(4).integers(2, VOCAB, 37).tolist()
    cache = dec.new_cache(len(prompt))
    stats = GenerationStats()
    out = [p.token_id for p in generate(dec, cache, prompt, GREEDY, 300, stop_ids=(), stats=stats)]
    assert len(out) == 300 and stats.finish_reason == "length" and cache.length == 37 + 299
    expected = reference_logits(weights, prompt + out[:-1])[len(prompt) - 1 :].argmax(-1)
    assert out == expected.tolist()
    assert cache.global_capacity == 400 and stats.kv_cache_bytes == cache.nbytes  # grew to max_context


def test_stop_token_for_real(tiny):
    dec, _ = tiny
    prompt = [5, 6, 7, 8]
    free = [p.token_id for p in generate(dec, dec.new_cache(), prompt, GREEDY, 30, stop_ids=())]
    n = next(i for i in range(2, 30) if free[i] not in free[:i])  # the first new token after two
    cache, stats = dec.new_cache(), GenerationStats()
    stopped = [p.token_id for p in generate(dec, cache, prompt, GREEDY, 30, stop_ids={free[n]}, stats=stats)]
    assert stopped == free[:n] and stats.finish_reason == "stop" and cache.length == 4 + n


def test_seeded_sampling_for_real(tiny):
    dec, _ = tiny

    def sample_run(seed):
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=seed)
        return [p.token_id for p in generate(dec, dec.new_cache(), [9, 10, 11], params, 40, stop_ids=())]

    assert sample_run(1) == sample_run(1)
    assert sample_run(1) != sample_run(2)
