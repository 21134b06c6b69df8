"""Blockwise weight quantization used by the exporter."""

from __future__ import annotations

import numpy as np
import pytest

from gemma3.exporter import quantize
from gemma3.exporter.quantize import dequantize_blockwise, quantize_blockwise


@pytest.mark.parametrize("bits", [4, 8])
def test_row_chunks_change_nothing(bits, monkeypatch):
    weight = np.random.default_rng(0).standard_normal((5000, 96)).astype(np.float32)
    whole = quantize_blockwise(weight, bits, 32)
    monkeypatch.setattr(quantize, "ROWS_PER_CHUNK", 1000)
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


def test_asymmetric_4bit_uses_the_whole_range():
    """[min, max] onto 16 levels: at most half a step of (max - min) / 15, tighter than symmetric on skewed blocks."""
    rng = np.random.default_rng(3)
    weight = (rng.random((64, 64)) * 3 + 1).astype(np.float32)  # all positive: symmetric wastes half its levels
    packed, scales, zero_points = quantize_blockwise(weight, 4, 32, symmetric=False)
    assert zero_points.shape == (64, 1)
    asym = np.abs(dequantize_blockwise(packed, scales, 4, 64, zero_points) - weight).max()
    sym = np.abs(dequantize_blockwise(*quantize_blockwise(weight, 4, 32)[:2], 4, 64) - weight).max()
    assert asym <= 0.51 * 4 / 15 + 1e-6 and asym < sym
