"""Quantization primitives on rows of a weight [N, K] (nn.Linear layout), blocks along K: codes, ranges, packing.

Plain functions, no policy: `recipes.py` decides each weight's scheme, `quantizers.py` applies it chunk by chunk
(and `error_feedback.py` builds on the range search here). Per block of `block_size` along K:
  - 4-bit symmetric: onnxruntime's own C++ quantizer (`quantize_matmul_4bits`, what `MatMulNBitsQuantizer`
    calls): the signed absmax maps to -8 (llama.cpp's Q4_0), zero point 8.
  - 4-bit asymmetric (every 4-bit preset): a range onto [0, 15] with a 4-bit zero point per block, the range
    chosen per block among shrunken [min, max] to minimise the squared error weighted by `importance`, the
    mean square of the matmul's input per channel (from `calibrate.py`; uniform without it). Round-to-nearest
    on the full range (onnxruntime's asymmetric quantizer) is the first candidate, so the search is never worse
    on the weighted error. On the real 270M (8-bit projections), a 4-bit lm_head costs perplexity 13.36 -> 14.37
    round-to-nearest, 14.23 searched, 13.93 searched with calibrated importance: a few input channels of the
    final norm carry 1000x the median energy, and their weights must not share a scale with rounding noise.
    Given the input's Gram matrix (`calibrate.py`, within a memory budget: `export.py`), `error_feedback.py` also
    carries each column's rounding error onto the columns not yet rounded (GPTQ).
  - 4-bit symmetric for TensorRT (no zero points): the same search over shrunken absmax ranges with the zero
    point fixed at 8, i.e. signed codes -8..7, scales rounded to the stored scale type first.
  - 8-bit, symmetric: scale = absmax / 127 (numpy, below). onnxruntime's 8-bit kernel maps absmax to -128, which
    loses the exactness we want: a GGUF Q8_0 tensor (int8, one scale per 32) re-encodes exactly with absmax / 127.
  - fp8 E4M3 (TensorRT): one scale per output row, absmax / 448, values saturated to +-448.
"""

from __future__ import annotations

import numpy as np

from gemma3.plugins.attention_schema import FP8_MAX  # largest finite float8 E4M3FN value


def packed_shapes(n: int, k: int, bits: int, block_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of MatMulNBits' B ([N, k_blocks, blob]) and scales ([N, k_blocks]) for a [N, K] weight."""
    k_blocks = -(-k // block_size)
    return (n, k_blocks, block_size * bits // 8), (n, k_blocks)


def rows_8bit(padded: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = padded.reshape(len(padded), -1, block_size)
    scales = np.abs(blocks).max(axis=-1) / 127.0
    blocks /= np.where(scales == 0, 1.0, scales)[:, :, None]
    return (np.clip(np.rint(blocks), -127, 127) + 128).astype(np.uint8), scales


def rows_4bit_onnxruntime(padded: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, k_padded = padded.shape
    packed_shape, scales_shape = packed_shapes(n, k_padded, 4, block_size)
    columns = np.ascontiguousarray(padded.T)  # the kernel reads K-major (the MatMul's B layout)
    packed = np.zeros(packed_shape, dtype=np.uint8)
    scales = np.zeros(scales_shape, dtype=np.float32)
    unused_zero_points = np.zeros((n, -(-packed_shape[1] // 2)), dtype=np.uint8)
    quantize_matmul_4bits(packed, columns, scales, unused_zero_points, block_size, n, k_padded, True)
    return packed, scales


# Candidate ranges: [min, max] scaled by these factors (1.0 first: round-to-nearest on the full range).
SHRINK = tuple(np.linspace(1.0, 0.6, 17).tolist())


def rows_4bit_searched(padded: np.ndarray, block_size: int, channel_weights: np.ndarray, symmetric: bool = False,
                       scale_dtype: str | None = None):
    blocks = padded.reshape(len(padded), -1, block_size)
    scale, zero = searched_ranges(blocks, channel_weights.reshape(1, -1, block_size), symmetric, scale_dtype)
    return pack_4bit(codes_4bit(blocks, scale, zero), scale, zero)


def round_scales(scale: np.ndarray, scale_dtype: str | None) -> np.ndarray:
    """Scales as they will be stored (e.g. bfloat16 for a TensorRT graph), back in float32 for the arithmetic."""
    if scale_dtype is None or scale_dtype == "float32":
        return scale
    import ml_dtypes

    return scale.astype(getattr(ml_dtypes, scale_dtype) if scale_dtype == "bfloat16" else scale_dtype).astype(
        np.float32)


def searched_ranges(blocks: np.ndarray, weights: np.ndarray, symmetric: bool = False,
                    scale_dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """blocks [n, kb, block] -> the candidate range with the least weighted squared error per block:
    scales and integer zero points [n, kb, 1] (float32). Symmetric: zero point 8 (signed codes -8..7), the
    range +-absmax shrunk; asymmetric: [min, max] shrunk (0 stays exactly representable)."""
    if symmetric:
        high = np.abs(blocks).max(axis=-1, keepdims=True)
        low = -high
    else:
        low = np.minimum(blocks.min(axis=-1, keepdims=True), 0)
        high = np.maximum(blocks.max(axis=-1, keepdims=True), 0)
    best_err = np.full(low.shape, np.inf, dtype=np.float32)
    best_scale = np.zeros(low.shape, dtype=np.float32)
    best_zero = np.zeros(low.shape, dtype=np.float32)
    work = np.empty(np.broadcast_shapes(blocks.shape, weights.shape), dtype=np.float32)
    for shrink in SHRINK:
        if symmetric:
            scale = round_scales(high * np.float32(shrink / 7), scale_dtype)
            zero = np.full(low.shape, 8, dtype=np.float32)
        else:
            scale = round_scales((high - low) * np.float32(shrink / 15), scale_dtype)
            zero = np.clip(np.rint(-low * np.float32(shrink) / np.where(scale == 0, 1, scale)), 0, 15)
        # the error of this candidate, in one scratch buffer: the same operations, in the same order, as
        # codes_4bit() then square((q - zero) * scale - blocks) * weights, without a temporary per operation
        # (the search is most of a 4-bit export's time: a 27b has 25.6B weights to try 17 ranges on)
        np.divide(blocks, np.where(scale == 0, 1, scale), out=work)
        np.rint(work, out=work)
        work += zero
        np.clip(work, 0, 15, out=work)
        work -= zero
        work *= scale
        work -= blocks
        np.square(work, out=work)
        work *= weights
        err = work.sum(axis=-1, keepdims=True)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    return best_scale, best_zero


def codes_4bit(values: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Round to the nearest of the 16 levels `(q - zero) * scale` (float32 codes 0..15)."""
    return np.clip(np.rint(values / np.where(scale == 0, 1, scale)) + zero, 0, 15)


def pack_4bit(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray):
    """codes [n, kb, block], scale / zero [n, kb, 1] -> MatMulNBits' packed data, scales, packed zero points."""
    q = codes.astype(np.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    zero = zero[..., 0].astype(np.uint8)
    if zero.shape[1] % 2:
        zero = np.pad(zero, ((0, 0), (0, 1)), constant_values=8)  # onnxruntime's filler nibble
    return packed, scale[..., 0], zero[:, 0::2] | (zero[:, 1::2] << 4)


def dequantize_blockwise(
    packed: np.ndarray, scales: np.ndarray, bits: int, k: int, zero_points: np.ndarray | None = None
) -> np.ndarray:
    """The inverse, for tests and error reports: [N, K] fp32."""
    n, k_blocks, _ = packed.shape
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k_blocks, -1) if bits == 4 else packed
    if zero_points is None:
        zero = np.float32(2 ** (bits - 1))
    else:
        zero = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :k_blocks, None]
    centred = values.astype(np.float32) - zero
    return (centred * scales[:, :, None]).reshape(n, -1)[:, :k]




def rows_fp8(rows: np.ndarray, scale_dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """rows [n, K] -> float8 E4M3FN values [n, K] (ml_dtypes) and one scale per row [n] (absmax / 448, rounded to
    the stored scale type first, then values saturated: what QuantizeLinear(saturate=1) would give)."""
    import ml_dtypes

    amax = np.abs(rows).max(axis=1)
    scales = round_scales((amax / np.float32(FP8_MAX)).astype(np.float32), scale_dtype)
    safe = np.where(scales == 0, 1, scales)[:, None]
    values = np.clip(rows / safe, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return values, scales


def signed_int4_columns(packed: np.ndarray, k: int) -> np.ndarray:
    """MatMulNBits-layout codes (unsigned nibbles 0..15, zero point 8: packed [N, k_blocks, blob]) -> the ONNX INT4
    tensor [K, N] that `DequantizeLinear(axis=0, block_size)` reads before a MatMul: signed values -8..7, two per
    byte along the flattened [K, N] order, low nibble first (ONNX's and TensorRT's packing)."""
    n = packed.shape[0]
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)[:, :k]  # [N, K] unsigned
    signed = (codes.T.astype(np.int16) - 8).astype(np.uint8) & 0x0F  # [K, N] two's complement nibbles
    flat = signed.reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
