"""Weight-only quantization schemes and the per-tensor packing for ONNX Runtime's MatMulNBits.

Applied one tensor at a time, so an export never holds more than one weight in memory. Per block of `block_size`
along K:
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
  - 8-bit, symmetric: scale = absmax / 127 (numpy, below). onnxruntime's 8-bit kernel maps absmax to -128, which
    loses the exactness we want: a GGUF Q8_0 tensor (int8, one scale per 32) re-encodes exactly with absmax / 127.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Precision:
    """How the decoder's weights are stored. `None` bits means float (fp32)."""

    name: str
    linear_bits: int | None  # q/k/v/o/gate/up/down projections
    embed_bits: int | None  # the tied embedding / lm_head table (63% of the 270m's parameters)
    block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits: int8 activations, the fast CPU path
    symmetric: bool = True  # 4-bit weights (8-bit ones are always symmetric)
    keep_8bit: tuple[str, ...] = ()  # projections (by module name) stored 8-bit symmetric, as k-quant mixes do
    block_8bit: int = 32  # block of 8-bit projections
    table_block: int | None = None  # block of the tied embedding / lm_head table; None: `block_size`
    doc: str = ""

    def for_projection(self, name: str, k: int) -> Precision:
        """The scheme of one (possibly fused) projection, e.g. `text.layers.3.attn.q_proj+k_proj+v_proj.weight`.

        The tied embedding keeps `block_size` (32) at 8 bits: that is what re-encodes a GGUF Q8_0 table exactly.
        Measured on the real 270M (2 threads): int4-mixed's 8-bit projections at block 128 instead of 32 decode
        at 95.9 instead of 77.6 tok/s for perplexity 14.69 instead of 14.65; for int8 the same change costs
        13.43 -> 13.53, so int8 keeps 32.
        """
        if self.linear_bits == 8 or any(part in name for part in self.keep_8bit):
            block = self.block_8bit if k % self.block_8bit == 0 else self.block_size  # no padded blocks
            return replace(self, linear_bits=8, symmetric=True, keep_8bit=(), block_size=block)
        return self

    def embed_block(self, hidden: int) -> int:
        """The table's block: `table_block` (else `block_size`), halved until it divides the hidden size (a
        GatherBlockQuantized row has no padding); every real Gemma 3 width is a multiple of 128."""
        block = self.table_block or self.block_size
        while hidden % block and block > 16:
            block //= 2
        return block

    @property
    def quantized(self) -> bool:
        return self.linear_bits is not None or self.embed_bits is not None

    @property
    def calibrated(self) -> bool:
        """Asymmetric 4-bit weights somewhere: their range search uses activation statistics."""
        return not self.symmetric and 4 in (self.linear_bits, self.embed_bits)

    @property
    def scheme(self) -> str:
        """One line for the manifest."""
        parts = ["blockwise along K; 8-bit: symmetric, absmax / 127, round to nearest"]
        if 4 in (self.linear_bits, self.embed_bits):
            parts.append("4-bit: symmetric, onnxruntime's quantizer" if self.symmetric else
                         "4-bit: asymmetric, per-block range searched for the least input-weighted squared error; "
                   "with error feedback (GPTQ) where the input's Gram matrix was measured")
        return "; ".join(parts)


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", None, None, doc="float32 weights: the reference"),
        Precision("int8", 8, 8, doc="8-bit block-32 weights everywhere"),
        Precision("int4", 4, 8, symmetric=False,
                  doc="4-bit block-32 projections with zero points, 8-bit tied embedding / lm_head"),
        Precision("int4-mixed", 4, 4, symmetric=False, block_size=64, keep_8bit=("q_proj", "down_proj"),
                  block_8bit=128, table_block=64,
                  doc="4-bit block-64 o/gate/up projections, 8-bit block-128 q/k/v and down projections, 4-bit "
                      "block-64 tied table, every 4-bit weight with error feedback"),
        Precision("int8-head4", 8, 4, symmetric=False, table_block=64, block_8bit=128,
                  doc="8-bit block-128 projections, 4-bit block-64 tied embedding / lm_head with zero points "
                      "(calibrated range search and error feedback)"),
        Precision("int8-head4-fast", 8, 4, symmetric=False, table_block=128, block_8bit=128,
                  doc="as int8-head4 with 4-bit blocks of 128 in the tied table: fewer scale bytes per token"),
        Precision("int4-full", 4, 4, symmetric=False,
                  doc="4-bit block-32 everywhere, embedding included (smallest)"),
    )
}


def precision(name: str) -> Precision:
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}") from None


def packed_shapes(n: int, k: int, bits: int, block_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of MatMulNBits' B ([N, k_blocks, blob]) and scales ([N, k_blocks]) for a [N, K] weight."""
    k_blocks = -(-k // block_size)
    return (n, k_blocks, block_size * bits // 8), (n, k_blocks)


ROWS_PER_CHUNK = 4096  # quantize a few MB of rows at a time: temporaries stay small next to the weight itself


def quantize_blockwise(
    weight: np.ndarray, bits: int, block_size: int, symmetric: bool = True, importance: np.ndarray | None = None,
    gram: np.ndarray | None = None, damp: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """weight [N, K] (nn.Linear layout) -> packed uint8 [N, k_blocks, blob], fp32 scales [N, k_blocks], and for
    asymmetric 4-bit the zero points packed two per byte [N, ceil(k_blocks / 2)] (MatMulNBits' layout).
    `importance` [K] weights the error of asymmetric 4-bit's range search (see the module docstring); `gram`
    [K, K] adds error feedback to it (`error_feedback.py`, damped by `damp`, default its PROJECTION_DAMP)."""
    from . import error_feedback  # it builds on this module's range search

    if bits not in (4, 8) or (bits == 8 and not symmetric):
        raise ValueError(f"{bits}-bit {'' if symmetric else 'asymmetric '}weights are not supported")
    if gram is not None and (bits, symmetric) != (4, False):
        raise ValueError("error feedback (gram) is for asymmetric 4-bit weights only")
    n, k = weight.shape
    packed_shape, scales_shape = packed_shapes(n, k, bits, block_size)
    packed = np.empty(packed_shape, dtype=np.uint8)
    scales = np.empty(scales_shape, dtype=np.float32)
    zero_points = None if symmetric else np.empty((n, -(-packed_shape[1] // 2)), dtype=np.uint8)
    k_padded = packed_shape[1] * block_size
    if importance is not None and importance.shape != (k,):
        raise ValueError(f"importance has shape {importance.shape}, expected ({k},)")
    if gram is not None and gram.shape != (k, k):
        raise ValueError(f"gram has shape {gram.shape}, expected ({k}, {k})")
    channel_weights = np.ones(k_padded, dtype=np.float32)  # padded channels: zero weights, any weight will do
    if importance is not None:
        channel_weights[:k] = importance
    factor = None if gram is None else error_feedback.inverse_factor(
        gram, k_padded, error_feedback.PROJECTION_DAMP if damp is None else damp)
    for start in range(0, n, ROWS_PER_CHUNK):  # blocks run along K inside a row, so row chunks are exact
        rows = slice(start, min(start + ROWS_PER_CHUNK, n))
        chunk = np.zeros((rows.stop - start, k_padded), dtype=np.float32)
        chunk[:, :k] = weight[rows]
        if bits == 8:
            packed[rows], scales[rows] = _rows_8bit(chunk, block_size)
        elif symmetric:
            packed[rows], scales[rows] = _rows_4bit_symmetric(chunk, block_size)
        elif factor is None:
            packed[rows], scales[rows], zero_points[rows] = _rows_4bit_searched(chunk, block_size, channel_weights)
        else:
            packed[rows], scales[rows], zero_points[rows] = error_feedback.rows_4bit_feedback(
                chunk, block_size, factor, channel_weights)
    return packed, scales, zero_points


def _rows_8bit(padded: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = padded.reshape(len(padded), -1, block_size)
    scales = np.abs(blocks).max(axis=-1) / 127.0
    blocks /= np.where(scales == 0, 1.0, scales)[:, :, None]
    return (np.clip(np.rint(blocks), -127, 127) + 128).astype(np.uint8), scales


def _rows_4bit_symmetric(padded: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
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


def _rows_4bit_searched(padded: np.ndarray, block_size: int, channel_weights: np.ndarray):
    blocks = padded.reshape(len(padded), -1, block_size)
    scale, zero = searched_ranges(blocks, channel_weights.reshape(1, -1, block_size))
    return pack_4bit(codes_4bit(blocks, scale, zero), scale, zero)


def searched_ranges(blocks: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """blocks [n, kb, block] -> the candidate range with the least weighted squared error per block:
    scales and integer zero points [n, kb, 1] (float32)."""
    low = np.minimum(blocks.min(axis=-1, keepdims=True), 0)  # 0 stays exactly representable
    high = np.maximum(blocks.max(axis=-1, keepdims=True), 0)
    best_err = np.full(low.shape, np.inf, dtype=np.float32)
    best_scale = np.zeros(low.shape, dtype=np.float32)
    best_zero = np.zeros(low.shape, dtype=np.float32)
    for shrink in SHRINK:
        scale = (high - low) * np.float32(shrink / 15)
        zero = np.clip(np.rint(-low * np.float32(shrink) / np.where(scale == 0, 1, scale)), 0, 15)
        q = codes_4bit(blocks, scale, zero)
        err = (np.square((q - zero) * scale - blocks) * weights).sum(axis=-1, keepdims=True)
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
