"""The hybrid attention reference per sequence, and its standard-ONNX lowering against it (ONNX Runtime, CPU).

Tolerance 1e-5 on the fp32 attention output: both sides compute the same float32 operations in the same order
(scores, scale, -inf mask, softmax, weighted sum); only the summation order inside the dot products and the
softmax sum differs (MLAS vs torch's BLAS, grouped-query matmul vs repeat_interleave): rounding of order 1e-6
on outputs of order 1 (observed up to 3e-6, at head_dim 256), so 1e-5 catches any semantic error. The caches
are pure data movement: compared bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from gemma3.exporter.lower_reference import lower_to_reference
from gemma3.graphs.attention import hybrid_attention_reference
from gemma3.plugins import attention_schema as schema

ATOL = 1e-5


def _groups(gen: torch.Generator, batch: int, new_tokens: int, images: bool) -> torch.Tensor:
    """[B, S] int32: -1 text; with `images`, each row gets one run of image tokens (group 0) at a random place."""
    groups = torch.full((batch, new_tokens), -1, dtype=torch.int32)
    if images and new_tokens > 1:
        for row in range(batch):
            length = int(torch.randint(2, new_tokens + 1, (), generator=gen))
            start = int(torch.randint(0, new_tokens - length + 1, (), generator=gen))
            groups[row, start:start + length] = 0
    return groups


def _inputs(heads: int, kv_heads: int, dim: int, capacity: int, past: list[int], new_tokens: int, images: bool,
            seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    batch = len(past)
    q = torch.randn(batch, new_tokens, heads * dim, generator=gen)
    k = torch.randn(batch, new_tokens, kv_heads * dim, generator=gen)
    v = torch.randn(batch, new_tokens, kv_heads * dim, generator=gen)
    # every row holds data, empty ones too: the mask alone must keep them out
    k_cache = torch.randn(batch, kv_heads, capacity, dim, generator=gen)
    v_cache = torch.randn(batch, kv_heads, capacity, dim, generator=gen)
    past_len = torch.tensor(past, dtype=torch.int32)
    return q, k, v, k_cache, v_cache, past_len, _groups(gen, batch, new_tokens, images)


def _reference(inputs, heads: int, kv_heads: int, dim: int, scale: float, window: int):
    with torch.no_grad():
        return hybrid_attention_reference(*inputs, heads, kv_heads, dim, scale, window)


# (a) ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window, capacity", [(0, 32), (4, 4)])
@pytest.mark.parametrize("new_tokens, images", [(1, False), (6, True)])
def test_batch_rows_equal_single_sequences(window, capacity, new_tokens, images):
    """B = 2 at different positions (one crossing the window) equals each sequence run alone with B = 1."""
    heads, kv_heads, dim, scale = 4, 2, 8, 0.3
    inputs = _inputs(heads, kv_heads, dim, capacity, [3, 9], new_tokens, images, seed=new_tokens + window)
    batched = _reference(inputs, heads, kv_heads, dim, scale, window)
    for row in range(2):
        single = _reference([t[row:row + 1] for t in inputs], heads, kv_heads, dim, scale, window)
        torch.testing.assert_close(batched[0][row:row + 1], single[0], atol=1e-6, rtol=0)
        for b_cache, s_cache in zip(batched[1:], single[1:]):
            assert torch.equal(b_cache[row:row + 1], s_cache)


def test_ring_keeps_the_last_window_positions():
    """A chunk longer than the window writes only its last W tokens, each at row position % W."""
    dim, window = 2, 4
    inputs = _inputs(1, 1, dim, window, [2, 5], 7, False, seed=0)
    _, k_out, _ = _reference(inputs, 1, 1, dim, 1.0, window)
    k_new = inputs[1]  # positions past .. past + 6; the last 4 survive
    for row, past in enumerate((2, 5)):
        for pos in range(past + 3, past + 7):
            assert torch.equal(k_out[row, 0, pos % window], k_new[row, pos - past])


# (b) ------------------------------------------------------------------------------------------------------------

def _session(heads: int, kv_heads: int, dim: int, scale: float, window: int,
             probes: tuple[str, ...] = (), dtype: int = TensorProto.FLOAT,
             kv_scales: tuple[float, float] = (0.0, 0.0)) -> ort.InferenceSession:
    """One HybridAttention node (B, S, C dynamic), lowered to standard ops.

    probes: inner int64 [B, KVH, kept, D] values (scatter indices) to add as outputs, by node name.
    kv_scales > 0: fp8 caches, fed and read as float32 holding fp8 values (tensorrt_on_cpu's IO emulation)."""
    fp8 = kv_scales[0] > 0
    widths = {"q": heads * dim, "k": kv_heads * dim, "v": kv_heads * dim}
    shapes = {**{name: ["B", "S", w] for name, w in widths.items()},
              "k_cache": ["B", kv_heads, "C", dim], "v_cache": ["B", kv_heads, "C", dim],
              "past_len": ["B"], "group_ids": ["B", "S"],
              "out": ["B", "S", heads * dim], "k_cache_out": ["B", kv_heads, "C", dim],
              "v_cache_out": ["B", kv_heads, "C", dim]}

    def info(spec: schema.TensorSpec):
        kind = {"float": dtype, "cache": TensorProto.FLOAT8E4M3FN if fp8 else dtype}.get(spec.dtype, TensorProto.INT32)
        return helper.make_tensor_value_info(spec.name, kind, shapes[spec.name])

    node = helper.make_node(schema.ONNX_OP_TYPE, [t.name for t in schema.INPUTS], [t.name for t in schema.OUTPUTS],
                            domain=schema.ONNX_DOMAIN, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim,
                            scale=scale, window=window, k_scale=kv_scales[0], v_scale=kv_scales[1])
    graph = helper.make_graph([node], "attention", [info(t) for t in schema.INPUTS], [info(t) for t in schema.OUTPUTS])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                    helper.make_opsetid(schema.ONNX_DOMAIN, 1)])
    proto.ir_version = 10  # helper writes IR 14, which onnxruntime refuses
    model = ir.serde.deserialize_model(proto)
    if fp8:
        from gemma3.exporter.tensorrt_on_cpu import emulate_in_float32

        emulate_in_float32(model)
    assert lower_to_reference(model) == 1
    values = {out.name: out for node in model.graph for out in node.outputs}
    for name in probes:  # int64 index tensors; shape inference has not run, so their type is given here
        probe = values[f"layers.0.attn.ref.{name}"]
        probe.type, probe.shape = ir.TensorType(ir.DataType.INT64), ir.Shape(["B", kv_heads, "kept", dim])
        model.graph.outputs.append(probe)
    proto = ir.serde.serialize_model(model)
    assert {n.domain for n in proto.graph.node} == {""}
    assert fp8 or all(n.name.startswith("layers.0.attn.ref.") for n in proto.graph.node)  # fp8: + IO casts
    onnx.checker.check_model(proto)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # shared 2-core machine
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


# (heads, kv_heads, head_dim, window, capacity): GQA ratios 1, 2, 4; head_dim 256 and 128; global and local
CONFIGS = [
    (2, 1, 16, 4, 4),
    (4, 1, 16, 0, 24),
    (4, 4, 256, 8, 8),
    (4, 2, 128, 0, 40),
    (8, 2, 128, 4, 4),
]

def _edge_cases(w: int) -> list[tuple[list[int], int, bool]]:
    """(past_len per sequence, new tokens, images) around the window w (the layer's, or 4 for global layers)."""
    return [
        ([w - 1], 1, False), ([w], 1, False), ([w + 1], 1, False),  # decode at the window boundary
        ([0], w + 2, False),  # prefill whose queries sit at w - 1, w, w + 1
        ([w + 2], 3, False),  # ring wrap-around
        ([2], 2 * w + 1, False),  # chunk longer than the window
        ([5], 6, True),  # an image among the new tokens
        ([1, w + 3], 3, True),  # B = 2 at different positions
        ([0, w], 1, False),  # batched decode across the boundary
    ]


def _random_cases(seed: int, window: int, capacity: int, count: int = 4) -> list[tuple[list[int], int, bool]]:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        new_tokens = int(rng.integers(1, 2 * max(window, 4) + 2))
        limit = capacity - new_tokens if window == 0 else 3 * window
        past = [int(p) for p in rng.integers(0, limit + 1, size=int(rng.integers(1, 3)))]
        cases.append((past, new_tokens, bool(rng.integers(0, 2))))
    return cases


@pytest.mark.parametrize("heads, kv_heads, dim, window, capacity", CONFIGS)
def test_lowering_matches_reference(heads, kv_heads, dim, window, capacity):
    scale = float(np.float32(dim**-0.5 * 1.7))  # an ONNX FLOAT attribute is float32: give torch the same
    session = _session(heads, kv_heads, dim, scale, window)
    worst = 0.0
    cases = _edge_cases(window or 4) + _random_cases(dim + window, window, capacity)
    for seed, (past, new_tokens, images) in enumerate(cases):
        inputs = _inputs(heads, kv_heads, dim, capacity, past, new_tokens, images, seed)
        expected = _reference(inputs, heads, kv_heads, dim, scale, window)
        got = session.run(None, {spec.name: t.numpy() for spec, t in zip(schema.INPUTS, inputs)})
        label = f"past {past}, S {new_tokens}, images {images}"
        diff = float(np.abs(got[0] - expected[0].numpy()).max())
        worst = max(worst, diff)
        assert diff < ATOL, f"{label}: output differs by {diff:.2e}"
        for name, g, e in zip(("k_cache", "v_cache"), got[1:], expected[1:]):
            assert np.array_equal(g, e.numpy()), f"{label}: {name} differs"
    print(f"H {heads} KVH {kv_heads} D {dim} W {window}: {len(cases)} cases, max abs diff {worst:.2e}")


def test_ring_scatter_rows_are_distinct():
    """A chunk longer than the window scatters W rows, not S: ONNX leaves repeated indices undefined (ONNX
    Runtime's last-write-wins would hide them from the comparison above)."""
    heads, kv_heads, dim, window = 2, 1, 4, 4
    session = _session(heads, kv_heads, dim, 0.5, window, probes=("k_cache_index_full",))
    inputs = _inputs(heads, kv_heads, dim, window, [2, 7], 2 * window + 3, False, seed=0)
    index = session.run(None, {spec.name: t.numpy() for spec, t in zip(schema.INPUTS, inputs)})[-1]
    assert index.shape == (2, kv_heads, window, dim)
    assert all(sorted(index[b, 0, :, 0]) == list(range(window)) for b in range(2))


def test_half_inputs_softmax_in_float32():
    """fp16 q/k/v/caches: scores cast to float32 for the softmax and back (the reference's dtype=float32).
    Tolerance: one fp16 rounding of outputs of order 1 (the reference scales before its cast, we after)."""
    heads, kv_heads, dim, window = 4, 2, 16, 4
    session = _session(heads, kv_heads, dim, 0.25, window, dtype=TensorProto.FLOAT16)
    inputs = _inputs(heads, kv_heads, dim, window, [3, 9], 6, True, seed=2)
    inputs = tuple(t.half() if t.is_floating_point() else t for t in inputs)
    expected = _reference(inputs, heads, kv_heads, dim, 0.25, window)
    got = session.run(None, {spec.name: t.numpy() for spec, t in zip(schema.INPUTS, inputs)})
    assert got[0].dtype == np.float16
    assert np.abs(got[0].astype(np.float32) - expected[0].float().numpy()).max() < 2e-3
    assert all(np.array_equal(g, e.numpy()) for g, e in zip(got[1:], expected[1:]))


class _Step(torch.nn.Module):
    """Calls the op as graphs/text.py does: int64 positions and groups converted to the op's int32."""

    def __init__(self, heads: int, kv_heads: int, dim: int, scale: float, window: int):
        super().__init__()
        self.attrs = (heads, kv_heads, dim, scale, window, 0.0, 0.0)

    def forward(self, q, k, v, k_cache, v_cache, past_len, group_ids):
        past = past_len.reshape(-1).expand(q.shape[0]).to(torch.int32)
        return torch.ops.gemma3.hybrid_attention(q, k, v, k_cache, v_cache, past, group_ids.to(torch.int32),
                                                 *self.attrs)


def test_traced_node_lowers_and_matches():
    """The node as the exporter traces it (trace.py's translation, dynamic B, S, C) lowers and runs."""
    import warnings

    from gemma3.exporter.trace import _hybrid_attention

    heads, kv_heads, dim, scale, window = 4, 2, 8, 0.25, 4
    example = _inputs(heads, kv_heads, dim, window, [0, 0], 3, False, seed=0)
    example = (*example[:5], example[5].long(), example[6].long())
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    per_token, cache = {0: batch, 1: tokens}, {0: batch, 2: torch.export.Dim("capacity")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's deprecation chatter
        program = torch.onnx.export(
            _Step(heads, kv_heads, dim, scale, window), example, dynamo=True, optimize=False, verbose=False,
            opset_version=23, custom_translation_table={torch.ops.gemma3.hybrid_attention.default: _hybrid_attention},
            dynamic_shapes=(per_token, per_token, per_token, cache, cache, {0: batch}, per_token),
        )
    model = program.model
    assert lower_to_reference(model) == 1
    proto = ir.to_proto(model)
    proto.ir_version = 10
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = _inputs(heads, kv_heads, dim, window, [3, 9], 6, True, seed=1)
    expected = _reference(inputs, heads, kv_heads, dim, scale, window)
    feeds = [t.numpy() for t in inputs[:5]] + [t.long().numpy() for t in inputs[5:]]
    got = session.run(None, dict(zip([i.name for i in session.get_inputs()], feeds)))
    assert np.abs(got[0] - expected[0].numpy()).max() < ATOL
    assert all(np.array_equal(g, e.numpy()) for g, e in zip(got[1:], expected[1:]))


@pytest.mark.parametrize("window, capacity", [(0, 24), (4, 4)])
def test_fp8_cache_lowering_matches_reference(window, capacity):
    """fp8 E4M3 caches (k_scale / v_scale > 0): rows read as fp8 * scale, new rows stored saturate(x / scale); the
    lowering equals the reference (caches bit for bit), across the window edge, ring wrap and an image; and the
    fp8 rounding is really there: the written cache differs from the same step's on a float cache."""
    heads, kv_heads, dim, scale, kv_scales = 4, 2, 16, 0.25, (0.011, 0.009)  # |x| up to ~4.5 -> 448 * scale
    session = _session(heads, kv_heads, dim, scale, window, kv_scales=kv_scales)
    for seed, (past, new_tokens, images) in enumerate(_edge_cases(window or 4)):
        inputs = list(_inputs(heads, kv_heads, dim, capacity, past, new_tokens, images, seed))
        for i, s in ((3, kv_scales[0]), (4, kv_scales[1])):  # caches as stored: fp8 codes
            inputs[i] = (inputs[i] / s).clamp(-448, 448).to(torch.float8_e4m3fn)
        with torch.no_grad():
            expected = hybrid_attention_reference(*inputs, heads, kv_heads, dim, scale, window, *kv_scales)
            plain = [t.float() * s for t, s in zip(inputs[3:5], kv_scales)]
            unrounded = hybrid_attention_reference(*inputs[:3], *plain, *inputs[5:], heads, kv_heads, dim, scale,
                                                   window)
        feeds = {spec.name: (t.float() if t.dtype == torch.float8_e4m3fn else t).numpy()
                 for spec, t in zip(schema.INPUTS, inputs)}
        got = session.run(None, feeds)
        assert np.abs(got[0] - expected[0].numpy()).max() < ATOL, f"past {past}, S {new_tokens}"
        for g, e in zip(got[1:], expected[1:]):
            assert e.dtype == torch.float8_e4m3fn and np.array_equal(g, e.float().numpy())
        # the new rows went into the cache rounded: the plain-cache step's cache differs where they were written
        assert not torch.equal(unrounded[1], expected[1].float() * kv_scales[0])
