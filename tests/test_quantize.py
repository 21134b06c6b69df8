"""Blockwise weight quantization used by the exporter."""

from __future__ import annotations

import numpy as np
import pytest

from gemma3.exporter import quantize, quantizers
from gemma3.exporter.quantize import dequantize_blockwise
from gemma3.exporter.recipes import PROJECTION_DAMP, Scheme


def quantize_blockwise(weight, bits, block, symmetric=True, importance=None, gram=None, damp=None):
    """The scheme these tests mean: 8-bit absmax; 4-bit symmetric through onnxruntime's quantizer; 4-bit asymmetric
    range-searched, with error feedback when a Gram is given."""
    scheme = Scheme(f"int{bits}", block, symmetric, search=not symmetric,
                    onnxruntime_quantizer=bits == 4 and symmetric,
                    damp=(damp or PROJECTION_DAMP) if gram is not None else None)
    return quantizers.quantize(weight, scheme, importance, gram)


@pytest.mark.parametrize("bits", [4, 8])
def test_row_chunks_change_nothing(bits, monkeypatch):
    weight = np.random.default_rng(0).standard_normal((5000, 96)).astype(np.float32)
    whole = quantize_blockwise(weight, bits, 32)
    monkeypatch.setattr(quantizers, "ROWS_PER_CHUNK", 1000)
    chunked = quantize_blockwise(weight, bits, 32)
    assert all(np.array_equal(a, b) for a, b in zip(whole, chunked))


def test_q8_0_blocks_re_encode_exactly():
    """A GGUF Q8_0 tensor is int8 times one scale per 32: 8-bit block 32 with absmax / 127 reproduces it."""
    rng = np.random.default_rng(1)
    q = rng.integers(-127, 128, (64, 4, 32))
    q[:, :, 0] = 127 * rng.choice([-1, 1], (64, 4))  # every block reaches its scale
    d = rng.random((64, 4, 1)).astype(np.float32)
    weight = (q * d).astype(np.float32).reshape(64, 128)
    packed, scales, _ = quantize_blockwise(weight, 8, 32)
    assert np.abs(dequantize_blockwise(packed, scales, 8, 128) - weight).max() < 1e-6


# 8-bit: absmax / 127 per step, rounding error at most half a step. 4-bit (Q4_0's rule, what onnxruntime's kernel
# does): the signed absmax maps to -8, so a value of the other sign near absmax clips at +7: up to one full step.
@pytest.mark.parametrize("bits, bound", [(4, 1 / 8), (8, 0.5 / 127)])
def test_error_bound(bits, bound):
    weight = np.random.default_rng(2).standard_normal((128, 100)).astype(np.float32)  # K not a multiple of 32
    packed, scales, _ = quantize_blockwise(weight, bits, 32)
    assert packed.shape[1] == 4 and scales.shape == (128, 4)
    error = np.abs(dequantize_blockwise(packed, scales, bits, 100) - weight)
    absmax = np.pad(np.abs(weight), ((0, 0), (0, 28))).reshape(128, 4, 32).max(-1)
    assert (error <= np.repeat(absmax * bound, 32, axis=1)[:, :100] + 1e-6).all()


def test_asymmetric_4bit_without_search_is_onnxruntimes_quantizer(monkeypatch):
    """With only the full range as candidate, our packing equals onnxruntime's asymmetric quantizer: same codes,
    same zero points (nibble order), scales to float rounding."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    weight = np.random.default_rng(3).standard_normal((256, 96)).astype(np.float32)
    packed, scales, zero_points = np.zeros((256, 3, 16), np.uint8), np.zeros((256, 3), np.float32), np.zeros(
        (256, 2), np.uint8)
    quantize_matmul_4bits(packed, np.ascontiguousarray(weight.T), scales, zero_points, 32, 256, 96, False)
    monkeypatch.setattr(quantize, "SHRINK", (1.0,))
    ours = quantize_blockwise(weight, 4, 32, symmetric=False)
    assert np.array_equal(ours[0], packed) and np.array_equal(ours[2], zero_points)
    np.testing.assert_allclose(ours[1], scales, rtol=1e-6)


def _weighted_block_error(weight, importance, quantized):
    error = np.square(dequantize_blockwise(*quantized[:2], 4, weight.shape[1], quantized[2]) - weight) * importance
    return error.reshape(weight.shape[0], -1, 32).sum(-1)


def test_range_search_never_loses_and_follows_importance(monkeypatch):
    """Every block's weighted error is at most round-to-nearest's, and channels given importance get smaller
    errors than without it (the lm_head case: a few input channels carry most of the energy)."""
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((512, 64)).astype(np.float32)
    weight[:, 5] *= 4  # outliers widen their blocks' range
    importance = np.ones(64, np.float32)
    importance[[3, 40]] = 1000.0
    searched = quantize_blockwise(weight, 4, 32, symmetric=False, importance=importance)
    plain = quantize_blockwise(weight, 4, 32, symmetric=False)
    monkeypatch.setattr(quantize, "SHRINK", (1.0,))
    nearest = quantize_blockwise(weight, 4, 32, symmetric=False)
    assert (_weighted_block_error(weight, importance, searched)
            <= _weighted_block_error(weight, importance, nearest) + 1e-6).all()
    assert _weighted_block_error(weight, 1.0, plain).sum() < 0.97 * _weighted_block_error(weight, 1.0, nearest).sum()

    def channel_error(q):
        return np.square(dequantize_blockwise(*q[:2], 4, 64, q[2]) - weight)[:, [3, 40]].mean()

    assert channel_error(searched) < 0.5 * channel_error(plain)


def _correlated_inputs(k: int, seed: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((4000, k)) @ rng.standard_normal((k, k))).astype(np.float32)


def test_error_feedback_with_a_diagonal_gram_is_the_range_search():
    """Uncorrelated inputs leave nothing to feed forward: the codes are the range search's, bit for bit."""
    weight = np.random.default_rng(5).standard_normal((300, 96)).astype(np.float32)  # K not a multiple of 64
    importance = np.random.default_rng(6).random(96).astype(np.float32) + 0.1
    fed = quantize_blockwise(weight, 4, 64, False, importance, gram=np.diag(importance).astype(np.float64))
    searched = quantize_blockwise(weight, 4, 64, symmetric=False, importance=importance)
    assert all(np.array_equal(a, b) for a, b in zip(fed, searched))


def test_error_feedback_cuts_the_output_error_on_correlated_inputs(monkeypatch):
    x = _correlated_inputs(128)
    weight = np.random.default_rng(7).standard_normal((500, 128)).astype(np.float32)
    gram, importance = x.T.astype(np.float64) @ x / len(x), np.square(x).mean(0)

    def output_error(quantized):
        return float(np.square((dequantize_blockwise(*quantized[:2], 4, 128, quantized[2]) - weight) @ x.T).mean())

    fed = quantize_blockwise(weight, 4, 32, False, importance, gram, damp=0.01)
    searched = output_error(quantize_blockwise(weight, 4, 32, symmetric=False, importance=importance))
    print(f"output error: range search {searched:.3f}, error feedback {output_error(fed):.3f}")
    assert output_error(fed) < 0.7 * searched  # measured 0.53
    # Rows are independent, so chunking changes nothing but BLAS's summation order (a code at a rounding tie).
    monkeypatch.setattr(quantizers, "ROWS_PER_CHUNK", 64)
    chunked = quantize_blockwise(weight, 4, 32, False, importance, gram, 0.01)
    assert np.mean(chunked[0] != fed[0]) < 1e-3 and np.allclose(chunked[1], fed[1], rtol=1e-4)
