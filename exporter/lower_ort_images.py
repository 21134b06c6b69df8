"""Lower `gemma3::HybridAttention` for steps that hold image soft tokens (the ort target's image graph).

GroupQueryAttention's causal kernel cannot unmask a later key, yet the soft tokens of one image see each other
both ways. With `causal=0` and an `attention_bias` of 0 / -inf the op takes any mask, so this graph builds the
schema's mask from positions, window and group ids (plugins/attention_schema.py):
    visible(p, j) = (j <= p or same image group) and (window == 0 or p - j < window)
  - global layers: the text graph's shared full-length buffer, unchanged (row j = position j);
  - local layers: `causal=0` refuses `local_window_size`, so the windowed buffer is read as an ordinary past.
    Its resident rows are a function of the absolute length T alone (GroupQueryAttention's documented
    contract): rows [0, L(T)) hold positions T - L(T) .. T - 1, with G = C - W + 1 and
        L(T) = T if T <= C else T - G * ceil((T - C) / G).
    The step attends over those rows plus the new ones, then re-windows its present to the layout the windowed
    op would have left (the last L(T + S) positions at rows [0, L), capacity C), so text steps that follow run
    the text graph on the same buffers.
The runtime never splits one image across steps, so keys from earlier steps are never in a new token's group.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .lower_ort import MS_DOMAIN, attention_nodes, finish_lowering, gqa_attributes, replace_node, sequence_lengths

I64 = ir.DataType.INT64


class _Builder:
    """Appends nodes before `anchor`, each output named after its node."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, prefix: str):
        self.graph, self.anchor, self.prefix = graph, anchor, prefix

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", outputs: int = 1, **attrs):
        name = f"{self.prefix}.{op_type.lower()}{len(self.graph)}"
        node = ir.Node(domain, op_type, list(inputs), ir.convenience.convert_attributes(attrs), num_outputs=outputs,
                       name=name)
        for i, out in enumerate(node.outputs):
            out.name = f"{name}.{i}" if outputs > 1 else name
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0] if outputs == 1 else node.outputs

    def const(self, value, dtype=np.int64) -> ir.Value:
        return self.op("Constant", value=ir.tensor(np.asarray(value, dtype=dtype)))


def _mask_bias(b: _Builder, first_key: ir.Value, keys: ir.Value, past_len: ir.Value, new_tokens: ir.Value,
               groups: ir.Value, window: int) -> ir.Value:
    """attention_bias [1, 1, S, keys]: 0 where visible, -inf elsewhere. Column c holds position first_key + c;
    the last S columns are the new tokens (positions past_len ..), whose group ids are `groups` [S]."""
    zero, one = b.const(0), b.const(1)
    scalar = b.const([], np.int64)
    query_pos = b.op("Add", b.op("Range", zero, b.op("Reshape", new_tokens, scalar), one), past_len)  # [S]
    key_pos = b.op("Add", b.op("Range", zero, b.op("Reshape", keys, scalar), one), first_key)  # [K]
    old_keys = b.op("Sub", keys, new_tokens)  # [1]: columns before the new tokens
    key_groups = b.op("Pad", groups, b.op("Concat", old_keys, b.const([0]), axis=0), b.const(-1))  # [K]
    q = b.op("Unsqueeze", query_pos, b.const([1]))  # [S, 1]
    k = b.op("Unsqueeze", key_pos, b.const([0]))  # [1, K]
    q_group = b.op("Unsqueeze", groups, b.const([1]))
    same_image = b.op("And", b.op("Equal", q_group, b.op("Unsqueeze", key_groups, b.const([0]))),
                      b.op("GreaterOrEqual", q_group, zero))
    visible = b.op("Or", b.op("LessOrEqual", k, q), same_image)  # [S, K]
    if window > 0:
        visible = b.op("And", visible, b.op("Less", b.op("Sub", q, k), b.const(window)))
    bias = b.op("Where", visible, b.const(0.0, np.float32), b.const(-np.inf, np.float32))
    return b.op("Unsqueeze", bias, b.const([0, 1]))


def _resident(b: _Builder, total: ir.Value, capacity: ir.Value, window: int) -> ir.Value:
    """L(T) [1] int64 for absolute length `total` [1] and capacity [1] (see the module docstring)."""
    g = b.op("Sub", capacity, b.const([window - 1]))
    over = b.op("Sub", total, capacity)
    evicted = b.op("Mul", g, b.op("Div", b.op("Add", over, b.op("Sub", g, b.const([1]))), g))  # G * ceil(over / G)
    return b.op("Where", b.op("LessOrEqual", total, capacity), total, b.op("Sub", total, evicted))


def lower_bidirectional(model: ir.Model) -> int:
    """Replace every HybridAttention node with a `causal=0` GroupQueryAttention and its mask."""
    graph = model.graph
    nodes = attention_nodes(graph)
    if not nodes:
        return 0
    shared = _Builder(graph, nodes[0], "images")
    past_len = shared.op("Reshape", graph.inputs[1], shared.const([1]))  # [1]
    new_tokens = shared.op("Shape", graph.inputs[0], start=1, end=2)  # [1]
    total = shared.op("Add", past_len, new_tokens)
    seqlens, total_i32 = sequence_lengths(graph, nodes[0])
    group_ids = shared.op("Cast", nodes[0].inputs[6], to=I64)  # int32 by the op's contract; int64 masks here
    groups = shared.op("Reshape", group_ids, shared.const([-1]))  # [S]: one sequence
    global_bias = _mask_bias(shared, shared.const([0]), total, past_len, new_tokens, groups, 0)  # all global layers
    for index, node in enumerate(nodes):
        attrs = {a.name: a.value for a in node.attributes.values()}
        window = attrs["window"]
        q, k, v, k_cache, v_cache = node.inputs[:5]
        gqa_attrs = {**gqa_attributes(attrs, windowed=False), "causal": 0}
        b = _Builder(graph, node, f"layers.{index}.attn")
        if window == 0:
            gqa = b.op("GroupQueryAttention", q, k, v, k_cache, v_cache, seqlens, total_i32, None, None, None,
                       global_bias, domain=MS_DOMAIN, outputs=3, **gqa_attrs)
            outputs = list(gqa)
        else:
            capacity = b.op("Shape", k_cache, start=2, end=3)
            resident = _resident(b, past_len, capacity, window)  # rows of the past in the buffer
            keys = b.op("Add", resident, new_tokens)
            pasts = [b.op("Slice", cache, b.const([0]), resident, b.const([2])) for cache in (k_cache, v_cache)]
            seq = b.op("Cast", b.op("Sub", keys, b.const([1])), to=ir.DataType.INT32)
            tot = b.op("Cast", b.op("Reshape", keys, b.const([], np.int64)), to=ir.DataType.INT32)
            bias = _mask_bias(b, b.op("Sub", past_len, resident), keys, past_len, new_tokens, groups, window)
            out, k_all, v_all = b.op("GroupQueryAttention", q, k, v, *pasts, seq, tot, None, None, None, bias,
                                     domain=MS_DOMAIN, outputs=3, **gqa_attrs)
            # keep what the windowed op would keep: the last L(T + S) of the `keys` rows, padded to capacity
            kept = _resident(b, total, capacity, window)
            start = b.op("Sub", keys, kept)
            pads = b.op("Concat", b.const([0, 0, 0, 0, 0, 0]), b.op("Sub", capacity, kept), b.const([0]), axis=0)
            outputs = [out] + [b.op("Pad", b.op("Slice", present, start, keys, b.const([2])), pads)
                               for present in (k_all, v_all)]
        replace_node(graph, node, outputs)
    finish_lowering(model)
    return len(nodes)
