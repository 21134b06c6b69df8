"""The vision graph `vision.onnx`: pixel_values [N, 3, S, S] -> image_features [N, tokens, text_hidden], fp32 IO.

`Gemma3.image_features` (SigLIP tower, 4x4 average pool, the (1 + w) RMSNorm, projection) traced on the meta
device like the decoder, so no weight is allocated; its weights are planned with the decoder's `plan_weights`
(q/k/v fused into one matmul, pre-transposed fp32 or MatMulNBits) and streamed from the checkpoint into their own
page-aligned `vision.onnx.data`. Then onnxscript's ONNX Runtime fusions: each layer's attention becomes one
`com.microsoft.MultiHeadAttention` (biases folded in) and residual + LayerNorm a `SkipLayerNormalization`.

Measured on full-size random weights (4b preset: 896x896, 27 layers, hidden 1152), 1 image, 2 threads, this
CPU (AMD EPYC, AVX-512 VNNI), quiet machine (`python -m bench.vision`, bench/results/vision.json):
  - fp32: 16.6 s/image (transformers eager: 78.8 s), same features as transformers (rel. RMS 3.5e-7).
    Without the fusions 22.0 s (ONNX Runtime's session fusions alone leave MatMul + Softmax); the fused
    attention is ~7.3 s of it, the projections ~10.6 s (~300 GFLOP/s each).
  - 8-bit weights (MatMulNBits, int8 activations), block 128: 13.1 s, rel. RMS feature error 2.8e-3
    (block 32: 16.0 s, 2.3e-3). 4-bit block 128: 13.6 s, 3.1e-2: no faster than 8-bit (4096 patches per
    image make the matmuls compute-bound; both run the same int8 kernels) for 11x the error.
Hence `vision_precision`: fp32 stays fp32; every quantized decoder precision gets 8-bit block-128 weights here
(440 MB instead of 1602 MB, 1.27x faster), never 4-bit. Random weights lack real outliers: the errors are a
lower bound, which argues further against 4-bit.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from gemma3.graphs.config import Gemma3Config
from gemma3.graphs.loaders.checkpoint import Checkpoint
from gemma3.graphs.model import Gemma3

from .lower_ort import MS_DOMAIN
from .recipes import Recipe, Scheme
from .weight_pass import plan_weights
from .weights import WeightPlan

log = logging.getLogger(__name__)

FILE = "vision.onnx"
DATA_FILE = "vision.onnx.data"
ONNX_IR_VERSION = 10  # as export.py: onnxruntime 1.31 refuses the IR 14 onnx 1.23 writes by default

FP32 = Recipe("fp32", "ort", "float32 weights", Scheme("float32"), Scheme("float32"))
# Block 128 along K: K = 1152 splits exactly, fc2's K = 4304 pads its last block (MatMulNBits handles that at 8 bits).
INT8_128 = Recipe("int8-block128", "ort", "8-bit symmetric weights, block 128, int8 activations (accuracy_level 4)",
                  Scheme("int8", 128), Scheme("float32"), fallback_block=128)
NOTES = {
    "fp32": "fp32 weights, like the decoder.",
    "int8-block128": "The decoder's precision is quantized; the vision graph takes 8-bit (block 128) weights whatever "
                     "its bit width. Measured at full size on random weights, 1 image, 2 threads: 13.1 s/image vs "
                     "16.6 s fp32, relative RMS feature error 2.8e-3; 4-bit was no faster (13.6 s: 4096 patches "
                     "make the matmuls compute-bound) for 11x the error (3.1e-2), so it is refused here.",
}


def vision_precision(decoder: Recipe) -> Recipe:
    """The vision graph's weight precision for a decoder precision (measurements in the module docstring).
    tensorrt: plain SigLIP in the decoder's compute dtype, float weights (TensorRT fuses its attention itself;
    fp8 vision weights are not offered: their feature error is unmeasured on a real tower)."""
    if decoder.target == "tensorrt":
        storage = Scheme(decoder.compute_dtype)
        return Recipe(f"vision-{decoder.compute_dtype}", "tensorrt", f"{decoder.compute_dtype} weights", storage,
                      storage, compute_dtype=decoder.compute_dtype)
    return INT8_128 if decoder.quantized else FP32


class ImageFeatures(torch.nn.Module):
    """The exported graph; parameters keep `Gemma3`'s names under `model.` (vision.*, projector.*)."""

    def __init__(self, model: Gemma3):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.image_features(pixel_values)


def trace_vision(config: Gemma3Config, dtype: torch.dtype = torch.float32) -> ir.Model:
    """`Gemma3.image_features` as an ONNX IR model with a dynamic image axis; parameters have no data.

    Only the tower's and projector's parameters become initializers: the text decoder is never called.
    """
    if config.vision is None:
        raise ValueError(f"the {config.name} model is text-only; it has no vision graph")
    side = config.vision.image_size
    with torch.device("meta"):  # no weight is ever allocated
        module = ImageFeatures(Gemma3(config).to(dtype)).eval()
        with warnings.catch_warnings():  # torch.export's deprecation chatter says nothing about our model
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (torch.zeros(2, 3, side, side, dtype=dtype),), dynamo=True, optimize=False, verbose=False,
                opset_version=23, dynamic_shapes=({0: "images"},),
            )
    model = program.model
    model.graph.inputs[0].name = "pixel_values"
    model.graph.outputs[0].name = "image_features"
    model.opset_imports[MS_DOMAIN] = 1  # MatMulNBits now, MultiHeadAttention after the fusions
    return model


def _optimize(model: ir.Model, layers: int) -> dict[str, int]:
    """onnxscript's ONNX Runtime fusions (run once the weights are on disk: they read the small ones)."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    _, counts = optimize_for_ort(model)
    fused = sum(node.op_type == "MultiHeadAttention" for node in model.graph)
    if fused != layers:  # still correct, only slower (22 s instead of 17 s per image at full size)
        log.warning("vision graph: %d of %d attention blocks fused into MultiHeadAttention", fused, layers)
    _name_fused_nodes(model.graph)
    return {name: count for name, count in counts.items() if count}


def _name_fused_nodes(graph: ir.Graph) -> None:
    """`node_MultiHeadAttention_1497` -> `vision.layers.0.attn.MultiHeadAttention`, from the torch module scope."""
    taken = {node.name for node in graph}
    for node in graph:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
        parts = [s.strip(" '") for s in scopes.strip("[]").split(",")]
        module = next((p for p in reversed(parts[:-1]) if p.startswith("model.")), None)
        if node.name and node.name.startswith("node_") and module:
            name = f"{module.removeprefix('model.')}.{node.op_type}"
            if name not in taken:
                taken.add(name)
                node.name = name


def export_vision(checkpoint: Checkpoint, folder: Path, precision: Recipe, *,
                  vision: Recipe | None = None) -> dict:
    """Write `folder/vision.onnx` + `folder/vision.onnx.data`; returns the manifest's `vision` section.

    `precision` is the decoder's; the vision graph's own follows `vision_precision` (why: the returned "note").
    `vision` overrides that choice, for measurements (bench/vision.py's 4-bit row).
    """
    config = checkpoint.config
    if config.vision is None:
        raise ValueError(f"the {config.name} model is text-only; it has no vision graph")
    v, folder = config.vision, Path(folder)
    chosen = vision or vision_precision(precision)
    log.info("tracing the vision graph (%d layers, %s weights)", v.num_layers, chosen.name)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[chosen.compute_dtype]
    model = trace_vision(config, dtype)
    plan = WeightPlan(DATA_FILE)
    plan_weights(model, chosen, plan, {})
    size = plan.layout(model.graph, folder)
    plan.write(checkpoint, folder / DATA_FILE, size, what="writing vision weights")
    if chosen.target == "ort":
        fusions = _optimize(model, v.num_layers)
    else:  # standard ONNX for TensorRT: constant folding only
        from onnxscript import optimizer

        optimizer.optimize(model, onnx_shape_inference=False)
        model.opset_imports.pop(MS_DOMAIN, None)
        fusions = {}
    proto = ir.to_proto(model)
    proto.ir_version = ONNX_IR_VERSION
    proto.producer_name = "gemma3-export"
    onnx.save(proto, folder / FILE)
    return {
        "file": FILE,
        "inputs": {"pixel_values": {"shape": ["images", 3, v.image_size, v.image_size],
                                    "dtype": chosen.compute_dtype}},
        "outputs": {"image_features": {"shape": ["images", v.mm_tokens_per_image, config.hidden_size],
                                       "dtype": chosen.compute_dtype}},
        "image_size": v.image_size,
        "tokens_per_image": v.mm_tokens_per_image,
        "weights": chosen.projections.storage.replace("float32", "fp32") if not chosen.projections.quantized
        else f"int{chosen.projections.bits}",
        "quantization": None if not chosen.projections.quantized else {
            "linear_bits": chosen.projections.bits, "block_size": chosen.projections.block,
            "accuracy_level": chosen.accuracy_level, "scheme": chosen.describe(),
            "kept_fp32": "patch embedding, position embeddings, norms, biases, projector matmul"},
        "weights_bytes": size,
        "fusions": fusions,
        "note": NOTES.get(chosen.name, f"{chosen.name}: {chosen.doc} (chosen by the caller)"),
    }
