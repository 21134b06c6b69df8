"""Weight forms of the tensorrt target: standard ONNX that TensorRT's parser turns into (quantized) GEMMs.

Formats from ../shared/docs/tensorrt-facts.md, section 3 (TensorRT 10/11 ONNX parser, ModelOpt's exporters):
  - float (bf16 / fp16 / fp32): W^T [K, N] stored in the compute dtype -> MatMul.
  - fp8 (W8A8): W^T as FLOAT8E4M3FN [K, N] -> DequantizeLinear(scale [N], axis=1); the input through
    QuantizeLinear(x, s, zero point FLOAT8E4M3FN 0, saturate=1) -> DequantizeLinear(s), s per tensor, calibrated.
  - int4 (W4A16): W^T as INT4 [K, N] (signed, two per byte, low nibble first) ->
    DequantizeLinear(scales [K / block, N], axis=0, block_size) -> MatMul. Symmetric: no zero point at all.
Scales are stored in the compute dtype (DequantizeLinear's output type is its scale's type, and a strongly typed
network must see the compute dtype there). The tied table [V, H] is read by Gather (embedding) and by
Gemm(transB=1) (lm_head), so it is stored once and never transposed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .graph_edit import add_const, add_node, replace_output
from .quantize import signed_int4_columns
from .recipes import EMBED, Recipe, Scheme
from .weights import Stored, WeightPlan


def numpy_dtype(name: str) -> np.dtype:
    """float32 / float16 as numpy's, bfloat16 / float8e4m3fn as ml_dtypes' (what onnx_ir maps to ONNX types)."""
    if name in ("bfloat16", "float8e4m3fn"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, "float8_e4m3fn" if name == "float8e4m3fn" else name))
    return np.dtype(name)


def _fp8_zero(graph: ir.Graph, anchor: ir.Node, name: str) -> ir.Value:
    return add_const(graph, anchor, name, 0.0, dtype=numpy_dtype("float8e4m3fn"))


def _quantize_input(graph: ir.Graph, plan: WeightPlan, anchor: ir.Node, x: ir.Value, name: str, first: str,
                    sources, recipe: Recipe) -> ir.Value:
    """x -> QuantizeLinear -> DequantizeLinear with the per-tensor scale calibrated for this matmul's input."""
    dtype = numpy_dtype(recipe.compute_dtype)
    scale = plan.add(graph, Stored(f"{name}.input_scale", sources, dtype, (),
                                   lambda _w: np.asarray(plan.input_scale(first), dtype=np.float32)))
    q = add_node(graph, anchor, "", "QuantizeLinear", [x, scale, _fp8_zero(graph, anchor, f"{name}.input_zero")],
                 f"{name}.input_q", saturate=1)
    return add_node(graph, anchor, "", "DequantizeLinear", [q.outputs[0], scale], f"{name}.input_dq").outputs[0]


def _weight(graph: ir.Graph, plan: WeightPlan, anchor: ir.Node, name: str, sources, n: int, k: int, scheme: Scheme,
            recipe: Recipe, transposed: bool) -> ir.Value:
    """The weight as the matmul reads it: [K, N] (`transposed`, projections) or [N, K] (the tied table)."""
    compute = numpy_dtype(recipe.compute_dtype)
    shape = (k, n) if transposed else (n, k)
    if not scheme.quantized:
        dtype = numpy_dtype(scheme.storage)
        if transposed:
            return plan.add(graph, Stored(name, sources, dtype, shape, lambda w: w.T))
        return plan.add(graph, Stored(name, sources, dtype, shape, lambda w: w, rowwise=True))
    scale_dtype = recipe.compute_dtype

    def part(index: int, layout=lambda a: a):
        return lambda w: layout(plan.quantized(sources, scheme, w, scale_dtype)[index])

    if scheme.storage == "float8e4m3fn":  # one scale per output channel (N)
        values = plan.add(graph, Stored(f"{name}.fp8", sources, numpy_dtype("float8e4m3fn"), shape,
                                        part(0, (lambda a: a.T) if transposed else (lambda a: a))))
        scales = plan.add(graph, Stored(f"{name}.scales", sources, compute, (n,), part(1)))
        return add_node(graph, anchor, "", "DequantizeLinear", [values, scales], f"{name}.dq",
                        axis=1 if transposed else 0).outputs[0]
    if scheme.storage == "int4" and scheme.symmetric and transposed:
        blocks = -(-k // scheme.block)
        values = plan.add(graph, Stored(f"{name}.int4", sources, np.uint8, (k, n),
                                        part(0, lambda packed: signed_int4_columns(packed, k)),
                                        onnx_type=ir.DataType.INT4))
        scales = plan.add(graph, Stored(f"{name}.scales", sources, compute, (blocks, n), part(1, lambda s: s.T)))
        return add_node(graph, anchor, "", "DequantizeLinear", [values, scales], f"{name}.dq",
                        axis=0, block_size=scheme.block).outputs[0]
    raise ValueError(f"{name}: {scheme.storage} ({'symmetric' if scheme.symmetric else 'asymmetric'}) weights have "
                     "no tensorrt form")


def linear_tensorrt(graph: ir.Graph, plan: WeightPlan, anchor: ir.Node, name: str, sources: tuple[str, ...], n: int,
                    k: int, scheme: Scheme, recipe: Recipe) -> ir.Value:
    x = anchor.inputs[0]
    if scheme.activations is not None:
        x = _quantize_input(graph, plan, anchor, x, name, sources[0], sources, recipe)
    weight = _weight(graph, plan, anchor, name, sources, n, k, scheme, recipe, transposed=True)
    return add_node(graph, anchor, "", "MatMul", [x, weight], f"{name}.matmul").outputs[0]


def embedding_tensorrt(graph: ir.Graph, plan: WeightPlan, gathers: list[ir.Node], lm_heads: list[ir.Node], shape,
                       scheme: Scheme, recipe: Recipe) -> None:
    """Gather(table, ids) for the lookup, Gemm(h, table, transB=1) for the lm_head: one stored table."""
    vocab, hidden = shape
    anchor = gathers[0] if gathers else lm_heads[0]
    table = _weight(graph, plan, anchor, EMBED, EMBED, vocab, hidden, scheme, recipe, transposed=False)
    for gather in gathers:
        gather.replace_input_with(0, table)
    for matmul in lm_heads:  # (B, S, H) -> (B*S, H) @ E^T -> (B, S, V), any batch
        x = matmul.inputs[0]
        if scheme.activations is not None:
            x = _quantize_input(graph, plan, matmul, x, "lm_head", EMBED, EMBED, recipe)
        flat = add_node(graph, matmul, "", "Reshape", [x, add_const(graph, matmul, "lm_head.flat_shape",
                        [-1, hidden])], "lm_head.flatten").outputs[0]
        gemm = add_node(graph, matmul, "", "Gemm", [flat, table], "lm_head.gemm", transB=1).outputs[0]
        leading = add_node(graph, matmul, "", "Shape", [matmul.inputs[0]], "lm_head.leading", start=0, end=-1)
        out_shape = add_node(graph, matmul, "", "Concat", [leading.outputs[0], add_const(
            graph, matmul, "lm_head.vocab", [vocab])], "lm_head.out_shape", axis=0).outputs[0]
        replace_output(graph, matmul, add_node(graph, matmul, "", "Reshape", [gemm, out_shape], "lm_head").outputs[0])

