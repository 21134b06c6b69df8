"""Apply one weight's `Scheme` (from `recipes.py`): the only place a scheme turns into bytes.

The chain is one-way: `quantize.py` (primitives) <- `error_feedback.py` (GPTQ on those) <- this module <-
`weights.py` (streaming). Rows are processed a chunk at a time: temporaries stay a few MB next to the weight.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import error_feedback
from .quantize import (
    packed_shapes,
    rows_4bit_onnxruntime,
    rows_4bit_searched,
    rows_8bit,
    rows_fp8,
)
from .recipes import Scheme

ROWS_PER_CHUNK = 4096  # quantize a few MB of rows at a time: temporaries stay small next to the weight itself


class Quantized(NamedTuple):
    data: np.ndarray  # int: packed codes [N, k_blocks, blob] (MatMulNBits' layout); fp8: values [N, K]
    scales: np.ndarray  # int: [N, k_blocks]; fp8: [N]
    zero_points: np.ndarray | None  # asymmetric 4-bit: packed two per byte [N, ceil(k_blocks / 2)]


def quantize(weight: np.ndarray, scheme: Scheme, importance: np.ndarray | None = None,
             gram: np.ndarray | None = None, scale_dtype: str | None = None) -> Quantized:
    """weight [N, K] (nn.Linear layout) -> its stored form under `scheme`.

    `importance` [K] (mean square of the matmul's input per channel) weights a searched range's error; `gram`
    [K, K] (the input's Gram matrix) adds error feedback when the scheme asks for it (`scheme.damp`).
    `scale_dtype`: the type scales are stored in (TensorRT graphs: the compute dtype), so the search and the
    error feedback see the scales as they will be read.
    """
    if not scheme.quantized:
        raise ValueError(f"{scheme.storage} weights are stored as they are, not quantized")
    n, k = weight.shape
    if importance is not None and importance.shape != (k,):
        raise ValueError(f"importance has shape {importance.shape}, expected ({k},)")
    if gram is not None and gram.shape != (k, k):
        raise ValueError(f"gram has shape {gram.shape}, expected ({k}, {k})")
    if scheme.storage == "float8e4m3fn":  # per row: chunks are exact
        factor, order = None, None
        if gram is not None and scheme.damp is not None:
            # act-order (GPTQ's): the input channels with the most energy are rounded first, while the most
            # columns are left to absorb their error; the per-row scale does not depend on the order. Real 270M,
            # W8A8, PyTorch: perplexity 13.646 -> 13.608 (weights only 13.492 -> 13.473).
            order = np.argsort(-np.diag(gram), kind="stable")
            factor = error_feedback.inverse_factor(gram[np.ix_(order, order)], k, scheme.damp)

        def rows(chunk: np.ndarray):
            if factor is None:
                return rows_fp8(chunk, scale_dtype)
            codes, scales = error_feedback.rows_fp8_feedback(chunk[:, order], factor, scale_dtype)
            return codes[:, np.argsort(order)], scales

        parts = [rows(np.asarray(weight[start:start + ROWS_PER_CHUNK], dtype=np.float32))
                 for start in range(0, n, ROWS_PER_CHUNK)]
        return Quantized(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), None)
    bits, block = scheme.bits, scheme.block
    if bits == 8 and not scheme.symmetric:
        raise ValueError("8-bit weights are symmetric only")
    packed_shape, scales_shape = packed_shapes(n, k, bits, block)
    packed = np.empty(packed_shape, dtype=np.uint8)
    scales = np.empty(scales_shape, dtype=np.float32)
    zero_points = None if scheme.symmetric else np.empty((n, -(-packed_shape[1] // 2)), dtype=np.uint8)
    k_padded = packed_shape[1] * block
    channel_weights = np.ones(k_padded, dtype=np.float32)  # padded channels: zero weights, any weight will do
    if importance is not None:
        channel_weights[:k] = importance
    factor = None
    if gram is not None and scheme.damp is not None and bits == 4:
        factor = error_feedback.inverse_factor(gram, k_padded, scheme.damp)
    for start in range(0, n, ROWS_PER_CHUNK):  # blocks run along K inside a row, so row chunks are exact
        rows = slice(start, min(start + ROWS_PER_CHUNK, n))
        chunk = np.zeros((rows.stop - start, k_padded), dtype=np.float32)
        chunk[:, :k] = weight[rows]
        if bits == 8:
            packed[rows], scales[rows] = rows_8bit(chunk, block)
            continue
        if scheme.onnxruntime_quantizer:
            packed[rows], scales[rows] = rows_4bit_onnxruntime(chunk, block)
            continue
        if factor is None:
            result = rows_4bit_searched(chunk, block, channel_weights, scheme.symmetric, scale_dtype)
        else:
            result = error_feedback.rows_4bit_feedback(chunk, block, factor, channel_weights, scheme.symmetric,
                                                       scale_dtype)
        packed[rows], scales[rows] = result[0], result[1]
        if zero_points is not None:
            zero_points[rows] = result[2]
    return Quantized(packed, scales, zero_points)
