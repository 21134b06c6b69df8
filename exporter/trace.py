"""Trace the decoder step to ONNX without materialising weights.

The model is built on the meta device (parameters have shapes, no data), traced with
`torch.onnx.export(dynamo=True)`, and the hybrid attention op becomes one target-neutral node
`gemma3::HybridAttention` per layer. Later passes lower that node per target and fill the weights by streaming
them from the checkpoint, so tracing costs the same for 270m and 27b.
"""

from __future__ import annotations

import logging
import warnings

import onnx_ir as ir
import onnxscript
import torch
from onnxscript import FLOAT

from gemma3.graphs.config import Gemma3Config
from gemma3.graphs.model import Gemma3
from gemma3.graphs.rope import RotaryTables
from gemma3.plugins import attention_schema as schema

log = logging.getLogger(__name__)
logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" and similar

_gemma3 = onnxscript.values.Opset(schema.ONNX_DOMAIN, schema.ONNX_OPSET_VERSION)


# The signature mirrors plugins/attention_schema.py (torch.library needs it spelled out here as Python).
@onnxscript.script()
def _hybrid_attention(q, k, v, k_cache, v_cache, past_len, group_ids, num_heads: int, num_kv_heads: int,
                      head_dim: int, scale: float, window: int, k_scale: float,
                      v_scale: float) -> tuple[FLOAT, FLOAT, FLOAT]:
    out, k_out, v_out = _gemma3.HybridAttention(
        q, k, v, k_cache, v_cache, past_len, group_ids,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scale=scale, window=window,
        k_scale=k_scale, v_scale=v_scale,
    )
    return out, k_out, v_out


class DecoderStep(torch.nn.Module):
    """The exported decoder graph: one step over S new tokens on explicit per-layer caches."""

    def __init__(self, model: Gemma3, all_logits: bool = False):
        super().__init__()
        self.model = model
        self.all_logits = all_logits

    def forward(self, input_ids: torch.Tensor, past_len: torch.Tensor, cache: list[torch.Tensor],
                image_features: torch.Tensor | None = None, logits_count: torch.Tensor | None = None):
        pairs = [(cache[2 * i], cache[2 * i + 1]) for i in range(len(cache) // 2)]
        logits, new_cache = self.model.step(input_ids, past_len, pairs, image_features,
                                            last_only=not self.all_logits, logits_count=logits_count)
        return (logits.float(), *[t for pair in new_cache for t in pair])  # fp32 logits whatever the compute dtype


def constants(config: Gemma3Config) -> dict[str, torch.Tensor]:
    """Values of the graph's non-weight initializers (buffers), under their ONNX names."""
    tables = RotaryTables(config)
    return {f"model.text.rope.{name}": buffer for name, buffer in tables.named_buffers()}


def trace_decoder(config: Gemma3Config, all_logits: bool = False, images: bool = False,
                  dtype: torch.dtype = torch.float32,
                  cache_dtype: torch.dtype | None = None, logits_count: bool = False,
                  past_len_dtype: torch.dtype = torch.int32) -> ir.Model:
    """The decoder step as an ONNX IR model with `gemma3::HybridAttention` nodes; parameters have no data.

    images: the step also takes `image_features` [rows, hidden], the rows of the soft tokens in this step in
    order (multimodal configs; the runtime uses this graph only for chunks that hold an image).
    dtype: the compute dtype (weights, activations, caches; logits are always float32).
    The batch is dynamic: input_ids [B, S], `past_len` [B] per sequence (`past_len_dtype`: int32 for tensorrt,
    int64 for ort), caches [B, ...]. (ort exports older than batched decoding had one sequence and a 0-d past_len;
    the runtime still reads them.)
    cache_dtype: the caches' type when it is not the compute dtype (tensorrt fp8 caches; their scales are set on
    the attention nodes after calibration, `export_tensorrt.set_kv_scales`).
    logits_count: the step also takes `logits_count` (0-d int64 n, 1 <= n <= S, the last input) and returns the
    logits of its last n positions: one graph serves generation (n = 1) and speculative verification (n > 1).
    """
    if logits_count and (all_logits or images):
        raise ValueError("logits_count applies to the text decoder with last-position logits")
    if images and config.vision is None:
        raise ValueError(f"the {config.name} model is text-only; it has no image graph")
    layers = config.num_layers
    batch = 2  # an example of 2 keeps the batch axis symbolic
    with torch.device("meta"):  # everything traced on meta: no weight is ever allocated
        model = Gemma3(config)
        if dtype != torch.float32:
            model.to(dtype)
            model.text.rope = RotaryTables(config)  # RoPE stays float32 (as transformers'); values: constants()
        step = DecoderStep(model, all_logits).eval()
        cache = []
        for i in range(layers):
            capacity = config.window(i) or 16  # any example size: the capacity axis is dynamic
            shape = (batch, config.num_kv_heads, capacity, config.head_dim)
            cache += [torch.zeros(shape, dtype=cache_dtype or dtype), torch.zeros(shape, dtype=cache_dtype or dtype)]
        past_len = torch.zeros((batch,), dtype=past_len_dtype)
        cache_dims = [{0: "batch", 2: f"capacity_{i // 2}"} for i in range(2 * layers)]
        dynamic_shapes = ({0: "batch", 1: "new_tokens"}, {0: "batch"}, cache_dims)
        args = (torch.zeros((batch, 4), dtype=torch.int64), past_len, cache)
        if images:
            args += (torch.zeros((2, config.hidden_size), dtype=dtype),)
            dynamic_shapes += ({0: "image_rows"},)
        elif logits_count:
            args += (None, torch.tensor(2, dtype=torch.int64))
            dynamic_shapes += (None, None)
        with warnings.catch_warnings():  # torch.export's deprecation chatter says nothing about our model
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                step, args, dynamic_shapes=dynamic_shapes, dynamo=True, optimize=False, verbose=False,
                opset_version=23,
                custom_translation_table={torch.ops.gemma3.hybrid_attention.default: _hybrid_attention},
            )
    onnx_model = program.model
    _name_io(onnx_model.graph, layers, images, logits_count)
    return onnx_model


def _name_io(graph: ir.Graph, layers: int, images: bool, logits_count: bool = False) -> None:
    """Stable, documented IO names: input_ids, past_len, past_key.{i}, past_value.{i}[, image_features]
    [, logits_count] -> logits, present_key.{i}, present_value.{i}."""
    graph.inputs[0].name, graph.inputs[1].name = "input_ids", "past_len"
    if images:
        graph.inputs[2 + 2 * layers].name = "image_features"
    if logits_count:
        graph.inputs[2 + 2 * layers].name = "logits_count"
    graph.outputs[0].name = "logits"
    for i in range(layers):
        graph.inputs[2 + 2 * i].name = f"past_key.{i}"
        graph.inputs[3 + 2 * i].name = f"past_value.{i}"
        graph.outputs[1 + 2 * i].name = f"present_key.{i}"
        graph.outputs[2 + 2 * i].name = f"present_value.{i}"
