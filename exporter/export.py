"""Export a checkpoint to a model folder: decoder graph(s), streamed weights, tokenizer, manifest.

The checkpoint is checked against its config, and the output folder against what --out / --force allow, before
anything is written. Everything is then written into a hidden sibling folder and renamed into place at the end
(`output.py`), so an interrupted, killed or failed export leaves nothing half-written under the requested name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch

from gemma3.graphs.config import Gemma3Config
from gemma3.graphs.loaders.checkpoint import Checkpoint, CheckpointError, GGUFCheckpoint
from gemma3.graphs.loaders.embedded import embedded_270m_gguf
from gemma3.graphs.loaders.random_weights import RandomCheckpoint

from .calibrate import CALIBRATION_TOKENS, calibration_ids, input_statistics
from .combine_images import MULTIMODAL_FILE, write_combined
from .export_tensorrt import (
    engine_section,
    io_tensorrt,
    save_tensorrt,
    set_kv_scales,
    trace_tensorrt,
    workspace_elements,
)
from .lower_ort import lower_to_group_query_attention
from .lower_ort_images import lower_bidirectional
from .output import check_output, clean_stale, new_partial, put_in_place
from .progress import stage
from .quantize import FP8_MAX
from .recipes import EMBED, Recipe
from .trace import constants, trace_decoder
from .vision_graph import export_vision
from .weight_pass import plan_weights
from .weights import WeightPlan

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DATA_FILE = "decoder.onnx.data"
ONNX_IR_VERSION = 10  # onnxruntime 1.31 refuses the IR 14 that onnx 1.23 writes by default
GENERATION_DEFAULTS = {"top_k": 64, "top_p": 0.95, "temperature": 1.0}  # shipped with the Gemma 3 checkpoints


def local_capacity(window: int) -> int:
    """Local cache rows: the window plus slack, so GroupQueryAttention compacts once per `slack` steps, not per step."""
    return window + max(16, window // 4)


RANDOM_CALIBRATION_TOKENS = 64  # random weights: only fp8 activation scales are measured, on this many tokens
GRAM_BUDGET = 2 << 30  # bytes of Gram matrices a calibration may hold (float32, one per 4-bit projection)
# projections reading a distinct input, with the width of that input; k/v and up share q's and gate's
_GRAM_INPUTS = {"attn.q_proj": "hidden", "attn.o_proj": "attention", "mlp.gate_proj": "hidden",
                "mlp.down_proj": "intermediate"}


def _feedback(scheme) -> bool:
    return scheme.damp is not None and scheme.quantized


def _error_feedback_weights(config: Gemma3Config, recipe: Recipe) -> tuple[set[str], str]:
    """The weights quantized with error feedback (4-bit or fp8 with a damping in their scheme, keyed by a fused
    group's first source), and a note. Each needs its input's K x K Gram during calibration: the projections' only while
    they fit GRAM_BUDGET (the 270M's take 0.4 GiB; a 12B's down_proj alone 0.9 GiB per layer), the table's always."""
    chosen = {EMBED} if _feedback(recipe.scheme(EMBED, config.hidden_size)) else set()
    width = {"hidden": config.hidden_size, "attention": config.num_heads * config.head_dim,
             "intermediate": config.intermediate_size}
    projections = {}
    for layer in range(config.num_layers):
        for module, kind in _GRAM_INPUTS.items():
            name = f"text.layers.{layer}.{module}.weight"
            if _feedback(recipe.scheme(name, width[kind])):
                projections[name] = 4 * width[kind] ** 2
    total = sum(projections.values())
    if total <= GRAM_BUDGET:
        return chosen | set(projections), "error feedback on every weight whose scheme asks for it"
    where = "on the tied table only" if chosen else "nowhere"
    return chosen, (f"error feedback {where}: the projections' Gram matrices would take {total / 2**30:.1f} GiB "
                    f"(budget {GRAM_BUDGET / 2**30:.0f} GiB), so they get the range search alone")


def _decoder_graph(config: Gemma3Config, precision: Recipe, all_logits: bool,
                   images: bool = False) -> tuple[ir.Model, WeightPlan]:
    if precision.target == "ort":  # the generation graph takes logits_count (speculative verification)
        # batched: past_len [B] int64, so one step can advance several sequences (runtime/batching.py)
        model = trace_decoder(config, all_logits=all_logits, images=images,
                              logits_count=not (all_logits or images), past_len_dtype=torch.int64)
        (lower_bidirectional if images else lower_to_group_query_attention)(model)
    else:  # the HybridAttention nodes stay for TensorRT's plugin
        model = trace_tensorrt(config, precision, all_logits)
    plan = WeightPlan(DATA_FILE)
    plan_weights(model, precision, plan, {k: v.numpy() for k, v in constants(config).items()})
    return model, plan


def _optimize(model: ir.Model) -> None:
    """Fold constants and fuse what ONNX Runtime has kernels for, once the weights are on disk.

    The optimizer reads only small initializers (norm weights, < 8192 elements) from the data file just written.
    RMSNorm's seven traced ops become SimplifiedLayerNormalization, and a residual Add followed by a norm becomes
    SkipSimplifiedLayerNormalization: about 6x fewer nodes per step, which is what bounds decode at batch 1.
    """
    from onnxscript import optimizer
    from onnxscript.rewriter.ort_fusions import rms_normalization, skip_normalization

    optimizer.optimize(model, onnx_shape_inference=False)
    rms_normalization.fuse_rms_normalization(model)
    skip_normalization.fuse_skip_rms_normalization(model)
    optimizer.optimize(model, onnx_shape_inference=False)


def _save_graph(model: ir.Model, path: Path, target: str = "ort", workspace: int = 0) -> None:
    if target != "ort":
        save_tensorrt(model, path, workspace)
        return
    _optimize(model)
    proto = ir.to_proto(model)
    proto.ir_version = ONNX_IR_VERSION
    proto.producer_name = "gemma3-export"
    onnx.save(proto, path)


def _io(config: Gemma3Config, file: str, logits: str, images: bool = False) -> dict:
    layers = []
    for i, kind in enumerate(config.layer_types):
        window = config.window(i)
        layers.append({
            "kind": kind, "window": window, "capacity": local_capacity(window) if window else None,
            "past_key": f"past_key.{i}", "past_value": f"past_value.{i}",
            "present_key": f"present_key.{i}", "present_value": f"present_value.{i}",
        })
    io = {"file": file, "logits": logits, "input_ids": "input_ids", "past_len": "past_len",
          "logits_output": "logits", "cache_dtype": "float32", "layers": layers,
          "batch": True}  # input_ids [B, S], past_len [B], caches [B, ...]: B sequences, each at its own length
    if logits == "last" and not images:
        io["logits_count"] = "logits_count"  # 0-d int64 n: logits [B, n, vocab] of the step's last n positions
    if images:
        io["image_features"] = "image_features"  # [rows, hidden]: the soft tokens' rows in this step, in order
    return io


def _versions() -> dict[str, str]:
    found = {}
    for package in ("gemma3-export", "torch", "onnx", "onnxscript", "onnxruntime", "gguf", "safetensors"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def _tokenizer_writer(checkpoint: Checkpoint) -> Callable[[Path], str]:
    """What writes tokenizer.model: rebuilt from a GGUF's vocabulary, copied from an HF folder, or (random weights)
    Gemma 3's. Its source is found now, before anything is written (a missing one fails the export up front)."""
    from gemma3.graphs.loaders.gguf_tokenizer import sentencepiece_model_from_gguf

    name = "tokenizer.model"
    if not isinstance(checkpoint, GGUFCheckpoint) and Path(checkpoint.source).is_dir():
        source = Path(checkpoint.source) / name
        if not source.exists():
            raise CheckpointError(f"{checkpoint.source}: no tokenizer.model (Gemma 3 checkpoints ship one)")

        def copy(folder: Path) -> str:
            shutil.copyfile(source, folder / name)
            return name

        return copy
    # random weights: every Gemma 3 size shares one tokenizer, the embedded model's
    gguf = checkpoint.source if isinstance(checkpoint, GGUFCheckpoint) else embedded_270m_gguf()

    def rebuild(folder: Path) -> str:
        (folder / name).write_bytes(sentencepiece_model_from_gguf(gguf))
        return name

    return rebuild


def export(
    checkpoint: Checkpoint,
    out_dir: str | os.PathLike,
    precision: Recipe,
    max_context: int | None = None,
    eval_graph: bool = True,
    force: bool = False,
    calibration_tokens: int = CALIBRATION_TOKENS,
    max_batch: int = 1,
) -> Path:
    """Write `out_dir` (decoder.onnx, decoder.onnx.data, tokenizer.model, manifest.json); returns its path.

    `calibration_tokens`: length of the calibration text (0: uniform importance, and no fp8 activation scales).
    Random weights are calibrated only where a recipe cannot do without (fp8 activation scales), on
    RANDOM_CALIBRATION_TOKENS tokens: their activations say nothing about a real model's, and the manifest says so.
    `max_batch` (tensorrt): the most sequences one engine step serves.
    """
    target = precision.target
    config = checkpoint.config
    max_context = min(max_context or config.max_position_embeddings, config.max_position_embeddings)
    if max_context < 2:
        raise ValueError(f"--max-context {max_context}: a context needs at least 2 tokens")
    if max_batch < 1:
        raise ValueError(f"--max-batch {max_batch}: at least 1")
    fp8_cache = precision.kv_cache == "float8e4m3fn"
    if fp8_cache and calibration_tokens <= 0:
        raise ValueError("--kv-cache fp8 needs calibration (its scales are measured)")
    write_tokenizer = _tokenizer_writer(checkpoint)
    out = Path(out_dir)
    clean_stale(out)  # hidden folders of killed exports to this name (may put back an old export)
    check_output(out, force)
    work = new_partial(out)
    try:
        log.info("exporting %s (%s) for --target %s --precision %s into %s", config.name, checkpoint.source,
                 target, precision.name, out)
        tokenizer = write_tokenizer(work)
        with stage(f"tracing the decoder step ({config.num_layers} layers)"):
            model, plan = _decoder_graph(config, precision, all_logits=False)
        calibration = None
        random = isinstance(checkpoint, RandomCheckpoint)
        needs_scales = any(s.activations for s in precision.schemes()) or fp8_cache
        kv_scales: list[tuple[float, float]] = []
        if (precision.calibrated or fp8_cache) and calibration_tokens > 0 and (not random or needs_scales):
            import sentencepiece

            encode = sentencepiece.SentencePieceProcessor(model_file=str(work / tokenizer)).encode
            count = min(calibration_tokens, RANDOM_CALIBRATION_TOKENS) if random else calibration_tokens
            ids = calibration_ids(encode, config.bos_token_id, count)
            feedback, note = _error_feedback_weights(config, precision) if not random else (set(), "none")
            with stage(f"calibrating on {len(ids)} tokens"):
                statistics = input_statistics(checkpoint, ids, gram_for=feedback.__contains__)
            if not random:  # a random model's activation statistics would only mislead the range search
                plan.importance, plan.gram = statistics.importance, statistics.gram
            plan.absmax = statistics.absmax
            if fp8_cache:  # per layer: absmax / 448, so the largest calibrated key / value is stored unclipped
                kv_scales = [(max(k, 1e-12) / FP8_MAX, max(v, 1e-12) / FP8_MAX) for k, v in statistics.kv_absmax]
                set_kv_scales(model, kv_scales)
            calibration = {"text": "docstrings of Python standard-library modules (exporter/calibrate.py)",
                           "tokens": len(ids), "error_feedback": note}
            if random:
                calibration["note"] = ("random weights: fp8 activation scales are the absmax of this random "
                                       "model's activations on the calibration text (meaningless for a real model, "
                                       "but measured, not guessed); no importance or error feedback")
        size = plan.layout(model.graph, work)
        workspace = workspace_elements(config, max_batch)  # the plugin's scratch input (tensorrt graphs)
        plan.write(checkpoint, work / DATA_FILE, size, what=f"writing {DATA_FILE}")
        with stage("saving decoder.onnx"):
            _save_graph(model, work / "decoder.onnx", target, workspace)

        def io(file: str, logits: str, images: bool = False) -> dict:
            if target == "ort":
                return _io(config, file, logits, images)
            return io_tensorrt(config, file, logits, max_context, precision, max_batch, kv_scales)

        manifest = {"decoder": io("decoder.onnx", "last")}
        # more graphs over the same weights file, planned identically:
        variants = {"eval_decoder": ("decoder_all_logits.onnx", "all", False)} if eval_graph else {}
        if config.vision is not None and target == "ort":  # steps holding image soft tokens (bidirectional groups)
            variants["image_decoder"] = ("decoder_images.onnx", "last", True)
        for key, (file, logits, images) in variants.items():
            with stage(f"tracing and saving {file} (same weights)"):
                variant, variant_plan = _decoder_graph(config, precision, all_logits=logits == "all",
                                                       images=images)
                if variant_plan.layout(variant.graph, work) != size:
                    raise AssertionError(f"{file} planned a weights file of another size")
                _check_same_weights(plan, variant_plan, file)
                if kv_scales:
                    set_kv_scales(variant, kv_scales)
                _save_graph(variant, work / file, target, workspace)
            manifest[key] = io(file, logits, images)
        if "image_decoder" in manifest:  # both steps in one graph: one session prepacks the weights once
            with stage(f"saving {MULTIMODAL_FILE}"):
                write_combined(work, "decoder.onnx", "decoder_images.onnx", MULTIMODAL_FILE, "image_features")
            # the combined graph takes the text graph's inputs (logits_count included) plus the image rows
            manifest["multimodal_decoder"] = {**manifest["decoder"], "file": MULTIMODAL_FILE,
                                              "image_features": "image_features"}
        if config.vision is not None:
            manifest["vision"] = {"file": "vision.onnx", "pixel_values": "pixel_values",
                                  "image_features": "image_features", "image_size": config.vision.image_size,
                                  "tokens_per_image": config.vision.mm_tokens_per_image,
                                  **export_vision(checkpoint, work, precision)}
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": config.to_dict(),
            "precision": precision.name,
            "quantization": _quantization(config, precision, calibration) if precision.quantized else None,
            "target": target,
            "compute_dtype": precision.compute_dtype,
            "max_context": max_context,
            **({"max_batch": max_batch, "engine": engine_section(config, precision, max_context, max_batch)}
               if target == "tensorrt" else {}),
            **manifest,
            "tokenizer": tokenizer,
            "generation_defaults": GENERATION_DEFAULTS,
            "source": {"checkpoint": checkpoint.source, "weights_bytes": size},
            "versions": _versions(),
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1, default=_json_default))
        put_in_place(work, out, force)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _check_same_weights(plan: WeightPlan, variant: WeightPlan, file: str) -> None:
    """A variant graph reads decoder.onnx.data as written for decoder.onnx: every initializer it names must sit at
    the same offset with the same length and type (equal totals alone would miss two swapped entries)."""
    def where(p: WeightPlan) -> dict[str, tuple[int, int, str]]:
        return {name: (e.offset, e.nbytes, str(e.ir_type)) for name, e in p.entries.items()}

    ours, theirs = where(plan), where(variant)
    differ = sorted(name for name in ours.keys() | theirs.keys() if ours.get(name) != theirs.get(name))
    if differ:
        raise AssertionError(f"{file} plans {len(differ)} initializers differently from decoder.onnx: {differ[:5]}")


def _quantization(config: Gemma3Config, recipe: Recipe, calibration: dict | None) -> dict:
    """The manifest's account of the weights: one line per kind of weight, from the recipe's schemes."""
    projections, table = recipe.projections, recipe.scheme(EMBED, config.hidden_size)
    return {
        "linear_bits": projections.bits, "embed_bits": table.bits, "block_size": projections.block,
        "table_block_size": table.block, "accuracy_level": recipe.accuracy_level if recipe.target == "ort" else None,
        "schemes": {"projections": _scheme_dict(projections), "table": _scheme_dict(table),
                    **{f"{part} (override)": _scheme_dict(s) for part, s in recipe.overrides}},
        "scheme": recipe.describe(), "calibration": calibration,
    }


def _scheme_dict(scheme) -> dict:
    return {k: v for k, v in dataclasses.asdict(scheme).items() if v not in (None, False, 0)}


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {value!r}")
