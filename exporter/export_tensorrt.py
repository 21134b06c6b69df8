"""The tensorrt target's graph contract: what `export.py` writes differently for TensorRT engines.

- Every attention stays one `gemma3::HybridAttention` node (plugins/attention_schema.py), which TensorRT's ONNX
  parser hands to the plugin registered under that name (op_type = plugin name, namespace = the node's domain).
- The step is batched: input_ids [B, S], past_len [B] int32 (per sequence), caches [B, kv_heads, C, head_dim] as
  explicit inputs/outputs in the schema's layouts: global layers C = max context (row = position), local layers a
  ring of exactly W rows. Logits are float32 whatever the compute dtype.
- Multimodal sizes have ONE decoder graph: `image_features` [rows, hidden] is an input of every step (0 rows when
  the step holds no image); the plugin applies the bidirectional image groups itself, so no second graph (and no
  second engine holding the same weights) is needed.
- Compute dtype bf16 by default: Gemma 3's activations overflow fp16 (transformers #36822).
- Every plugin node takes the graph input `attention_workspace` as an 8th input (the schema's PLUGIN_INPUTS):
  the kernel's scratch, sized for --max-batch, which the runtime allocates zeroed once.
- `--kv-cache fp8`: caches typed float8 E4M3FN, each node carrying its layer's calibrated k_scale / v_scale
  (the schema's fp8 option): half the cache bytes, which is what bounds decode at long contexts.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import torch

from gemma3.graphs.config import Gemma3Config
from gemma3.plugins import attention_launch
from gemma3.plugins import attention_schema as schema

from .lower_ort import attention_nodes
from .plan import kv_cache_bytes
from .recipes import Recipe
from .trace import trace_decoder

ONNX_IR_VERSION = 10
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float8e4m3fn": torch.float8_e4m3fn}
TENSORRT_VERSION = ">=10.9 (AOT Python plugins, strongly typed networks; 11.x tested by nobody here: no TensorRT)"
MIN_SM = {"fp8": 89}  # fp8 E4M3 GEMMs need Ada / Hopper; everything else runs from Ampere (sm_80) on


def trace_tensorrt(config: Gemma3Config, recipe: Recipe, all_logits: bool) -> ir.Model:
    return trace_decoder(config, all_logits=all_logits, images=config.vision is not None,
                         dtype=TORCH_DTYPES[recipe.compute_dtype],
                         cache_dtype=TORCH_DTYPES[recipe.cache_dtype])


def set_kv_scales(model: ir.Model, scales: list[tuple[float, float]]) -> None:
    """fp8 KV caches: each layer's HybridAttention node gets its calibrated k_scale / v_scale (traced as 0)."""
    nodes = attention_nodes(model.graph)
    if len(nodes) != len(scales):
        raise AssertionError(f"{len(nodes)} attention nodes for {len(scales)} layers of KV scales")
    for node, (k_scale, v_scale) in zip(nodes, scales):
        node.attributes["k_scale"] = ir.AttrFloat32("k_scale", k_scale)
        node.attributes["v_scale"] = ir.AttrFloat32("v_scale", v_scale)


def workspace_elements(config: Gemma3Config, max_batch: int) -> int:
    return attention_launch.workspace_elements(max_batch, config.num_kv_heads, config.head_dim)


def add_workspace(model: ir.Model, elements: int) -> None:
    """The graph input `attention_workspace` [elements] float32, appended to every plugin node's inputs."""
    workspace = ir.Value(name=schema.WORKSPACE_INPUT, type=ir.TensorType(ir.DataType.FLOAT),
                         shape=ir.Shape([elements]))
    model.graph.inputs.append(workspace)
    for node in attention_nodes(model.graph):
        if len(node.inputs) != len(schema.INPUTS):
            raise AssertionError(f"{node.name} has {len(node.inputs)} inputs, not the schema's {len(schema.INPUTS)}")
        node.resize_inputs(len(schema.PLUGIN_INPUTS))
        node.replace_input_with(len(schema.INPUTS), workspace)


def save_tensorrt(model: ir.Model, path, workspace: int) -> None:
    """Add the plugin's workspace input, fold constants and drop dead nodes; no ONNX Runtime fusions (TensorRT
    fuses norms itself)."""
    from onnxscript import optimizer

    add_workspace(model, workspace)
    optimizer.optimize(model, onnx_shape_inference=False)
    proto = ir.to_proto(model)
    proto.ir_version = ONNX_IR_VERSION
    proto.producer_name = "gemma3-export"
    onnx.save(proto, path)


def io_tensorrt(config: Gemma3Config, file: str, logits: str, max_context: int, recipe: Recipe, max_batch: int,
                kv_scales: list[tuple[float, float]] = ()) -> dict:
    layers = []
    for i, kind in enumerate(config.layer_types):
        window = config.window(i)
        layers.append({
            "kind": kind, "window": window, "capacity": window or max_context,
            "layout": "ring: position j in row j % window" if window else "row = position",
            "past_key": f"past_key.{i}", "past_value": f"past_value.{i}",
            "present_key": f"present_key.{i}", "present_value": f"present_value.{i}",
            **({"k_scale": kv_scales[i][0], "v_scale": kv_scales[i][1]} if kv_scales else {}),
        })
    io = {"file": file, "logits": logits, "input_ids": "input_ids", "past_len": "past_len",
          "past_len_dtype": "int32", "past_len_shape": ["batch"], "logits_output": "logits",
          "logits_dtype": "float32", "cache_dtype": recipe.cache_dtype,
          "cache_shape": ["batch", config.num_kv_heads, "capacity", config.head_dim], "layers": layers,
          "workspace": {"input": schema.WORKSPACE_INPUT, "dtype": "float32",
                        "elements": workspace_elements(config, max_batch), "init": "zeros, once"}}
    if config.vision is not None:
        io["image_features"] = "image_features"  # [rows, hidden] in the compute dtype; 0 rows on text steps
    return io


def engine_section(config: Gemma3Config, recipe: Recipe, max_context: int, max_batch: int) -> dict:
    """What `gemma3-build` (the engine builder) needs to know, and the GPU the engine needs."""
    return {
        "tensorrt": TENSORRT_VERSION,
        "min_sm": max(MIN_SM.get(recipe.name, 80), 89 if recipe.kv_cache == "float8e4m3fn" else 80),
        "strongly_typed": True,
        "plugin": {"name": schema.ONNX_OP_TYPE, "namespace": schema.ONNX_DOMAIN, "nodes": config.num_layers},
        "max_batch": max_batch,
        "max_context": max_context,
        "profiles": {"prefill": {"batch": [1, max_batch], "new_tokens": [1, max_context]},
                     "decode": {"batch": [1, max_batch], "new_tokens": [1, 1]}},
        "kv_cache_bytes_at_max": kv_cache_bytes(config, max_context, max_batch, recipe.cache_dtype),
    }
