"""Lower `gemma3::HybridAttention` to ONNX Runtime's `com.microsoft.GroupQueryAttention` (the ort target).

Cache layouts on this target (verified on ONNX Runtime 1.31, CPU):
  - global layers: a shared past/present buffer [B, kv_heads, C, head_dim], row j = position j; present has the
    shape of past, so the runtime binds both to one buffer and the op writes the new rows in place.
  - local layers: `local_window_size=W` with `sliding_window_cache=1`: a buffer of capacity C >= W that the op
    compacts itself (rows [0, L) hold the L most recent positions; slack above W amortises the compaction).
GroupQueryAttention's window counts W keys including the query itself, as Gemma's `p - W < j <= p`.
Batch: past_len [B] gives every sequence its own length (seqlens_k [B]); each sequence's rows, its local buffer's
compaction included, are exactly what it gets stepped alone (measured on ONNX Runtime 1.32, tests/test_batching.py).
QK-norm stays in the graph (the CPU kernel rejects fused norm weights); RoPE is applied before the op.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from gemma3.plugins import attention_schema as schema

MS_DOMAIN = "com.microsoft"


def _const(graph: ir.Graph, anchor: ir.Node, name: str, value: np.ndarray) -> ir.Value:
    node = ir.Node("", "Constant", [], [ir.AttrTensor("value", ir.tensor(value, name=name))], name=name)
    node.outputs[0].name = name
    graph.insert_before(anchor, node)
    return node.outputs[0]


def _op(graph: ir.Graph, anchor: ir.Node, op_type: str, inputs, name: str, **attrs) -> ir.Value:
    node = ir.Node("", op_type, inputs, ir.convenience.convert_attributes(attrs), name=name)
    node.outputs[0].name = name
    graph.insert_before(anchor, node)
    return node.outputs[0]


def sequence_lengths(graph: ir.Graph, anchor: ir.Node) -> tuple[ir.Value, ir.Value]:
    """seqlens_k [B] int32 = past_len + S - 1 per sequence, and total_sequence_length [] int32 = the longest
    sequence's past_len + S (the op sizes its present buffers by it)."""
    input_ids, past_len = graph.inputs[0], graph.inputs[1]
    new_tokens = _op(graph, anchor, "Shape", [input_ids], "attn.new_tokens", start=1, end=2)  # [1] int64
    total = _op(graph, anchor, "Add", [past_len, new_tokens], "attn.total_len")  # [B]
    one = _const(graph, anchor, "attn.one", np.array([1], dtype=np.int64))
    seqlens = _op(graph, anchor, "Cast", [_op(graph, anchor, "Sub", [total, one], "attn.last_pos")],
                  "attn.seqlens_k", to=ir.DataType.INT32)
    longest = _op(graph, anchor, "ReduceMax", [total], "attn.longest", keepdims=0)  # []
    return seqlens, _op(graph, anchor, "Cast", [longest], "attn.total_sequence_length", to=ir.DataType.INT32)


def replace_node(graph: ir.Graph, node: ir.Node, outputs: list[ir.Value]) -> None:
    """Route a HybridAttention node's outputs to `outputs` (keeping their names, shapes, types) and drop it."""
    for old, new in zip(node.outputs, outputs):
        name, shape, type_ = old.name, old.shape, old.type
        old.name = f"{name}.replaced"
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        new.name, new.shape, new.type = name, shape, type_
    graph.remove(node, safe=True)


def finish_lowering(model: ir.Model) -> None:
    """Once every HybridAttention is gone: import the contrib domain, drop ours."""
    model.opset_imports[MS_DOMAIN] = 1
    model.opset_imports.pop(schema.ONNX_DOMAIN, None)


def attention_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The graph's `gemma3::HybridAttention` nodes, in graph (layer) order."""
    return [n for n in graph if n.domain == schema.ONNX_DOMAIN and n.op_type == schema.ONNX_OP_TYPE]


def gqa_attributes(attrs: dict, windowed: bool = True) -> dict:
    """GroupQueryAttention's attributes for a HybridAttention node's; local layers windowed unless told not."""
    out = {"num_heads": attrs["num_heads"], "kv_num_heads": attrs["num_kv_heads"], "scale": attrs["scale"]}
    if windowed and attrs["window"] > 0:
        out.update(local_window_size=attrs["window"], sliding_window_cache=1)
    return out


def lower_to_group_query_attention(model: ir.Model) -> int:
    """Replace every HybridAttention node in place; returns how many were lowered."""
    graph = model.graph
    nodes = attention_nodes(graph)
    if not nodes:
        return 0
    seqlens, total = sequence_lengths(graph, nodes[0])
    for index, node in enumerate(nodes):
        attrs = {a.name: a.value for a in node.attributes.values()}
        q, k, v, k_cache, v_cache = node.inputs[:5]
        gqa = ir.Node(
            MS_DOMAIN, "GroupQueryAttention", [q, k, v, k_cache, v_cache, seqlens, total],
            ir.convenience.convert_attributes(gqa_attributes(attrs)), num_outputs=3, name=f"layers.{index}.attn.gqa",
        )
        graph.insert_before(node, gqa)
        replace_node(graph, node, list(gqa.outputs))
    finish_lowering(model)
    return len(nodes)
