"""Lower `gemma3::HybridAttention` to standard ONNX ops (default domain) that compute the reference exactly.

TensorRT-target graphs keep one HybridAttention node per layer for the plugin; this pass is how such a graph is
evaluated on the CPU with ONNX Runtime, so it follows `gemma3.graphs.attention.hybrid_attention_reference`
step for step (contract and mask rule: plugins/attention_schema.py):
  - any B, S and capacity; past_len [B] int32 gives every sequence its own query / key positions;
  - keys = [cache rows as they were] + [new tokens]: row r of a global cache holds position r (empty when
    r >= past_len), row r of a local ring the newest position p < past_len with p % W == r;
  - GQA without copying keys: query heads are grouped per kv head ([B, KVH, G * S, D] against [B, KVH, K, D]),
    which is the reference's repeat_interleave (query head h reads kv head h // G);
  - scores * scale, masked to -inf, softmax in float32 (other dtypes: cast there and back, scaling after the
    cast, one rounding fewer than the reference's scale in q's dtype; identical in fp32);
  - caches are functional outputs written by ScatterElements at row = position (global) or position % W
    (local, only the last W new tokens: their rows are distinct, so no index repeats);
  - fp8 caches (k_scale / v_scale > 0): read through DequantizeLinear; written as QuantizeLinear(saturate) of
    the new rows, scattered as float32 values of fp8 numbers and cast back to fp8 (exact both ways).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from gemma3.plugins import attention_schema as schema

from .lower_ort import attention_nodes, replace_node

OPSET = 23  # every op below exists unchanged since opset 15 (CastLike); the traced graphs import 23
I64 = ir.DataType.INT64
INT64_MAX = np.iinfo(np.int64).max


class _Builder:
    """Inserts nodes before `anchor`, each named `{prefix}.{name}` (its output too)."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, prefix: str):
        self.graph, self.anchor, self.prefix = graph, anchor, prefix

    def op(self, name: str, op_type: str, *inputs: ir.Value, **attrs) -> ir.Value:
        full = f"{self.prefix}.{name}"
        node = ir.Node("", op_type, list(inputs), ir.convenience.convert_attributes(attrs), name=full)
        node.outputs[0].name = full
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]

    def const(self, name: str, value, dtype=np.int64) -> ir.Value:
        return self.op(name, "Constant", value=ir.tensor(np.asarray(value, dtype=dtype), name=f"{self.prefix}.{name}"))


def _key_positions(b: _Builder, past: ir.Value, capacity: ir.Value, window: int) -> ir.Value:
    """[B, C] int64: position held by each cache row before this step, -1 for an empty row. past [B, 1]."""
    zero, one, empty = b.const("zero", 0), b.const("one", 1), b.const("empty", -1)
    rows = b.op("rows", "Range", zero, b.op("capacity_scalar", "Squeeze", capacity), one)  # [C]
    if window == 0:
        return b.op("cached_pos", "Where", b.op("row_filled", "Less", rows, past), rows, empty)
    last = b.op("last_pos", "Sub", past, one)  # newest = last - (last - r) mod W: Mod(fmod=0) is Python's
    back = b.op("ring_back", "Mod", b.op("ring_offset", "Sub", last, rows), b.const("window", window))
    newest = b.op("ring_newest", "Sub", last, back)
    return b.op("cached_pos", "Where", b.op("row_filled", "GreaterOrEqual", newest, zero), newest, empty)


def _visibility(b: _Builder, q_pos: ir.Value, k_pos: ir.Value, groups: ir.Value, capacity: ir.Value,
                window: int) -> ir.Value:
    """[B, 1, S, K] bool, the schema's rule. q_pos [B, S], k_pos [B, K] int64; groups [B, S] int32."""
    # cached keys carry group -1: images never straddle steps
    pads = b.op("group_pads", "Concat", b.const("pad_before", [0]), capacity, b.const("pad_after", [0, 0]), axis=0)
    k_group = b.op("k_group", "Pad", groups, pads, b.const("no_group", -1, np.int32))  # [B, K]
    qp = b.op("qp", "Unsqueeze", q_pos, b.const("axis2", [2]))  # [B, S, 1]
    kp = b.op("kp", "Unsqueeze", k_pos, b.const("axis1", [1]))  # [B, 1, K]
    qg = b.op("qg", "Unsqueeze", groups, b.const("axis2_g", [2]))
    kg = b.op("kg", "Unsqueeze", k_group, b.const("axis1_g", [1]))
    image = b.op("is_image", "GreaterOrEqual", qg, b.const("zero_i32", 0, np.int32))
    same_image = b.op("same_image", "And", b.op("same_group", "Equal", qg, kg), image)
    causal = b.op("causal", "LessOrEqual", kp, qp)
    filled = b.op("key_filled", "GreaterOrEqual", kp, b.const("zero_pos", 0))
    visible = b.op("visible_any", "And", b.op("causal_or_image", "Or", causal, same_image), filled)
    if window > 0:
        in_window = b.op("in_window", "Less", b.op("distance", "Sub", qp, kp), b.const("window_len", window))
        visible = b.op("visible_window", "And", visible, in_window)
    return b.op("visible", "Unsqueeze", visible, b.const("axis1_h", [1]))


def _heads_first(b: _Builder, name: str, x: ir.Value, heads: int, dim: int) -> ir.Value:
    """[B, S, heads * D] -> [B, heads, S, D]."""
    split = b.op(f"{name}_split", "Reshape", x, b.const(f"{name}_shape", [0, 0, heads, dim]))
    return b.op(f"{name}_heads", "Transpose", split, perm=[0, 2, 1, 3])


def _write(b: _Builder, name: str, cache: ir.Value, new: ir.Value, rows: ir.Value) -> ir.Value:
    """cache [B, KVH, C, D] with new [B, KVH, kept, D] at rows [B, kept] (distinct per batch row)."""
    index = b.op(f"{name}_index", "Unsqueeze", rows, b.const(f"{name}_axes", [1, 3]))  # [B, 1, kept, 1]
    index = b.op(f"{name}_index_full", "Expand", index, b.op(f"{name}_new_shape", "Shape", new))
    return b.op(f"{name}_out", "ScatterElements", cache, index, new, axis=2)


def _read_cache(b: _Builder, name: str, cache: ir.Value, scale: float, like: ir.Value) -> ir.Value:
    """The cached rows as values of `like`'s dtype: fp8 rows times their scale (DequantizeLinear), else as is."""
    if scale <= 0:
        return cache
    values = b.op(f"{name}_dq", "DequantizeLinear", cache, b.const(f"{name}_dq_scale", scale, np.float32))
    return b.op(f"{name}_read", "CastLike", values, like)


def _fp8_rows(b: _Builder, name: str, cache: ir.Value, new: ir.Value, scale: float) -> tuple[ir.Value, ir.Value]:
    """fp8 cache and new rows as float32 holding fp8 values (exact), for a float scatter: the new rows quantized as
    QuantizeLinear(saturate) would store them."""
    fp8_values = b.op(f"{name}_values", "Cast", cache, to=ir.DataType.FLOAT)
    quantized = b.op(f"{name}_q", "QuantizeLinear", b.op(f"{name}_new_f32", "Cast", new, to=ir.DataType.FLOAT),
                     b.const(f"{name}_q_scale", scale, np.float32),
                     b.const(f"{name}_q_zero", 0.0, ml_dtypes.float8_e4m3fn), saturate=1)
    return fp8_values, b.op(f"{name}_new_values", "Cast", quantized, to=ir.DataType.FLOAT)


def _lower_node(b: _Builder, node: ir.Node) -> list[ir.Value]:
    attrs = {a.name: a.value for a in node.attributes.values()}
    heads, kv_heads, dim = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"]
    scale, window = attrs["scale"], attrs["window"]
    k_scale, v_scale = attrs.get("k_scale", 0.0), attrs.get("v_scale", 0.0)
    q, k, v, k_cache, v_cache, past_len, groups = node.inputs[:len(schema.INPUTS)]  # the workspace is the plugin's
    if heads % kv_heads:
        raise ValueError(f"{node.name}: {heads} query heads do not group over {kv_heads} kv heads")

    # positions: queries at past_len[b] + arange(S), keys = cached rows then the new tokens
    past = b.op("past", "Unsqueeze", b.op("past_i64", "Cast", past_len, to=I64), b.const("axis1_p", [1]))  # [B, 1]
    new_tokens = b.op("new_tokens", "Shape", q, start=1, end=2)  # [1]
    capacity = b.op("capacity", "Shape", k_cache, start=2, end=3)  # [1]
    steps = b.op("steps", "Range", b.const("zero_s", 0), b.op("new_tokens_scalar", "Squeeze", new_tokens),
                 b.const("one_s", 1))  # [S]
    q_pos = b.op("q_pos", "Add", past, steps)  # [B, S]
    k_pos = b.op("k_pos", "Concat", _key_positions(b, past, capacity, window), q_pos, axis=1)  # [B, C + S]
    visible = _visibility(b, q_pos, k_pos, groups, capacity, window)

    queries = b.op("q_grouped", "Reshape", _heads_first(b, "q", q, heads, dim),
                   b.const("q_grouped_shape", [0, kv_heads, -1, dim]))  # [B, KVH, G * S, D], head h = kvh * G + g
    new_k, new_v = _heads_first(b, "k", k, kv_heads, dim), _heads_first(b, "v", v, kv_heads, dim)
    keys = b.op("keys", "Concat", _read_cache(b, "k_cache", k_cache, k_scale, new_k), new_k, axis=2)  # [B, KVH, K, D]
    values = b.op("values", "Concat", _read_cache(b, "v_cache", v_cache, v_scale, new_v), new_v, axis=2)

    scores = b.op("scores_grouped", "MatMul", queries, b.op("keys_t", "Transpose", keys, perm=[0, 1, 3, 2]))
    scores = b.op("scores", "Reshape", scores, b.const("scores_shape", [0, heads, -1, 0]))  # [B, H, S, K]
    in_fp32 = q.dtype == ir.DataType.FLOAT
    if not in_fp32:
        scores = b.op("scores_f32", "Cast", scores, to=ir.DataType.FLOAT)
    scores = b.op("scores_scaled", "Mul", scores, b.const("scale", scale, np.float32))
    scores = b.op("scores_masked", "Where", visible, scores, b.const("masked", -np.inf, np.float32))
    probs = b.op("probs", "Softmax", scores, axis=-1)
    if not in_fp32:
        probs = b.op("probs_cast", "CastLike", probs, q)
    probs = b.op("probs_grouped", "Reshape", probs, b.const("probs_grouped_shape", [0, kv_heads, -1, 0]))
    out = b.op("out_grouped", "MatMul", probs, values)  # [B, KVH, G * S, D]
    out = b.op("out_heads", "Reshape", out, b.const("out_heads_shape", [0, heads, -1, dim]))  # [B, H, S, D]
    out = b.op("out_tokens", "Transpose", out, perm=[0, 2, 1, 3])
    out = b.op("out", "Reshape", out, b.const("out_shape", [0, 0, heads * dim]))

    rows = q_pos
    if window > 0:  # only the newest W new tokens survive in the ring
        last_w = [b.const("keep_start", [-window]), b.const("keep_end", [INT64_MAX])]
        new_k = b.op("k_kept", "Slice", new_k, *last_w, b.const("keep_axis", [2]))
        new_v = b.op("v_kept", "Slice", new_v, *last_w, b.const("keep_axis_v", [2]))
        kept_pos = b.op("kept_pos", "Slice", q_pos, *last_w, b.const("keep_axis_pos", [1]))
        rows = b.op("ring_rows", "Mod", kept_pos, b.const("ring_len", window))
    caches = []
    for name, cache, new, cache_scale in (("k_cache", k_cache, new_k, k_scale), ("v_cache", v_cache, new_v, v_scale)):
        if cache_scale > 0:  # scatter fp8 values in float32, then back to fp8 (both casts exact)
            cache, new = _fp8_rows(b, name, cache, new, cache_scale)
            written = _write(b, name, cache, new, rows)
            caches.append(b.op(f"{name}_fp8", "Cast", written, to=ir.DataType.FLOAT8E4M3FN))
        else:
            caches.append(_write(b, name, cache, new, rows))
    return [out, *caches]


def lower_to_reference(model: ir.Model) -> int:
    """Replace every HybridAttention node with standard ops (outputs keep their names); returns how many."""
    graph = model.graph
    nodes = attention_nodes(graph)
    if not nodes:
        return 0
    version = model.opset_imports.setdefault("", OPSET)
    if version < 15:
        raise ValueError(f"the reference lowering needs default-domain opset >= 15, the model imports {version}")
    for index, node in enumerate(nodes):  # traced graphs hold the layers in order
        replace_node(graph, node, _lower_node(_Builder(graph, node, f"layers.{index}.attn.ref"), node))
    graph.inputs[:] = [v for v in graph.inputs if v.name != schema.WORKSPACE_INPUT]  # only the plugin reads it
    model.opset_imports.pop(schema.ONNX_DOMAIN, None)
    return len(nodes)
