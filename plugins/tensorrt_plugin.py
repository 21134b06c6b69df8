"""`gemma3::HybridAttention` registered with TensorRT as an ahead-of-time Python plugin (QDP, TensorRT >= 10.9).

TensorRT's ONNX parser hands every node whose op_type is `HybridAttention` in domain `gemma3` to the plugin
registered as "gemma3::HybridAttention" (facts file 1.4: op_type = plugin name, domain = namespace). At engine
build time `aot_impl` returns our Triton kernel's PTX (`attention_aot.compile_kernel`), its launch parameters and
the int32 scalars as shape expressions; TensorRT embeds the PTX in the engine, which then runs without Python.

Everything TensorRT-specific is inside `register()`, imported lazily: this module imports without TensorRT.
What it computes (types, grid, scalars, tactics) comes from plain functions in `attention_launch.py`, the same
ones the cuda-python launcher of the GPU check calls. Not yet run on a GPU in this repository's CI (no TensorRT
can be installed there); assumptions TensorRT has not confirmed here:
  - ONNX INT attributes arrive as kINT32 fields and convert to the `int` annotations below (facts file 1.4);
  - the caches' outputs are `aliased()` to their inputs (PreviewFeature ALIASED_PLUGIN_IO_10_03, set by the
    builder), so the kernel's in-place row writes land in the runtime's buffers; TensorRT "may insert copies";
  - the workspace input is written by the kernel (tickets reset to 0) although TensorRT sees it as an input:
    a network input bound by the runtime is not copied when its type and format already match.
"""

from __future__ import annotations

from gemma3.plugins import attention_launch as launch
from gemma3.plugins import attention_schema as schema

PLUGIN_ID = f"{schema.ONNX_DOMAIN}::{schema.ONNX_OP_TYPE}"
TACTIC_IDS = tuple(range(1, len(launch.TACTICS) + 1))  # TensorRT's tactic numbers; 0 means "none chosen"
_TRT_NAMES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "float8e4m3fn": "FP8"}


def type_combinations() -> list[str]:
    """AutoTuneCombination type strings, one per supported (compute dtype, cache dtype) pair, positions in
    schema order: 8 inputs (PLUGIN_INPUTS), then 3 outputs."""
    combos = []
    for dtype in ("bfloat16", "float16", "float32"):
        for cache in (dtype, "float8e4m3fn"):
            t, c = _TRT_NAMES[dtype], _TRT_NAMES[cache]
            combos.append(", ".join([t, t, t, c, c, "INT32", "INT32", "FP32", t, c, c]))
    return combos


def tactic_for(tactic_id: int) -> launch.Tactic:
    """TensorRT's tactic number -> our tiling (0, TensorRT's "no autotune" default, is the prefill tiling)."""
    return launch.TACTICS[max(tactic_id, 1) - 1]


def launch_spec(attrs: launch.Attributes, new_tokens, batch, capacity, tactic: launch.Tactic, cdiv) -> dict:
    """Grid, block and scalar arguments as TensorRT wants them, from shape expressions (or ints)."""
    return {"grid": launch.grid(new_tokens, batch, attrs, tactic, cdiv=cdiv), "block": launch.block(tactic),
            "scalars": launch.scalar_args(new_tokens, capacity)}


_registered = False


def register() -> None:
    """Register the plugin with TensorRT's Python plugin registry (once per process)."""
    global _registered
    if _registered:
        return
    import numpy as np
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from gemma3.plugins.attention_aot import arch_for_capability, compile_kernel, current_capability

    from_trt = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.fp8: "float8e4m3fn"}

    @trtp.register(PLUGIN_ID)
    def _shapes(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, k_cache: trtp.TensorDesc,
                v_cache: trtp.TensorDesc, past_len: trtp.TensorDesc, group_ids: trtp.TensorDesc,
                workspace: trtp.TensorDesc, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                window: int, k_scale: float, v_scale: float
                ) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        return q.like(), k_cache.aliased(), v_cache.aliased()  # caches updated in place

    @trtp.autotune(PLUGIN_ID)
    def _tactics(q, k, v, k_cache, v_cache, past_len, group_ids, workspace, num_heads: int, num_kv_heads: int,
                 head_dim: int, scale: float, window: int, k_scale: float, v_scale: float, outputs
                 ) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(types, "LINEAR", list(TACTIC_IDS)) for types in type_combinations()]

    @trtp.aot_impl(PLUGIN_ID)
    def _kernel(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, k_cache: trtp.TensorDesc,
                v_cache: trtp.TensorDesc, past_len: trtp.TensorDesc, group_ids: trtp.TensorDesc,
                workspace: trtp.TensorDesc, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                window: int, k_scale: float, v_scale: float, outputs: tuple[trtp.TensorDesc], tactic: int):
        attrs = launch.Attributes(int(num_heads), int(num_kv_heads), int(head_dim), float(np.float32(scale)),
                                  int(window), float(np.float32(k_scale)), float(np.float32(v_scale)))
        chosen = tactic_for(tactic)
        major, minor = current_capability()
        kernel = compile_kernel(attrs, from_trt[q.dtype], from_trt[k_cache.dtype], chosen,
                                arch_for_capability(major, minor))
        spec = launch_spec(attrs, q.shape_expr[1], q.shape_expr[0], k_cache.shape_expr[2], chosen, trtp.cdiv)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = spec["grid"]
        params.block_x = spec["block"]
        params.shared_mem = kernel.shared
        scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in spec["scalars"]])
        return kernel.name.encode(), kernel.ptx.encode(), params, scalars

    _registered = True
