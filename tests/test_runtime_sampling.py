"""Sampling filters one by one, their edge cases, and the seeded pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from gemma3.runtime.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    draw,
    make_rng,
    min_p_filter,
    sample,
    softmax,
    top_k_filter,
    top_p_filter,
)

NEG = -np.inf


def kept(x: np.ndarray) -> list[int]:
    return np.flatnonzero(np.isfinite(x)).tolist()


def test_softmax_handles_minus_inf_and_rejects_all_minus_inf():
    p = softmax(np.array([0.0, NEG, np.log(3.0)], np.float32))
    np.testing.assert_allclose(p, [0.25, 0.0, 0.75], rtol=1e-6)
    assert p.dtype == np.float64
    with pytest.raises(ValueError, match="finite"):
        softmax(np.full(4, NEG))


def test_temperature():
    np.testing.assert_allclose(apply_temperature(np.array([1.0, -2.0]), 0.5), [2.0, -4.0])
    with pytest.raises(ValueError, match="greedy"):
        apply_temperature(np.array([1.0]), 0.0)


def test_top_k():
    x = np.array([0.1, 3.0, 2.0, -1.0, 2.5], np.float32)
    assert kept(top_k_filter(x, 2)) == [1, 4]
    assert kept(top_k_filter(x, 1)) == [1]
    assert kept(top_k_filter(x, 0)) == [0, 1, 2, 3, 4]  # off
    assert kept(top_k_filter(x, 5)) == kept(top_k_filter(x, 1000)) == [0, 1, 2, 3, 4]  # k >= vocab: all stay
    assert kept(top_k_filter(np.array([1.0, 2.0, 2.0, 0.0]), 2)) == [1, 2]
    assert kept(top_k_filter(np.array([2.0, 1.0, 1.0, 0.0]), 2)) == [0, 1, 2]  # ties at the k-th value stay
    np.testing.assert_array_equal(x, np.array([0.1, 3.0, 2.0, -1.0, 2.5], np.float32))  # input untouched


def test_top_p():
    x = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert kept(top_p_filter(x, 0.5)) == [0]  # the top token alone reaches 0.5
    assert kept(top_p_filter(x, 0.6)) == [0, 1]  # the token that crosses p stays
    assert kept(top_p_filter(x, 0.8)) == [0, 1]
    assert kept(top_p_filter(x, 0.81)) == [0, 1, 2]
    assert kept(top_p_filter(x, 1e-9)) == [0]  # always at least one token
    assert kept(top_p_filter(x, 1.0)) == [0, 1, 2, 3]  # off
    assert kept(top_p_filter(np.log([0.05, 0.15, 0.5, 0.3]), 0.6)) == [2, 3]  # order of the vocabulary irrelevant


def test_min_p():
    x = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert kept(min_p_filter(x, 0.0)) == [0, 1, 2, 3]  # off
    assert kept(min_p_filter(x, 0.5)) == [0, 1]  # 0.15 < 0.25
    assert kept(min_p_filter(x, 0.29)) == [0, 1, 2]  # 0.15 >= 0.145 stays
    assert kept(min_p_filter(x, 1.0)) == [0]


def test_repetition_penalty():
    x = np.array([2.0, -2.0, 1.0, 0.0], np.float32)
    np.testing.assert_allclose(apply_repetition_penalty(x, np.array([0, 1, 3]), 2.0), [1.0, -4.0, 1.0, 0.0])
    np.testing.assert_array_equal(apply_repetition_penalty(x, np.array([0, 1]), 1.0), x)
    np.testing.assert_array_equal(apply_repetition_penalty(x, np.array([], np.int64), 2.0), x)


def test_all_minus_inf_but_one():
    x = np.full(1000, NEG, np.float32)
    x[417] = -5.0
    rng = make_rng(0)
    for params in (SamplingParams(temperature=0), SamplingParams(), SamplingParams(top_k=0, top_p=1.0),
                   SamplingParams(top_k=5000, top_p=0.01, min_p=0.9, temperature=7.0)):
        assert all(sample(x, params, rng) == 417 for _ in range(5))
    with pytest.raises(ValueError, match="finite"):
        sample(np.full(10, NEG), SamplingParams(), rng)
    with pytest.raises(ValueError, match="finite"):
        sample(np.full(10, NEG), SamplingParams(temperature=0), rng)


def test_greedy_is_argmax_after_the_penalty():
    x = np.array([1.0, 5.0, 4.0], np.float32)
    assert sample(x, SamplingParams(temperature=0), make_rng(0)) == 1
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample(x, params, make_rng(0), seen_ids=np.array([1])) == 2  # 5 / 2 < 4


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = np.random.default_rng(3).normal(0, 2, 50_000).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=123)
    a = [sample(logits, params, make_rng(params.seed)) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same first draw
    rng1, rng2 = make_rng(7), make_rng(7)
    assert [sample(logits, params, rng1) for _ in range(50)] == [sample(logits, params, rng2) for _ in range(50)]
    # Every draw comes from the allowed set: the 40 best, then the nucleus of the tempered distribution.
    allowed = set(kept(top_p_filter(apply_temperature(top_k_filter(logits, 40), 0.8), 0.9)))
    draws = [sample(logits, params, rng1) for _ in range(300)]
    assert set(draws) <= allowed and len(set(draws)) > 3


def test_draw_frequencies():
    probs = np.array([0.1, 0.0, 0.6, 0.3])
    rng = make_rng(0)
    counts = np.bincount([draw(probs, rng) for _ in range(20_000)], minlength=4) / 20_000
    np.testing.assert_allclose(counts, probs, atol=0.015)
    assert counts[1] == 0


def test_pipeline_equals_the_filters_over_the_full_vocabulary():
    """Working on the top-k survivors only gives the same distribution as filtering the whole vocabulary."""
    logits = np.random.default_rng(5).normal(0, 3, 5000).astype(np.float32)
    params = SamplingParams(temperature=0.7, top_k=64, top_p=0.8, min_p=0.05, repetition_penalty=1.3)
    seen = np.array([int(np.argmax(logits)), 17, 99])
    full = apply_repetition_penalty(logits, seen, 1.3)
    full = min_p_filter(top_p_filter(top_k_filter(apply_temperature(full, 0.7), 64), 0.8), 0.05)
    expected = softmax(full)
    rng = make_rng(11)
    counts = np.bincount([sample(logits, params, rng, seen) for _ in range(20_000)], minlength=5000) / 20_000
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(expected))
    np.testing.assert_allclose(counts, expected, atol=0.02)


def test_params_validation_and_overrides():
    for bad in ({"temperature": -1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": 2.0},
                {"repetition_penalty": 0.0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    p = SamplingParams().updated({"temperature": 0.0, "top_k": None})
    assert p.greedy and p.top_k == 64
    with pytest.raises(TypeError, match="unknown sampling"):
        SamplingParams().updated({"topk": 3})
