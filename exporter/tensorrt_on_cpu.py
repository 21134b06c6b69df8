"""Run a tensorrt-target graph on this CPU with ONNX Runtime: how its quality is measured without a GPU.

The graph is the exported file itself (same initializers in the same data file, same Q/DQ nodes), with two
changes made in memory:
  1. every op computes in float32 and every tensor the graph types as bf16 / fp16 is rounded to that type where
     the op writes it (Cast to the 16-bit type and back): ONNX Runtime's CPU kernels have no bf16 matmuls, and
     this keeps the graph's storage rounding exactly while computing in fp32 (TensorRT accumulates in fp32 too);
  2. every `gemma3::HybridAttention` node becomes standard ONNX ops computing the reference op in float32
     (`lower_reference.py`): the plugin's contract, fp32 inside, the compute dtype at its inputs and outputs.
fp8 QuantizeLinear / DequantizeLinear and blocked int4 DequantizeLinear run as they are (ONNX Runtime's CPU
kernels); the int4 DequantizeLinear + MatMul fusion into MatMulNBits is switched off
(`session.qdq_matmulnbits_accuracy_level` 0): its default int8 activations are not what TensorRT computes.
Graph inputs and outputs in 16-bit types (and fp8 KV caches) become float32 (the values fed are already
representable).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from gemma3.plugins import attention_schema as schema

from .lower_reference import lower_to_reference

NARROW = (ir.DataType.BFLOAT16, ir.DataType.FLOAT16)
F32 = ir.DataType.FLOAT


def _cast(graph: ir.Graph, value: ir.Value, to: ir.DataType, name: str, before: ir.Node | None = None,
          after: ir.Node | None = None) -> ir.Value:
    node = ir.Node("", "Cast", [value], [ir.AttrInt64("to", to)], name=name)
    node.outputs[0].name = name
    node.outputs[0].type = ir.TensorType(to)
    node.outputs[0].shape = value.shape
    if before is not None:
        graph.insert_before(before, node)
    else:
        graph.insert_after(after, node)
    return node.outputs[0]


def _is_narrow(value: ir.Value | None, types=NARROW) -> bool:
    return value is not None and value.type is not None and value.dtype in types


IO_NARROW = (*NARROW, ir.DataType.FLOAT8E4M3FN)  # graph inputs / outputs fed and read as float32 (fp8 KV caches)


def emulate_in_float32(model: ir.Model) -> int:
    """Change 1 of the module docstring; returns how many ops were wrapped."""
    graph = model.graph
    first = next(iter(graph))
    for value in list(graph.inputs):  # 16-bit and fp8 inputs -> float32 inputs, rounded on entry
        if _is_narrow(value, IO_NARROW):
            narrow, users = value.dtype, list(value.uses())
            value.type = ir.TensorType(F32)
            rounded = _cast(graph, value, narrow, f"{value.name}.rounded", before=first)
            for user, i in users:
                user.replace_input_with(i, rounded)
    output_names: dict[ir.Value, str] = {}
    wrapped = 0
    for node in list(graph):
        if node.op_type in ("Cast", "Constant") and node.domain == "":
            continue
        narrow_inputs = [(i, v) for i, v in enumerate(node.inputs) if _is_narrow(v)]
        narrow_outputs = [v for v in node.outputs if _is_narrow(v)]
        if not narrow_inputs and not narrow_outputs:
            continue
        wrapped += 1
        for i, value in narrow_inputs:
            node.replace_input_with(i, _cast(graph, value, F32, f"{node.name}.in{i}.f32", before=node))
        for out in narrow_outputs:  # the op now writes float32; its users read the value rounded to the old type
            narrow, users, name = out.dtype, list(out.uses()), out.name
            out.type, out.name = ir.TensorType(F32), f"{name}.f32"
            rounded = _cast(graph, out, narrow, f"{name}.rounded", after=node)
            for user, i in users:
                user.replace_input_with(i, rounded)
            if out in graph.outputs:
                graph.outputs[graph.outputs.index(out)] = rounded
                output_names[rounded] = name
    for position, value in enumerate(list(graph.outputs)):  # 16-bit / fp8 outputs -> float32 outputs, same names
        if _is_narrow(value, IO_NARROW):
            name = output_names.get(value, value.name)
            if value.name == name:
                value.name = f"{name}.narrow"
            graph.outputs[position] = _cast(graph, value, F32, name, after=value.producer())
    return wrapped


def cpu_model(folder: Path, graph_file: str, attention: bool = True) -> ir.Model:
    """The tensorrt-target graph `folder/graph_file`, changed as the module docstring says, external data kept.
    `attention`: the graph must hold HybridAttention nodes (the decoders; vision.onnx has none)."""
    proto = onnx.load(folder / graph_file, load_external_data=False)
    model = ir.serde.deserialize_model(proto)
    emulate_in_float32(model)
    if lower_to_reference(model) == 0 and attention:
        raise ValueError(f"{folder / graph_file}: no {schema.ONNX_DOMAIN}::{schema.ONNX_OP_TYPE} nodes; "
                         "is this a tensorrt-target export?")
    return model


def cpu_session(folder: str | os.PathLike, graph: str = "decoder", threads: int = 2) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of the manifest's `graph` (decoder / eval_decoder / vision) of a tensorrt-target
    folder."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("target") != "tensorrt":
        raise ValueError(f"{folder}: target is {manifest.get('target')!r}, not tensorrt")
    model = cpu_model(folder, manifest[graph]["file"], attention=graph != "vision")
    proto = ir.to_proto(model)
    proto.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    # the graph goes in as bytes; its external data stays where the export wrote it
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder.resolve()))
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


class CpuSteps:
    """Decoder steps of a tensorrt-target export on the CPU, in its own contract: batch B, past_len [B] int32,
    caches [B, kv_heads, C, head_dim] (global C = `global_capacity`, local a ring of W rows), float32 here."""

    def __init__(self, folder: str | os.PathLike, graph: str = "decoder", batch: int = 1,
                 global_capacity: int | None = None, threads: int = 2):
        folder = Path(folder)
        self.manifest = json.loads((folder / "manifest.json").read_text())
        self.io = self.manifest[graph]
        self.session = cpu_session(folder, graph, threads)
        self.outputs = [o.name for o in self.session.get_outputs()]
        model = self.manifest["model"]
        self.cache = {}
        for layer in self.io["layers"]:
            rows = layer["window"] or global_capacity or layer["capacity"]
            for kind in ("key", "value"):
                self.cache[layer[f"past_{kind}"]] = np.zeros(
                    (batch, model["num_kv_heads"], rows, model["head_dim"]), np.float32)
        self.past = np.zeros(batch, np.int32)
        self.images = "image_features" in self.io
        self.hidden = model["hidden_size"]

    def __call__(self, ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
        """ids [B, S] after the tokens fed so far -> logits (float32) as the graph gives them."""
        feeds = {"input_ids": ids.astype(np.int64), "past_len": self.past, **self.cache}
        if self.images:
            rows = np.zeros((0, self.hidden), np.float32) if image_features is None else image_features
            feeds["image_features"] = rows.astype(np.float32)
        result = dict(zip(self.outputs, self.session.run(self.outputs, feeds)))
        for layer in self.io["layers"]:
            for kind in ("key", "value"):
                self.cache[layer[f"past_{kind}"]] = result[layer[f"present_{kind}"]]
        self.past = self.past + np.int32(ids.shape[1])
        return result["logits"]
