"""Rewrite how the traced graph consumes its parameters, per recipe, and plan their storage.

The trace gives `MatMul(x, Transpose(W))` for every nn.Linear and `Gather(E, ids)` + `MatMul(h, Transpose(E))` for
the tied embedding. Projections reading the same input (q/k/v, gate/up) become one matmul over their stacked
rows + Split: half the kernel launches at decode, one read of the input. Each weight's form follows its scheme
(`recipes.py`), in the target's vocabulary:
  - ort, float32: W is stored pre-transposed (no Transpose at run time); the lm_head becomes Gemm(transB=1) on E
    itself, so the 262144-row table is stored once and ONNX Runtime never constant-folds a transposed copy.
  - ort, quantized: MatMulNBits on a block-quantized W; the embedding's packed table is shared by
    GatherBlockQuantized (lookup) and MatMulNBits (lm_head): stored once.
  - tensorrt: standard ONNX only (`weights_tensorrt.py`): float weights in the compute dtype, fp8 / int4 through
    DequantizeLinear, which TensorRT's parser turns into quantized GEMMs.
Every other parameter (norm weights) is stored as is, in the compute dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .graph_edit import add_const, add_node, matmuls_of, replace_output
from .lower_ort import MS_DOMAIN
from .quantize import packed_shapes
from .recipes import EMBED, Recipe, Scheme
from .weights import Stored, WeightPlan
from .weights_tensorrt import embedding_tensorrt, linear_tensorrt, numpy_dtype

PARAM_PREFIX = "model."  # DecoderStep.model
Group = list[tuple[str, tuple[int, int], ir.Node]]  # (source, [n, k], its Transpose node) per projection


def _quantized_entries(plan: WeightPlan, graph: ir.Graph, name: str, source, n: int, k: int,
                       scheme: Scheme, rowwise: bool = False) -> list[ir.Value]:
    """MatMulNBits' B, scales and (asymmetric only) packed zero points for a [n, k] weight. Every scheme quantizes
    rows independently (blocks and error feedback run along K), so `rowwise` entries may be written a chunk of
    rows at a time (the tied table: the largest tensor)."""
    bits, block = scheme.bits, scheme.block
    packed_shape, scales_shape = packed_shapes(n, k, bits, block)

    def part(index: int):
        return lambda w: plan.quantized(source, scheme, w)[index]  # statistics are per source

    inputs = [plan.add(graph, Stored(f"{name}.q{bits}", source, np.uint8, packed_shape, part(0), rowwise=rowwise)),
              plan.add(graph, Stored(f"{name}.scales", source, np.float32, scales_shape, part(1), rowwise=rowwise))]
    if not scheme.symmetric:
        zp_shape = (n, -(-scales_shape[1] * bits // 8))
        inputs.append(plan.add(graph, Stored(f"{name}.zero_points", source, np.uint8, zp_shape, part(2),
                                             rowwise=rowwise)))
    return inputs


def fused_name(sources: list[str]) -> str:
    """text.layers.0.attn.{q,k,v}_proj.weight -> text.layers.0.attn.q_proj+k_proj+v_proj.weight"""
    if len(sources) == 1:
        return sources[0]
    prefix = sources[0].rsplit(".", 2)[0]
    return f"{prefix}.{'+'.join(s.rsplit('.', 2)[1] for s in sources)}.weight"


def _linear_ort(graph: ir.Graph, plan: WeightPlan, anchor: ir.Node, name: str, sources: tuple[str, ...], n: int,
                k: int, scheme: Scheme, recipe: Recipe) -> ir.Value:
    if not scheme.quantized:
        weight_t = plan.add(graph, Stored(name, sources, np.float32, (k, n), lambda w: w.T))
        return add_node(graph, anchor, "", "MatMul", [anchor.inputs[0], weight_t], f"{name}.matmul").outputs[0]
    weights = _quantized_entries(plan, graph, name, sources, n, k, scheme)
    return add_node(graph, anchor, MS_DOMAIN, "MatMulNBits", [anchor.inputs[0], *weights], f"{name}.matmul",
                    K=k, N=n, bits=scheme.bits, block_size=scheme.block,
                    accuracy_level=recipe.accuracy_level).outputs[0]


def _linears(graph: ir.Graph, plan: WeightPlan, group: Group, recipe: Recipe) -> None:
    sources = [source for source, _, _ in group]
    rows = [shape[0] for _, shape, _ in group]
    n, k = sum(rows), group[0][1][1]
    matmuls = [matmuls_of(transpose)[0] for _, _, transpose in group]
    anchor, name = matmuls[0], fused_name(sources)
    scheme = recipe.scheme(name, k)
    linear = _linear_ort if recipe.target == "ort" else linear_tensorrt
    fused = linear(graph, plan, anchor, name, tuple(sources), n, k, scheme, recipe)
    if len(group) == 1:
        replace_output(graph, anchor, fused)
    else:
        split = ir.Node("", "Split", [fused, add_const(graph, anchor, f"{name}.rows", rows)],
                        ir.convenience.convert_attributes({"axis": -1}), num_outputs=len(group), name=f"{name}.split")
        graph.insert_before(anchor, split)
        for matmul, part in zip(matmuls, split.outputs):
            replace_output(graph, matmul, part)
    for _, _, transpose in group:
        graph.remove(transpose, safe=True)


def _embedding_ort(graph: ir.Graph, plan: WeightPlan, gathers: list[ir.Node], lm_heads: list[ir.Node], shape,
                   scheme: Scheme, recipe: Recipe) -> None:
    vocab, hidden = shape
    if not scheme.quantized:
        table = plan.add(graph, Stored(EMBED, EMBED, np.float32, shape, lambda w: w, rowwise=True))
        for gather in gathers:
            gather.replace_input_with(0, table)
        for matmul in lm_heads:  # (B, S, H) -> (B*S, H) @ E^T -> (B, S, V), any batch
            flat = add_node(graph, matmul, "", "Reshape", [matmul.inputs[0], add_const(
                graph, matmul, "lm_head.flat_shape", [-1, hidden])], "lm_head.flatten").outputs[0]
            gemm = add_node(graph, matmul, "", "Gemm", [flat, table], "lm_head.gemm", transB=1).outputs[0]
            leading = add_node(graph, matmul, "", "Shape", [matmul.inputs[0]], "lm_head.leading", start=0, end=-1)
            out_shape = add_node(graph, matmul, "", "Concat", [leading.outputs[0], add_const(
                graph, matmul, "lm_head.vocab", [vocab])], "lm_head.out_shape", axis=0).outputs[0]
            replace_output(graph, matmul,
                           add_node(graph, matmul, "", "Reshape", [gemm, out_shape], "lm_head").outputs[0])
        return
    bits, block = scheme.bits, scheme.block
    packed, scales, *zero_points = _quantized_entries(plan, graph, EMBED, EMBED, vocab, hidden, scheme, rowwise=True)
    # GatherBlockQuantized reads the same bytes as a 2-D [V, packed row] table (quantize_axis 1); its scales
    # and zero points have MatMulNBits' layout already, so nothing is stored twice.
    packed_2d = plan.add(graph, Stored(f"{EMBED}.rows", EMBED, np.uint8, (vocab, int(np.prod(
        packed.shape.numpy()[1:]))), lambda w: w, alias_of=packed.name))
    for gather in gathers:
        looked_up = add_node(graph, gather, MS_DOMAIN, "GatherBlockQuantized",
                             [packed_2d, gather.inputs[1], scales, *zero_points], "embed.lookup",
                             bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
        replace_output(graph, gather, looked_up.outputs[0])
    for matmul in lm_heads:
        new = add_node(graph, matmul, MS_DOMAIN, "MatMulNBits", [matmul.inputs[0], packed, scales, *zero_points],
                       "lm_head", K=hidden, N=vocab, bits=bits, block_size=block,
                       accuracy_level=recipe.accuracy_level)
        replace_output(graph, matmul, new.outputs[0])


def _embedding(graph: ir.Graph, plan: WeightPlan, value: ir.Value, shape, recipe: Recipe) -> None:
    users = [user for user, _ in value.uses()]
    gathers = [u for u in users if u.op_type == "Gather"]
    transposes = [u for u in users if u.op_type == "Transpose"]
    if len(gathers) + len(transposes) != len(users):
        raise ValueError(f"embedding used by unexpected ops {[u.op_type for u in users]}")
    lm_heads = [m for t in transposes for m in matmuls_of(t)]
    scheme = recipe.scheme(EMBED, shape[1])
    (_embedding_ort if recipe.target == "ort" else embedding_tensorrt)(
        graph, plan, gathers, lm_heads, shape, scheme, recipe)
    for transpose in transposes:
        graph.remove(transpose, safe=True)


def plan_weights(model: ir.Model, recipe: Recipe, plan: WeightPlan, constants: dict[str, np.ndarray]) -> None:
    """Rewrite parameter consumers for `recipe` and add every initializer to `plan` (or embed constants)."""
    graph = model.graph
    by_input: dict[ir.Value, Group] = {}  # projections grouped by their input
    other_dtype = np.float32 if recipe.target == "ort" else numpy_dtype(recipe.compute_dtype)
    for name, value in list(graph.initializers.items()):
        if name in constants:
            value.const_value = ir.tensor(np.asarray(constants[name]), name=name)
            continue
        if not name.startswith(PARAM_PREFIX):
            raise ValueError(f"initializer {name} is neither a parameter nor a known constant")
        source, shape = name[len(PARAM_PREFIX):], tuple(value.shape.numpy())
        del graph.initializers[name]
        if source == EMBED:
            _embedding(graph, plan, value, shape, recipe)
            continue
        users = [user for user, _ in value.uses()]
        if len(users) == 1 and users[0].op_type == "Transpose" and len(shape) == 2:
            transpose = users[0]
            by_input.setdefault(matmuls_of(transpose)[0].inputs[0], []).append((source, shape, transpose))
        else:
            stored = plan.add(graph, Stored(source, source, other_dtype, shape, lambda w: w))
            for user, index in list(value.uses()):
                user.replace_input_with(index, stored)
    for group in by_input.values():
        _linears(graph, plan, group, recipe)
