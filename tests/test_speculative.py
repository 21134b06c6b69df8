"""Speculative decoding: greedy output token for token, caches rolled back exactly (local rings included).

The hand-built tiny model has window 4 in a ring of 6 rows, so GroupQueryAttention compacts every 3 positions and
every generation below wraps it many times; drafts are forced wrong at every offset (none right .. all right).
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gemma3.runtime.generate import GenerationStats, generate
from gemma3.runtime.kv_cache import KVCache, local_rows
from gemma3.runtime.manifest import LOCAL, ManifestError, load_manifest
from gemma3.runtime.ort_decoder import OrtDecoder
from gemma3.runtime.sampling import SamplingParams
from gemma3.runtime.speculative import DraftModel, LookupDrafter, Speculative, speculative_generate
from tests.test_runtime_tinymodel import write_tiny_model

GREEDY = SamplingParams(temperature=0)
VOCAB, CONTEXT = 64, 64


# --- the ring layout the rollback relies on, measured on the op itself ----------------------------------------


def ring_graph(window: int, capacity: int) -> ort.InferenceSession:
    """One GroupQueryAttention with the exporter's local-layer attributes, q/k/v fed directly."""
    vi, d = helper.make_tensor_value_info, 8
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens_k", "total"],
                            ["out", "ok", "ov"], domain="com.microsoft", num_heads=1, kv_num_heads=1,
                            local_window_size=window, sliding_window_cache=1)
    cache = [1, 1, capacity, d]
    graph = helper.make_graph(
        [node], "ring", [vi(n, TensorProto.FLOAT, [1, "S", d]) for n in "qkv"]
        + [vi("pk", TensorProto.FLOAT, cache), vi("pv", TensorProto.FLOAT, cache),
           vi("seqlens_k", TensorProto.INT32, [1]), vi("total", TensorProto.INT32, [])],
        [vi("out", TensorProto.FLOAT, [1, "S", d]), vi("ok", TensorProto.FLOAT, cache),
         vi("ov", TensorProto.FLOAT, cache)])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("window,capacity", [(4, 6), (8, 24), (4, 4), (16, 20)])
def test_ring_rows_are_a_function_of_the_position(window, capacity):
    """After any sequence of steps, rows [0, local_rows(past)) hold the last positions in order (keys carry
    position + 1 here): the layout depends on the position only, which is what makes rollback computable."""
    session, rng = ring_graph(window, capacity), np.random.default_rng(window + capacity)
    keys = np.zeros((1, 1, capacity, 8), np.float32)
    values = ort.OrtValue.ortvalue_from_numpy(keys)
    other = ort.OrtValue.ortvalue_from_numpy(np.zeros_like(keys))
    binding = session.io_binding()
    binding.bind_ortvalue_input("pk", values)
    binding.bind_ortvalue_output("ok", values)
    binding.bind_ortvalue_input("pv", other)
    binding.bind_ortvalue_output("ov", other)
    past = 0
    for _ in range(80):
        s = int(rng.integers(1, 10))
        k = np.zeros((1, s, 8), np.float32)
        k[0, :, 0] = np.arange(past, past + s) + 1
        binding.bind_output("out")
        for name, value in (("q", np.zeros_like(k)), ("k", k), ("v", k)):
            binding.bind_cpu_input(name, value)
        binding.bind_cpu_input("seqlens_k", np.array([past + s - 1], np.int32))
        binding.bind_cpu_input("total", np.array(past + s, np.int32))
        session.run_with_iobinding(binding)
        past += s
        rows = local_rows(past, window, capacity)
        assert keys[0, 0, :rows, 0].tolist() == list(range(past - rows + 1, past + 1)), (past, s)


# --- the tiny model, plain vs speculative -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec_tiny")
    write_tiny_model(folder, vocab=VOCAB, max_context=CONTEXT, seed=3, logits_count=True)
    return OrtDecoder(load_manifest(folder), threads=1)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec_other")
    write_tiny_model(folder, vocab=VOCAB, max_context=CONTEXT, seed=11, logits_count=True)
    return OrtDecoder(load_manifest(folder), threads=1)


def run(decoder, prompt, max_new=100, drafter=None, k=4, stop_ids=()):
    cache, stats = decoder.new_cache(), GenerationStats()
    if drafter is None:
        pieces = generate(decoder, cache, prompt, GREEDY, max_new, stop_ids=stop_ids, stats=stats)
    else:
        pieces = speculative_generate(decoder, cache, prompt, GREEDY, max_new, drafter, k, stop_ids=stop_ids,
                                      stats=stats)
    return [p.token_id for p in pieces], stats, cache


def assert_same_cache(decoder: OrtDecoder, a: KVCache, b: KVCache) -> None:
    """The rows a later step can read: every local ring's [0, L), every global layer's [0, length); equal up to the
    rounding of batched vs single-token matmuls (a row holding another position would differ by O(1))."""
    assert a.length == b.length
    for i, layer in enumerate(decoder.spec.layers):
        rows = local_rows(a.length, layer.window, layer.capacity) if layer.kind == LOCAL else a.length
        for get in (KVCache.key_array, KVCache.value_array):
            np.testing.assert_allclose(get(a, i)[:, :, :rows], get(b, i)[:, :, :rows], rtol=1e-4, atol=1e-4)


class Oracle:
    """Drafts the true continuation with the first wrong token at offset r, r cycling through 0..limit."""

    def __init__(self, truth: list[int], prompt_len: int) -> None:
        self.truth, self.prompt_len, self.round = truth, prompt_len, 0

    def propose(self, context, limit):
        done = len(context) - self.prompt_len  # tokens of truth already in context (the pending one included)
        right = self.truth[done:done + limit]
        r = self.round % (limit + 1)
        self.round += 1
        return right[:r] + [(t + 1) % VOCAB for t in right[r:]] + [5] * (limit - len(right))  # < any vocab

    def commit(self, length):
        pass


PROMPTS = [[2, 7, 9, 11, 3], [2, *range(20, 40)], [2, 5]]


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["5", "21", "2"])
def test_rejections_at_every_offset_keep_greedy_output_and_cache(tiny, prompt, k):
    truth, plain, plain_cache = run(tiny, prompt)  # runs into the context limit: the rings wrap ~20 times
    assert plain.finish_reason == "context"
    tokens, stats, cache = run(tiny, prompt, drafter=Oracle(truth, len(prompt)), k=k)
    assert tokens == truth and stats.finish_reason == "context" and stats.generated_tokens == len(truth)
    assert_same_cache(tiny, cache, plain_cache)
    assert 0 < stats.accepted_tokens < stats.drafted_tokens and stats.decode_steps < plain.decode_steps
    assert stats.decode_tokens == plain.decode_tokens  # tokens the decode steps settled, as plain counts them


@pytest.mark.parametrize("max_new", [0, 1, 2, 5, 17])
def test_max_new_tokens_inside_an_accepted_run(tiny, max_new):
    prompt = PROMPTS[0]
    truth, plain, plain_cache = run(tiny, prompt, max_new=max_new)
    full = run(tiny, prompt)[0]
    tokens, stats, cache = run(tiny, prompt, max_new, drafter=Oracle(full + [0] * 8, len(prompt)), k=6)
    assert tokens == truth and stats.finish_reason == plain.finish_reason == "length"
    assert_same_cache(tiny, cache, plain_cache)


def test_stop_tokens_inside_an_accepted_run(tiny):
    prompt = PROMPTS[1]
    full = run(tiny, prompt)[0]
    for i in (0, 1, 4, 9, 23):  # stop at the first occurrence of the i-th greedy token
        stop = {full[i]}
        truth, plain, plain_cache = run(tiny, prompt, stop_ids=stop)
        always_right = Oracle(full, len(prompt))
        always_right.round = 10**6 * 8  # r == limit on every round: every draft right, the stop token among them
        always_right.propose = lambda context, limit, o=always_right: o.truth[len(context) - o.prompt_len:][:limit]
        tokens, stats, cache = run(tiny, prompt, drafter=always_right, k=8, stop_ids=stop)
        assert tokens == truth and stats.finish_reason == plain.finish_reason == "stop"
        assert_same_cache(tiny, cache, plain_cache)  # every yielded token fed, the stop token not


def test_lookup_drafts_what_followed_the_last_ngram():
    drafter = LookupDrafter(ngram=3)
    assert drafter.propose([1, 2, 3, 9, 8, 7, 6, 1, 2, 3], 3) == [9, 8, 7]
    assert drafter.propose([4, 2, 3, 9, 5, 2, 3, 8, 1, 2, 3], 2) == [8, 1]  # the latest occurrence
    assert drafter.propose([1, 9, 9, 9, 2, 9], 4) == [2, 9]  # only a 1-gram matches
    assert drafter.propose([1, 2, 3], 4) == [] and drafter.propose([7], 4) == []
    assert LookupDrafter(exclude={9}).propose([1, 2, 9, 1, 2], 3) == []  # never drafts an image soft token


def test_lookup_and_draft_models_keep_greedy_output(tiny, other):
    prompt = [2, *range(10, 30), *range(10, 30)]  # repeats itself: lookup has something to find
    truth, plain, plain_cache = run(tiny, prompt)
    for drafter, k in ((LookupDrafter(), 4), (DraftModel(tiny, "self"), 5), (DraftModel(other, "other"), 3)):
        tokens, stats, cache = run(tiny, prompt, drafter=drafter, k=k)
        assert tokens == truth and stats.finish_reason == plain.finish_reason, drafter
        assert_same_cache(tiny, cache, plain_cache)
        if isinstance(drafter, DraftModel):  # its own cache was rolled back in step: as if fed token by token
            assert drafter.fed == (prompt + truth)[:drafter.cache.length]
            reference = tiny.new_cache() if drafter.decoder is tiny else other.new_cache()
            for token in drafter.fed:
                drafter.decoder.step(reference, [token])
            assert_same_cache(drafter.decoder, drafter.cache, reference)
            if drafter.decoder is tiny:
                assert stats.acceptance_rate == 1.0 and stats.tokens_per_step > 2  # steps of <= 3: the ring


def test_rollback_is_refused_across_a_ring_compaction(tiny):
    cache = tiny.new_cache()
    # window 4, 6 rows: positions 7, 10, 13, ... start with 4 rows (compaction); 6 rows before each
    assert [cache.rewindable(n, 9) for n in (0, 3, 5, 6, 7, 8, 9)] == [6, 3, 1, 3, 2, 1, 3]
    tiny.step(cache, list(range(3, 12)))  # 9 positions: compacted at 7
    cache.rollback(8)
    with pytest.raises(ValueError, match="compacted between positions 6 and 8"):
        cache.rollback(6)


def test_sampling_falls_back_to_plain_decoding_with_a_warning(tiny, caplog):
    params = SamplingParams(temperature=1.0, seed=5)
    plain = [p.token_id for p in generate(tiny, tiny.new_cache(), PROMPTS[0], params, 20, stop_ids=())]
    stats = GenerationStats()
    with caplog.at_level(logging.WARNING, logger="gemma3.runtime.speculative"):
        pieces = speculative_generate(tiny, tiny.new_cache(), PROMPTS[0], params, 20, LookupDrafter(), 4,
                                      stop_ids=(), stats=stats)
        assert [p.token_id for p in pieces] == plain
    assert "greedy decoding only" in caplog.text and stats.speculative is None


def test_speculative_settings_parse_or_fail_in_one_line():
    assert Speculative.parse("off") is None and Speculative.parse(None) is None
    assert Speculative.parse("lookup", 6) == Speculative("lookup", draft_tokens=6)
    assert Speculative.parse("draft:out/270m") == Speculative("draft", "out/270m")
    for bad, message in (("draft:", "not one of"), ("lookahead", "not one of"), (3, "must be")):
        with pytest.raises(ValueError, match=message):
            Speculative.parse(bad)
    with pytest.raises(ValueError, match="1..32"):
        Speculative.parse("lookup", 0)



# --- the real exporter's graph: a tiny random Gemma 3 (window 8 in 24 rows) ---------------------------------


@pytest.fixture(scope="module")
def exported(tiny_fp32_export):
    return OrtDecoder(load_manifest(tiny_fp32_export), threads=1)  # tests/conftest.py: vocab 512, 96 positions


def test_exported_logits_count_returns_the_last_positions(exported):
    assert exported.multi_logits and exported.spec.logits_count == "logits_count"
    ids = [2, 40, 41, 42, 43, 44, 45]
    stepwise = exported.new_cache()
    rows = [exported.step(stepwise, [t]) for t in ids]
    cache = exported.new_cache()
    exported.step(cache, ids[:3])
    last4 = exported.step(cache, ids[3:], logits=4)
    assert last4.shape == (4, 512)
    np.testing.assert_allclose(last4, np.stack(rows[3:]), rtol=1e-4, atol=1e-4)
    assert exported.step(cache, [7]).shape == (512,)  # one position, as before
    with pytest.raises(ValueError, match="cannot return 3 positions' logits of a 2-token step"):
        exported.step(cache, [1, 2], logits=3)


@pytest.mark.parametrize("k", [2, 8])
def test_exported_graph_keeps_greedy_output(exported, k):
    prompt = [2, *range(100, 130)]
    truth, plain, plain_cache = run(exported, prompt)  # to the context limit: 65 tokens, the rings wrap 4 times
    assert plain.finish_reason == "context"
    tokens, stats, cache = run(exported, prompt, drafter=Oracle(truth, len(prompt)), k=k)
    assert tokens == truth and stats.finish_reason == "context"
    assert_same_cache(exported, cache, plain_cache)


# --- the API and the command line (Gemma's tokenizer: the tiny model has a row for every id) -------------------

API_VOCAB = 262144


@pytest.fixture(scope="module")
def api_dirs(tmp_path_factory):
    new, old = tmp_path_factory.mktemp("spec_api"), tmp_path_factory.mktemp("spec_old")
    write_tiny_model(new, vocab=API_VOCAB, max_context=128, seed=5, with_tokenizer=True, logits_count=True)
    write_tiny_model(old, vocab=API_VOCAB, max_context=128, seed=5, with_tokenizer=True)  # an older export
    return new, old


@pytest.fixture(scope="module")
def api_model(api_dirs):
    from gemma3.runtime.api import load

    return load(api_dirs[0], threads=1)


PASSAGE = "Quote this back: the quick brown fox jumps over the lazy dog, the quick brown fox jumps again."


def test_api_generate_and_chat_match_plain_greedy(api_dirs, api_model):
    model = api_model
    plain = model.generate(PASSAGE, max_new_tokens=40, temperature=0)
    for setting in ("lookup", Speculative("lookup", draft_tokens=2), f"draft:{api_dirs[0]}"):
        result = model.generate(PASSAGE, max_new_tokens=40, temperature=0, speculative=setting)
        assert result.token_ids == plain.token_ids and result.finish_reason == plain.finish_reason
        d = result.as_dict()
        assert d["speculative"] in ("lookup", "draft") and d["decode_steps"] == result.stats.decode_steps
    assert "speculative" not in plain.as_dict()
    chats = [model.chat(max_new_tokens=12, temperature=0, speculative=s) for s in ("off", "lookup")]
    for text in ("Say the fox line.", "Again, the fox line."):  # the second turn reuses the kept cache
        plain_reply, spec_reply = (chat.send(text) for chat in chats)
        assert spec_reply.token_ids == plain_reply.token_ids
    assert chats[0].cache.length == chats[1].cache.length


def test_api_refusals_are_one_line(api_dirs, api_model, tmp_path):
    from gemma3.runtime.api import load

    with pytest.raises(ManifestError, match="re-export"):
        load(api_dirs[1], threads=1).generate(PASSAGE, temperature=0, speculative="lookup")
    with pytest.raises(ManifestError, match="draft model: model folder .* does not exist"):
        api_model.generate(PASSAGE, temperature=0, speculative=f"draft:{tmp_path / 'missing'}")
    small = tmp_path / "small"
    write_tiny_model(small, vocab=VOCAB, max_context=64, with_tokenizer=True, logits_count=True)
    with pytest.raises(ManifestError, match="another vocabulary"):
        api_model.generate(PASSAGE, temperature=0, speculative=f"draft:{small}")
    with pytest.raises(ValueError, match="not one of off, lookup or draft:DIR"):
        api_model.stream(PASSAGE, speculative="ngram")


def test_cli_speculative(capsys, api_dirs, api_model):
    import json

    from gemma3.runtime.cli import main

    args = ["--model", str(api_dirs[0]), "--temperature", "0", "--max-new-tokens", "24", "--json", "-p", PASSAGE]
    assert main([*args, "--speculative", "lookup", "--draft-tokens", "3"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["token_ids"] == api_model.generate(PASSAGE, max_new_tokens=24, temperature=0).token_ids
    assert spec["speculative"] == "lookup" and 0 <= spec["acceptance_rate"] <= 1 and spec["tokens_per_step"] >= 1
    for bad, message in ((["--speculative", "fast"], "'fast' is not one of off, lookup or draft:DIR"),
                         (["--speculative", "lookup", "--draft-tokens", "0"], "draft tokens must be 1..32")):
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as info:  # argparse's usage error
        main([*args, "--draft-tokens", "3"])
    assert info.value.code == 2 and "--draft-tokens needs --speculative" in capsys.readouterr().err
