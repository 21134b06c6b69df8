"""The ONNX Runtime decoder and the hybrid KV cache on the tiny GroupQueryAttention graph.

Checked against the numpy reference of the whole sequence: decoding past the local capacity, growing the
global caches, chunked prefill; and that steps update the bound cache buffers in place.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gemma3.runtime.kv_cache import ContextLengthError, KVCache
from gemma3.runtime.manifest import ManifestError, load_manifest
from gemma3.runtime.ort_decoder import OrtDecoder, session_options
from tests.test_runtime_tinymodel import CAPACITY, HEAD_DIM, KV_HEADS, reference_logits, write_tiny_model

VOCAB, MAX_CONTEXT = 64, 700


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    weights = write_tiny_model(folder, vocab=VOCAB, max_context=MAX_CONTEXT, seed=1)
    ids = np.random.default_rng(2).integers(0, VOCAB, MAX_CONTEXT).tolist()
    return load_manifest(folder), weights, ids, reference_logits(weights, ids)


def close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=2e-3 * np.abs(expected).max())


def test_decode_matches_reference_through_growth(tiny):
    manifest, _, ids, ref = tiny
    dec = OrtDecoder(manifest, chunk_size=5)
    cache = dec.new_cache(3)
    assert cache.global_capacity == 256 and cache.length == 0
    close(dec.prefill(cache, ids[:40]), ref[39])
    capacities = set()
    for t in range(40, 600):
        close(dec.step(cache, [ids[t]]), ref[t])
        capacities.add(cache.global_capacity)
    assert capacities == {256, 512, 700}  # doubled, then capped at max_context
    assert cache.length == 600 and cache.version == 2


def test_borrowed_logits_are_the_decoders_buffer(tiny):
    """The generation loop borrows the last row (no copy per token); everyone else gets their own copy."""
    manifest, _, ids, ref = tiny
    dec = OrtDecoder(manifest)
    cache = dec.new_cache(8)
    dec.prefill(cache, ids[:4])
    borrowed = dec.step(cache, [ids[4]], borrow=True)
    close(borrowed, ref[4])
    owned = dec.step(cache, [ids[5]])
    close(owned, ref[5])
    assert np.shares_memory(borrowed, dec._logits) and not np.shares_memory(owned, dec._logits)
    close(borrowed, ref[5])  # the borrowed row was overwritten by the next step, as documented


def test_a_new_cache_is_bound_even_where_a_freed_one_lived(tiny):
    """Regression: bindings were keyed by id(cache), which Python reuses once a cache is freed, so a fresh
    cache of another capacity could run against the freed one's buffers (gemma3-eval's second window failed)."""
    manifest, _, ids, ref = tiny
    dec = OrtDecoder(manifest, chunk_size=64)
    for length in (200, 300, 257):  # each window's cache replaces the previous one, with another capacity
        cache = dec.new_cache(length)
        close(dec.prefill(cache, ids[:length]), ref[length - 1])
        del cache


def test_chunked_prefill_equals_single_shot(tiny):
    manifest, _, ids, ref = tiny
    prompt = ids[:300]
    single = OrtDecoder(manifest, chunk_size=1000)
    c1 = single.new_cache(len(prompt))
    one_shot = single.prefill(c1, prompt)
    close(one_shot, ref[299])
    for chunk in (1, 7, 64, 256):
        dec = OrtDecoder(manifest, chunk_size=chunk)
        c2 = dec.new_cache()
        np.testing.assert_allclose(dec.prefill(c2, prompt), one_shot, rtol=1e-5, atol=1e-4)
        assert c2.length == c1.length == 300
        # Global caches hold position j at row j, whatever the chunking.
        np.testing.assert_allclose(c2.key_array(1)[:, :, :300], c1.key_array(1)[:, :, :300], rtol=1e-5, atol=1e-5)
        # And the next decode step agrees too (the local caches were compacted the same way).
        np.testing.assert_allclose(dec.step(c2, [ids[300]]), single.step(c1, [ids[300]]), rtol=1e-5, atol=1e-4)
        c1 = single.new_cache(len(prompt))
        single.prefill(c1, prompt)


def test_steps_update_the_bound_buffers_in_place(tiny):
    manifest, _, ids, _ = tiny
    dec = OrtDecoder(manifest)
    cache = dec.new_cache(64)
    dec.prefill(cache, ids[:20])
    values = [value for _, _, value in cache.bindings()]
    pointers = [v.data_ptr() for v in values]
    arrays = [cache.key_array(i) for i in range(3)] + [cache.value_array(i) for i in range(3)]
    assert {a.ctypes.data for a in arrays} <= set(pointers)  # the OrtValues wrap our numpy buffers, no copy
    local_before, global_before = cache.key_array(0).copy(), cache.key_array(1).copy()
    assert not global_before[:, :, 20:].any()
    for t in range(20, 30):
        dec.step(cache, [ids[t]])
        assert [v.data_ptr() for _, _, v in cache.bindings()] == pointers
        assert cache.key_array(1)[:, :, t].any() and not cache.key_array(1)[:, :, t + 1 :].any()
    np.testing.assert_array_equal(cache.key_array(1)[:, :, :20], global_before[:, :, :20])
    assert not np.array_equal(cache.key_array(0), local_before)  # the windowed cache moved on, in place
    assert cache.key_array(0).shape == (1, KV_HEADS, CAPACITY, HEAD_DIM)
    assert cache.version == 0


def test_growth_copies_rows_once_and_rebinds(tiny):
    manifest, _, ids, ref = tiny
    dec = OrtDecoder(manifest)
    cache = dec.new_cache(250)
    dec.prefill(cache, ids[:255])
    old = cache.key_array(1)
    old_rows = old[:, :, :255].copy()
    local_ptr = cache.layers[0].key.value.data_ptr()
    close(dec.step(cache, [ids[255]]), ref[255])  # fills row 255: still fits
    assert cache.global_capacity == 256 and cache.key_array(1) is old
    close(dec.step(cache, [ids[256]]), ref[256])  # needs row 256: grows to 512
    assert cache.global_capacity == 512 and cache.version == 1
    np.testing.assert_array_equal(cache.key_array(1)[:, :, :255], old_rows)
    assert cache.layers[0].key.value.data_ptr() == local_ptr  # local caches are never reallocated
    bytes_per_row = KV_HEADS * HEAD_DIM * 4
    assert cache.nbytes == 2 * bytes_per_row * (512 + 2 * CAPACITY)


def test_context_limit(tiny):
    manifest, _, ids, _ = tiny
    dec = OrtDecoder(manifest, chunk_size=128)
    cache = dec.new_cache()
    with pytest.raises(ContextLengthError, match="context of 700"):
        dec.prefill(cache, ids[:600] + ids[:101])
    assert cache.length == 0  # refused before running anything
    dec.prefill(cache, ids[:699])
    dec.step(cache, [ids[699]])
    assert cache.length == MAX_CONTEXT == cache.global_capacity
    with pytest.raises(ContextLengthError):
        dec.step(cache, [1])
    with pytest.raises(ValueError, match="at least one token"):
        dec.step(cache, [])


def test_eval_decoder_gives_all_positions(tiny):
    manifest, _, ids, ref = tiny
    dec = OrtDecoder(manifest, manifest.eval_decoder, chunk_size=50)
    cache = dec.new_cache()
    rows = [dec.step(cache, ids[s : s + 50]) for s in range(0, 300, 50)]
    assert rows[0].shape == (50, VOCAB)
    close(np.concatenate(rows), ref[:300])


def test_cache_for_a_model_without_global_layers(tmp_path):
    write_tiny_model(tmp_path, vocab=VOCAB, max_context=40, layers=("local", "local"))
    manifest = load_manifest(tmp_path)
    cache = KVCache(manifest.decoder, KV_HEADS, HEAD_DIM, manifest.max_context)
    assert cache.global_capacity is None and not cache.reserve(30)


def test_manifest_and_graph_must_agree(tmp_path):
    write_tiny_model(tmp_path, vocab=VOCAB, max_context=40)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["decoder"]["layers"][0]["past_key"] = "past_k.0"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="lacks the inputs/outputs past_k.0"):
        OrtDecoder(load_manifest(tmp_path))
    (tmp_path / "decoder.onnx").write_bytes(b"not a graph")
    with pytest.raises(ManifestError, match="ONNX Runtime cannot load"):
        OrtDecoder(load_manifest(tmp_path))
    (tmp_path / "decoder.onnx").unlink()
    with pytest.raises(ManifestError, match="decoder graph .* is missing"):
        OrtDecoder(load_manifest(tmp_path))


def test_session_options():
    opts = session_options(3)
    assert opts.intra_op_num_threads == 3
    assert session_options().intra_op_num_threads >= 1
