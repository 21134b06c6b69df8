"""Small onnx_ir editing helpers shared by the weight passes (ORT and TensorRT forms)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def add_node(graph: ir.Graph, anchor: ir.Node, domain: str, op: str, inputs, name: str, **attrs) -> ir.Node:
    """Insert `op` before `anchor`; its first output takes the node's name (graphs diff and dump readably)."""
    node = ir.Node(domain, op, inputs, ir.convenience.convert_attributes(attrs), name=name)
    node.outputs[0].name = name
    graph.insert_before(anchor, node)
    return node


def add_const(graph: ir.Graph, anchor: ir.Node, name: str, values, dtype=np.int64) -> ir.Value:
    """A Constant node (small values that belong in the graph, not in the weights file)."""
    tensor = ir.tensor(np.asarray(values, dtype=dtype), name=name)
    return add_node(graph, anchor, "", "Constant", [], name, value=tensor).outputs[0]


def replace_output(graph: ir.Graph, old: ir.Node, new_output: ir.Value) -> None:
    """Route old's single output to new_output (keeping its name and shape) and drop old."""
    out = old.outputs[0]
    name, shape, type_ = out.name, out.shape, out.type
    out.name = f"{name}.replaced"
    out.replace_all_uses_with(new_output, replace_graph_outputs=True)
    new_output.name, new_output.shape, new_output.type = name, shape, type_
    graph.remove(old, safe=True)


def matmuls_of(transpose: ir.Node) -> list[ir.Node]:
    users = [user for user, _ in transpose.outputs[0].uses()]
    if not users or any(u.op_type != "MatMul" for u in users):
        raise ValueError(f"{transpose.name}: expected only MatMul consumers, got {[u.op_type for u in users]}")
    return users
