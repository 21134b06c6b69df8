"""The single definition of the hybrid attention op's contract, as plain data (no torch, no tensorrt).

Everything that implements or translates the op reads this: the torch custom op in `gemma3.graphs.attention`,
the ONNX translations in the exporter, the TensorRT plugin registration and the Triton kernels.

Semantics (one decoder layer, one step over S new tokens per sequence; sequence b has `past_len[b]` tokens
already in context, so its new tokens sit at positions past_len[b] .. past_len[b] + S - 1):
  - q, k, v arrive after QK-norm and RoPE (RoPE is applied by the caller, so the op knows nothing of bases).
  - Key j (absolute position) is visible to the query at position p when
        (j <= p  or  both are soft tokens of the same image)  and  (window == 0  or  p - j < window).
    This is transformers' Gemma 3 rule: the image groups are OR-ed onto causality, the window is AND-ed on top.
    With the real window sizes (512 / 1024) an image's 256 tokens always fit the window.
  - group_ids: per new token, -1 for text, otherwise the image it belongs to. Images never straddle a step,
    so groups only matter among the new tokens.
  - GQA: query head h reads kv head h // (num_heads / num_kv_heads).

Why the contract looks like this (TensorRT's AOT plugin ABI, ../shared/docs/tensorrt-facts.md section 1):
  - An AOT kernel receives tensors as pointers plus int32 scalars derived from shapes only; nothing per step can
    travel as a scalar. So per-step values are int32 device tensors: past_len [B] and group_ids [B, S].
  - ONNX INT / FLOAT attributes reach the plugin as kINT32 / kFLOAT32 fields: attributes are int or float only.
  - Caches are explicit inputs and outputs (the plugin may alias them in place; the reference is functional):
      global (window == 0): [B, kv_heads, capacity, head_dim], capacity = max context; position j in row j.
      local  (window  > 0): [B, kv_heads, window, head_dim], a ring of exactly W rows; position j in row j % W.
        A step with S > W writes only its last W tokens (the earlier ones are already out of every window).
  - S is the same for every sequence of a step: ragged prefill runs one sequence at a time (B = 1) on its slot
    of the batched cache; decode batches sequences at different positions (S = 1, past_len differs per row).
  - The cache dtype is the compute dtype (bf16 / fp16 / fp32, as q), or float8 E4M3FN (an option: the plugin
    owns the cache, so its storage is ours to define). With `k_scale` / `v_scale` > 0 a cached row holds
    saturate(round(x / scale)) in fp8 and is read back as fp8 * scale: one per-tensor scale per layer for keys
    and one for values, calibrated by the exporter (absmax / 448). The step's own new keys and values are used
    as computed (they are not re-read from the cache), only later steps see their fp8 rounding. Half the bytes of
    bf16 per cached token, which is what bounds decode at long contexts; TensorRT's own attention layers have
    no fp8 cache (facts file 3.3). 0 / 0: the cache is in the compute dtype. Softmax runs in fp32.
  - The plugin node of a TensorRT graph takes one more input, `workspace` (PLUGIN_INPUTS): float32 scratch owned
    by the runtime, zeroed once, shared by every layer. An AOT plugin launches one kernel and gets no scratch from
    TensorRT, yet split-K decode needs a reduction and a ring's in-place write must wait for every reader of the
    old rows; the kernel keeps per-(sequence, kv head) tickets and split partials there
    (`attention_kernel.py`). The reference and the CPU lowerings ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass

OP_NAMESPACE = "gemma3"
OP_NAME = "hybrid_attention"
# TensorRT's ONNX parser falls back to the plugin registry for unknown ops: op_type == plugin name.
ONNX_DOMAIN = "gemma3"
ONNX_OP_TYPE = "HybridAttention"
ONNX_OPSET_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: str  # symbolic, for docs and error messages
    dtype: str  # "float" (fp32 / fp16 / bf16, the model's compute dtype), "cache" (float, or fp8) or "int32"
    doc: str


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("q", "[B, S, num_heads * head_dim]", "float", "queries after QK-norm and RoPE"),
    TensorSpec("k", "[B, S, num_kv_heads * head_dim]", "float", "new keys after QK-norm and RoPE"),
    TensorSpec("v", "[B, S, num_kv_heads * head_dim]", "float", "new values"),
    TensorSpec("k_cache", "[B, num_kv_heads, C, head_dim]", "cache", "C = capacity (global) or window (local)"),
    TensorSpec("v_cache", "[B, num_kv_heads, C, head_dim]", "cache", "same layout as k_cache"),
    TensorSpec("past_len", "[B]", "int32", "tokens already in context before this step, per sequence"),
    TensorSpec("group_ids", "[B, S]", "int32", "-1 for text, image index for image soft tokens"),
)

# TensorRT graphs only: appended to INPUTS on every plugin node; sized by attention_launch.workspace_elements.
WORKSPACE = TensorSpec("workspace", "[N]", "float32", "kernel scratch: tickets and split-K partials, zeroed once")
WORKSPACE_INPUT = "attention_workspace"  # the graph input feeding every node's workspace
PLUGIN_INPUTS: tuple[TensorSpec, ...] = (*INPUTS, WORKSPACE)

OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("out", "[B, S, num_heads * head_dim]", "float", "attention output, heads concatenated"),
    TensorSpec("k_cache_out", "[B, num_kv_heads, C, head_dim]", "cache", "k_cache with the new keys written"),
    TensorSpec("v_cache_out", "[B, num_kv_heads, C, head_dim]", "cache", "v_cache with the new values written"),
)


@dataclass(frozen=True)
class AttributeSpec:
    name: str
    type: str  # "int" or "float" (ONNX INT / FLOAT; TensorRT plugin fields kINT32 / kFLOAT32)
    doc: str


ATTRIBUTES: tuple[AttributeSpec, ...] = (
    AttributeSpec("num_heads", "int", "query heads"),
    AttributeSpec("num_kv_heads", "int", "key/value heads (GQA: query head h reads kv head h // (heads / kv))"),
    AttributeSpec("head_dim", "int", "per-head width"),
    AttributeSpec("scale", "float", "score scale, query_pre_attn_scalar ** -0.5"),
    AttributeSpec("window", "int", "sliding window W (0 = global layer)"),
    AttributeSpec("k_scale", "float", "0: caches in the compute dtype; > 0: fp8 E4M3FN key cache, x = fp8 * k_scale"),
    AttributeSpec("v_scale", "float", "as k_scale, for the value cache (both 0 or both > 0)"),
)

FP8_MAX = 448.0  # largest finite float8 E4M3FN value: a cached fp8 row is saturate(x / scale) in [-448, 448]


def torch_schema() -> str:
    """The torch.library schema string built from the tables above (one definition of the signature)."""
    args = [f"Tensor {t.name}" for t in INPUTS] + [f"{a.type} {a.name}" for a in ATTRIBUTES]
    outs = ", ".join("Tensor" for _ in OUTPUTS)
    return f"({', '.join(args)}) -> ({outs})"
