"""Rewrite how the traced graph consumes its parameters, per precision, and plan their storage.

The trace gives `MatMul(x, Transpose(W))` for every nn.Linear and `Gather(E, ids)` + `MatMul(h, Transpose(E))` for
the tied embedding. Here:
  - fp32: W is stored pre-transposed (no Transpose at run time); the lm_head becomes Gemm(transB=1) on E itself,
    so the 262144-row table is stored once and ONNX Runtime never constant-folds a transposed copy.
  - quantized: MatMulNBits on a block-quantized W; the embedding's packed table is shared by
    GatherBlockQuantized (lookup) and MatMulNBits (lm_head): stored once.
Every other parameter (norm weights) is stored as is.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .lower_ort import MS_DOMAIN
from .quantize import Precision, packed_shapes
from .weights import Stored, WeightPlan

PARAM_PREFIX = "model."  # DecoderStep.model
EMBED = "text.embed_tokens.weight"


def _node(graph: ir.Graph, anchor: ir.Node, domain: str, op: str, inputs, name: str, **attrs) -> ir.Node:
    node = ir.Node(domain, op, inputs, ir.convenience.convert_attributes(attrs), name=name)
    node.outputs[0].name = name
    graph.insert_before(anchor, node)
    return node


def _const(graph: ir.Graph, anchor: ir.Node, name: str, values: list[int]) -> ir.Value:
    tensor = ir.tensor(np.array(values, dtype=np.int64), name=name)
    return _node(graph, anchor, "", "Constant", [], name, value=tensor).outputs[0]


def _replace(graph: ir.Graph, old: ir.Node, new_output: ir.Value) -> None:
    """Route old's single output to new_output (keeping its name and shape) and drop old."""
    out = old.outputs[0]
    name, shape, type_ = out.name, out.shape, out.type
    out.name = f"{name}.replaced"
    out.replace_all_uses_with(new_output, replace_graph_outputs=True)
    new_output.name, new_output.shape, new_output.type = name, shape, type_
    graph.remove(old, safe=True)


def _matmuls_of(transpose: ir.Node) -> list[ir.Node]:
    users = [user for user, _ in transpose.outputs[0].uses()]
    if not users or any(u.op_type != "MatMul" for u in users):
        raise ValueError(f"{transpose.name}: expected only MatMul consumers, got {[u.op_type for u in users]}")
    return users


def _quantized_entries(plan: WeightPlan, graph: ir.Graph, name: str, source, n: int, k: int, bits: int, block: int,
                       symmetric: bool = True) -> list[ir.Value]:
    """MatMulNBits' B, scales and (asymmetric only) packed zero points for a [n, k] weight."""
    packed_shape, scales_shape = packed_shapes(n, k, bits, block)

    def part(index: int):
        return lambda w: plan.quantized(source, bits, block, symmetric, w)[index]  # statistics are per source

    inputs = [plan.add(graph, Stored(f"{name}.q{bits}", source, np.uint8, packed_shape, part(0))),
              plan.add(graph, Stored(f"{name}.scales", source, np.float32, scales_shape, part(1)))]
    if not symmetric:
        zp_shape = (n, -(-scales_shape[1] * bits // 8))
        inputs.append(plan.add(graph, Stored(f"{name}.zero_points", source, np.uint8, zp_shape, part(2))))
    return inputs


def _fused_name(sources: list[str]) -> str:
    """text.layers.0.attn.{q,k,v}_proj.weight -> text.layers.0.attn.q_proj+k_proj+v_proj.weight"""
    if len(sources) == 1:
        return sources[0]
    prefix = sources[0].rsplit(".", 2)[0]
    return f"{prefix}.{'+'.join(s.rsplit('.', 2)[1] for s in sources)}.weight"


def _linears(graph: ir.Graph, plan: WeightPlan, group: list[tuple[str, tuple[int, int], ir.Node]],
             p: Precision) -> None:
    """Projections reading the same input (q/k/v, gate/up) become one matmul over their stacked rows + Split:
    half the kernel launches at decode, one read of the input."""
    sources = [source for source, _, _ in group]
    rows = [shape[0] for _, shape, _ in group]
    n, k = sum(rows), group[0][1][1]
    matmuls = [_matmuls_of(transpose)[0] for _, _, transpose in group]
    anchor, name = matmuls[0], _fused_name(sources)
    p = p.for_projection(name, k)
    if p.linear_bits is None:
        weight_t = plan.add(graph, Stored(name, tuple(sources), np.float32, (k, n), lambda w: w.T))
        fused = _node(graph, anchor, "", "MatMul", [anchor.inputs[0], weight_t], f"{name}.matmul")
    else:
        weights = _quantized_entries(plan, graph, name, tuple(sources), n, k, p.linear_bits, p.block_size, p.symmetric)
        fused = _node(graph, anchor, MS_DOMAIN, "MatMulNBits", [anchor.inputs[0], *weights], f"{name}.matmul",
                      K=k, N=n, bits=p.linear_bits, block_size=p.block_size, accuracy_level=p.accuracy_level)
    if len(group) == 1:
        _replace(graph, anchor, fused.outputs[0])
    else:
        split = ir.Node("", "Split", [fused.outputs[0], _const(graph, anchor, f"{name}.rows", rows)],
                        ir.convenience.convert_attributes({"axis": -1}), num_outputs=len(group), name=f"{name}.split")
        graph.insert_before(anchor, split)
        for matmul, part in zip(matmuls, split.outputs):
            _replace(graph, matmul, part)
    for _, _, transpose in group:
        graph.remove(transpose, safe=True)


def _embedding(graph: ir.Graph, plan: WeightPlan, value: ir.Value, shape, p: Precision) -> None:
    vocab, hidden = shape
    users = [user for user, _ in value.uses()]
    gathers = [u for u in users if u.op_type == "Gather"]
    transposes = [u for u in users if u.op_type == "Transpose"]
    if len(gathers) + len(transposes) != len(users):
        raise ValueError(f"embedding used by unexpected ops {[u.op_type for u in users]}")
    lm_heads = [m for t in transposes for m in _matmuls_of(t)]
    if p.embed_bits is None:
        table = plan.add(graph, Stored(EMBED, EMBED, np.float32, shape, lambda w: w))
        for gather in gathers:
            gather.replace_input_with(0, table)
        for matmul in lm_heads:  # (B, S, H) -> (B*S, H) @ E^T -> (B, S, V)
            flat = _node(graph, matmul, "", "Reshape", [matmul.inputs[0], _const(graph, matmul, "lm_head.flat_shape",
                         [-1, hidden])], "lm_head.flatten").outputs[0]
            gemm = _node(graph, matmul, "", "Gemm", [flat, table], "lm_head.gemm", transB=1).outputs[0]
            batch_shape = _const(graph, matmul, "lm_head.out_shape", [1, -1, vocab])
            _replace(graph, matmul, _node(graph, matmul, "", "Reshape", [gemm, batch_shape], "lm_head").outputs[0])
    else:
        bits, block = p.embed_bits, p.embed_block(hidden)
        symmetric = p.symmetric or bits == 8  # 8-bit is symmetric only (see quantize.py)
        packed, scales, *zero_points = _quantized_entries(plan, graph, EMBED, EMBED, vocab, hidden, bits, block,
                                                          symmetric)
        # GatherBlockQuantized reads the same bytes as a 2-D [V, packed row] table (quantize_axis 1); its scales
        # and zero points have MatMulNBits' layout already, so nothing is stored twice.
        packed_2d = plan.add(graph, Stored(f"{EMBED}.rows", EMBED, np.uint8, (vocab, int(np.prod(
            packed.shape.numpy()[1:]))), lambda w: w, alias_of=packed.name))
        for gather in gathers:
            looked_up = _node(graph, gather, MS_DOMAIN, "GatherBlockQuantized",
                              [packed_2d, gather.inputs[1], scales, *zero_points], "embed.lookup",
                              bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
            _replace(graph, gather, looked_up.outputs[0])
        for matmul in lm_heads:
            new = _node(graph, matmul, MS_DOMAIN, "MatMulNBits", [matmul.inputs[0], packed, scales, *zero_points],
                        "lm_head", K=hidden, N=vocab, bits=bits, block_size=block, accuracy_level=p.accuracy_level)
            _replace(graph, matmul, new.outputs[0])
    for transpose in transposes:
        graph.remove(transpose, safe=True)


def plan_weights(model: ir.Model, precision: Precision, plan: WeightPlan, constants: dict[str, np.ndarray]) -> None:
    """Rewrite parameter consumers for `precision` and add every initializer to `plan` (or embed constants)."""
    graph = model.graph
    by_input: dict[ir.Value, list[tuple[str, tuple[int, int], ir.Node]]] = {}  # projections grouped by their input
    for name, value in list(graph.initializers.items()):
        if name in constants:
            value.const_value = ir.tensor(np.asarray(constants[name]), name=name)
            continue
        if not name.startswith(PARAM_PREFIX):
            raise ValueError(f"initializer {name} is neither a parameter nor a known constant")
        source, shape = name[len(PARAM_PREFIX):], tuple(value.shape.numpy())
        del graph.initializers[name]
        if source == EMBED:
            _embedding(graph, plan, value, shape, precision)
            continue
        users = [user for user, _ in value.uses()]
        if len(users) == 1 and users[0].op_type == "Transpose" and len(shape) == 2:
            transpose = users[0]
            by_input.setdefault(_matmuls_of(transpose)[0].inputs[0], []).append((source, shape, transpose))
        else:
            stored = plan.add(graph, Stored(source, source, np.float32, shape, lambda w: w))
            for user, index in list(value.uses()):
                user.replace_input_with(index, stored)
    for group in by_input.values():
        _linears(graph, plan, group, precision)
