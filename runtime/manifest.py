"""The exported model folder's `manifest.json`, read and checked into small dataclasses.

The exporter writes it next to `decoder.onnx` and `tokenizer.model`; the runtime reads nothing else to know
the model's shape, the graph's input/output names and the cache layout. Every problem is reported as a
`ManifestError` naming the folder and the offending key, so command-line tools can print one clear line.

Two targets: "ort" folders run on ONNX Runtime; "tensorrt" folders hold the graphs `gemma3-build` turns into
engines (runtime/tensorrt/), with batched IO (past_len [B] int32), fixed caches (local: a ring of exactly W rows,
global: max_context rows), one decoder graph for text and image steps, and the plugin's workspace input.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1  # the manifest layout this runtime reads
MANIFEST_FILE = "manifest.json"
LOCAL, GLOBAL = "local", "global"  # layer kinds, as in gemma3.graphs.config (not imported: no torch here)
CACHE_DTYPES = ("float32", "float16")  # numpy names of the cache element types the runtime can allocate
TARGETS = ("ort", "tensorrt")
# cache element types of tensorrt-target graphs: on the GPU only, so numpy need not know them
TENSORRT_CACHE_DTYPES = ("float32", "float16", "bfloat16", "float8e4m3fn")


class ManifestError(ValueError):
    """The model folder or its manifest is missing, malformed or not something this runtime can run."""


@dataclass(frozen=True)
class ModelInfo:
    """The parts of the exported `Gemma3Config` the runtime needs; the whole dict stays in `config`."""

    name: str  # preset name or where the config came from
    vocab_size: int  # logits width
    num_layers: int  # decoder layers (one cache pair each)
    num_kv_heads: int  # cache dim 1
    head_dim: int  # cache dim 3
    sliding_window: int  # W of the local layers
    max_position_embeddings: int  # the checkpoint's longest context
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    image_token_id: int | None = None  # None for text-only exports
    boi_token_id: int | None = None  # <start_of_image>
    eoi_token_id: int | None = None  # <end_of_image>
    hidden_size: int | None = None  # width of the image_features rows (tensorrt multimodal exports need it)
    config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class LayerCache:
    """One layer's cache: its kind, its window and the graph names of its four cache tensors."""

    kind: str  # LOCAL or GLOBAL
    window: int  # W for local layers, 0 for global layers
    capacity: int | None  # fixed rows of a local cache (>= window); None: the runtime sizes global caches
    # (tensorrt: rows of every cache, window or max_context, fixed by the graph contract)
    past_key: str
    past_value: str
    present_key: str
    present_value: str


@dataclass(frozen=True)
class WorkspaceSpec:
    """tensorrt graphs: the attention plugin's scratch input, float32 [elements], zeroed once by the runtime."""

    input: str
    dtype: str
    elements: int


@dataclass(frozen=True)
class DecoderSpec:
    """One decoder graph and its IO contract."""

    file: Path  # absolute path of the .onnx file
    logits: str  # "last": logits [1, 1, vocab]; "all": logits [1, S, vocab]
    input_ids: str  # int64 [1, S] ([B, S] when `batch`)
    past_len: str  # int64 scalar: tokens already in the cache ([B], one per sequence, when `batch`)
    logits_output: str
    cache_dtype: str  # numpy dtype name of every cache tensor
    layers: tuple[LayerCache, ...]
    image_features: str | None = None  # float32 [rows, hidden]: the image graph's soft-token rows
    past_len_dtype: str = "int64"  # ort: an int64 scalar; tensorrt: int32 [batch]
    # ort "last" graphs: int64 scalar n, logits [1, n, vocab] of the last n positions (speculative verification);
    # None in exports older than it (they return one position only)
    logits_count: str | None = None
    workspace: WorkspaceSpec | None = None  # tensorrt only
    # ort: the graph takes B sequences per step (input_ids [B, S], past_len [B] int64, caches and logits [B, ...]),
    # each at its own length; False in exports older than it (one sequence, past_len a 0-d int64)
    batch: bool = False


@dataclass(frozen=True)
class VisionSpec:
    """The vision graph: pixel_values [N, 3, size, size] -> image_features [N, tokens, hidden]."""

    file: Path
    pixel_values: str
    image_features: str
    image_size: int
    tokens_per_image: int
    weights_bytes: int | None = None  # size of the graph's external data file (`vision.onnx.data`), if known


@dataclass(frozen=True)
class Manifest:
    root: Path  # the model folder
    format_version: int
    model: ModelInfo
    precision: str  # "fp32", "int4", ...
    target: str  # "ort" (ONNX Runtime) or "tensorrt" (graphs for `gemma3-build`'s engines)
    max_context: int  # the longest conversation (prompt + generated tokens) the export supports
    decoder: DecoderSpec
    eval_decoder: DecoderSpec | None  # all-position logits, for perplexity; optional
    image_decoder: DecoderSpec | None  # steps holding image soft tokens (multimodal exports)
    vision: VisionSpec | None  # the image encoder (multimodal exports)
    tokenizer: Path  # absolute path of the SentencePiece model
    generation_defaults: dict[str, float]  # sampling defaults shipped with the checkpoint
    source: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    compute_dtype: str = "float32"  # activations of the graphs (tensorrt: bfloat16 by default)
    max_batch: int = 1  # tensorrt: the most sequences one step serves (what the workspace is sized for)
    # ort multimodal: text and image steps in one graph (0 image rows on text steps), so one session holds the
    # weights; exports without it run decoder + image_decoder as two sessions (two prepacked copies)
    multimodal_decoder: DecoderSpec | None = None
    # ort quantized exports: MatMulNBits' accuracy level (4: activations rounded to int8); None where not recorded
    accuracy_level: int | None = None


class _Reader:
    """Typed access to nested JSON with errors that name the key path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, message: str) -> ManifestError:
        return ManifestError(f"{self.where}: {message}")

    def get(self, obj: dict[str, Any], key: str, path: str, kind: type | tuple[type, ...], optional: bool = False):
        if not isinstance(obj, dict):
            raise self.fail(f"{path or 'top level'} must be an object")
        full = f"{path}.{key}" if path else key
        if key not in obj or obj[key] is None:
            if optional:
                return None
            raise self.fail(f"missing key '{full}'")
        value = obj[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(f"'{full}' must be {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise self.fail(f"'{full}' must be {_kind_name(kind)}, got {value!r}")
        return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", str: "a string", dict: "an object", list: "a list", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _layer(r: _Reader, d: dict[str, Any], path: str, tensorrt: bool = False, max_context: int = 0) -> LayerCache:
    kind = r.get(d, "kind", path, str)
    if kind not in (LOCAL, GLOBAL):
        raise r.fail(f"'{path}.kind' must be '{LOCAL}' or '{GLOBAL}', got {kind!r}")
    window = r.get(d, "window", path, int)
    capacity = r.get(d, "capacity", path, int, optional=True)
    if kind == LOCAL:
        if window <= 0:
            raise r.fail(f"'{path}.window' of a local layer must be positive, got {window}")
        if capacity is None or capacity < window:
            raise r.fail(f"'{path}.capacity' of a local layer must be an integer >= its window {window}")
    names = {k: r.get(d, k, path, str) for k in ("past_key", "past_value", "present_key", "present_value")}
    if tensorrt:  # the plugin's layouts: a ring of exactly W rows, or one row per position of the context
        rows = window if kind == LOCAL else max_context
        if capacity != rows:
            raise r.fail(f"'{path}.capacity' of a tensorrt {kind} layer must be {rows}, got {capacity}")
        return LayerCache(kind=kind, window=window if kind == LOCAL else 0, capacity=rows, **names)
    return LayerCache(kind=kind, window=window, capacity=capacity if kind == LOCAL else None, **names)


def _decoder(r: _Reader, root: Path, d: dict[str, Any], path: str, num_layers: int, target: str = "ort",
             max_context: int = 0) -> DecoderSpec:
    file = root / r.get(d, "file", path, str)
    logits = r.get(d, "logits", path, str)
    if logits not in ("last", "all"):
        raise r.fail(f"'{path}.logits' must be 'last' or 'all', got {logits!r}")
    cache_dtype = r.get(d, "cache_dtype", path, str)
    tensorrt = target == "tensorrt"
    allowed = TENSORRT_CACHE_DTYPES if tensorrt else CACHE_DTYPES
    if cache_dtype not in allowed:
        raise r.fail(f"'{path}.cache_dtype' {cache_dtype!r} is not one of {', '.join(allowed)}")
    layers = r.get(d, "layers", path, list)
    if len(layers) != num_layers:
        raise r.fail(f"'{path}.layers' lists {len(layers)} layers, the model has {num_layers}")
    extra: dict[str, Any] = {}
    if tensorrt:
        past_len_dtype = r.get(d, "past_len_dtype", path, str)
        if past_len_dtype != "int32":
            raise r.fail(f"'{path}.past_len_dtype' of a tensorrt graph must be 'int32', got {past_len_dtype!r}")
        extra["past_len_dtype"] = past_len_dtype
        extra["workspace"] = _workspace(r, r.get(d, "workspace", path, dict), f"{path}.workspace")
    else:
        extra["batch"] = r.get(d, "batch", path, bool, optional=True) or False
    return DecoderSpec(
        file=file,
        logits=logits,
        input_ids=r.get(d, "input_ids", path, str),
        past_len=r.get(d, "past_len", path, str),
        logits_output=r.get(d, "logits_output", path, str),
        cache_dtype=cache_dtype,
        layers=tuple(_layer(r, layer, f"{path}.layers[{i}]", tensorrt, max_context)
                     for i, layer in enumerate(layers)),
        image_features=r.get(d, "image_features", path, str, optional=True),
        logits_count=r.get(d, "logits_count", path, str, optional=True) if logits == "last" else None,
        **extra,
    )


def _workspace(r: _Reader, d: dict[str, Any], path: str) -> WorkspaceSpec:
    dtype = r.get(d, "dtype", path, str)
    if dtype != "float32":
        raise r.fail(f"'{path}.dtype' must be 'float32', got {dtype!r}")
    elements = r.get(d, "elements", path, int)
    if elements < 1:
        raise r.fail(f"'{path}.elements' must be positive, got {elements}")
    return WorkspaceSpec(input=r.get(d, "input", path, str), dtype=dtype, elements=elements)


def _positive(r: _Reader, value: int, path: str) -> int:
    if value < 1:
        raise r.fail(f"'{path}' must be positive, got {value}")
    return value


def _vision(r: _Reader, root: Path, d: dict[str, Any]) -> VisionSpec:
    return VisionSpec(
        file=root / r.get(d, "file", "vision", str),
        pixel_values=r.get(d, "pixel_values", "vision", str),
        image_features=r.get(d, "image_features", "vision", str),
        image_size=_positive(r, r.get(d, "image_size", "vision", int), "vision.image_size"),
        tokens_per_image=_positive(r, r.get(d, "tokens_per_image", "vision", int), "vision.tokens_per_image"),
        weights_bytes=r.get(d, "weights_bytes", "vision", int, optional=True),
    )


def _model(r: _Reader, d: dict[str, Any]) -> ModelInfo:
    ints = ("vocab_size", "num_layers", "num_kv_heads", "head_dim", "sliding_window", "max_position_embeddings")
    values = {k: _positive(r, r.get(d, k, "model", int), f"model.{k}") for k in ints}  # 0 would size empty caches
    # The ids the runtime feeds or counts must index the embedding (boi / eoi are written with Gemma's fixed
    # values even by small test vocabularies, and only ever reach the model as text: not checked).
    checked = ("bos_token_id", "eos_token_id", "pad_token_id", "image_token_id")
    for k in (*checked, "boi_token_id", "eoi_token_id"):
        values[k] = r.get(d, k, "model", int, optional=True)
        if values[k] is None:
            del values[k]  # Gemma's fixed ids are the defaults (None for the image ids: a text-only export)
        elif k in checked and not 0 <= values[k] < values["vocab_size"]:
            raise r.fail(f"'model.{k}' {values[k]} is not a token id of the {values['vocab_size']}-row vocabulary")
    hidden = r.get(d, "hidden_size", "model", int, optional=True)
    return ModelInfo(
        name=str(d.get("name", "custom")),
        hidden_size=None if hidden is None else _positive(r, hidden, "model.hidden_size"),
        config=dict(d),
        **values,
    )


def read_json_object(path: Path) -> tuple[_Reader, dict[str, Any]]:
    """A JSON file whose top level is an object, and a reader naming the file in its errors (one line each)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON, UTF-8 and int-digit-limit errors
        raise ManifestError(f"{path}: cannot read it as JSON ({e or type(e).__name__})") from None
    r = _Reader(str(path))
    if not isinstance(data, dict):
        raise r.fail("the top level must be a JSON object")
    return r, data


def load_manifest(model_dir: str | os.PathLike) -> Manifest:
    """Read and check `model_dir/manifest.json`; raise `ManifestError` with a one-line reason otherwise."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ManifestError(f"model folder {str(root)!r} does not exist or is not a folder")
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_FILE} in {str(root)!r}: is this a folder written by gemma3-export?")
    r, data = read_json_object(path)
    version = r.get(data, "format_version", "", int)
    if version != FORMAT_VERSION:
        raise r.fail(f"format_version {version} is not supported (this runtime reads version {FORMAT_VERSION}): "
                     "re-export the model with this version's gemma3-export")
    target = r.get(data, "target", "", str)
    if target not in TARGETS:
        raise r.fail(f"target {target!r} is not one this runtime runs ({', '.join(TARGETS)})")
    model = _model(r, r.get(data, "model", "", dict))
    max_context = r.get(data, "max_context", "", int)
    if max_context < 2:
        raise r.fail(f"'max_context' must be at least 2, got {max_context}")
    eval_dict = r.get(data, "eval_decoder", "", dict, optional=True)
    image_dict = r.get(data, "image_decoder", "", dict, optional=True)
    vision_dict = r.get(data, "vision", "", dict, optional=True)
    decoder_dict = r.get(data, "decoder", "", dict)
    if target == "tensorrt":  # one decoder graph serves text and image steps: image_features on every step
        if image_dict is not None:
            raise r.fail("'image_decoder' is not part of a tensorrt export (its decoder takes image_features)")
        if (vision_dict is None) != (decoder_dict.get("image_features") is None):
            raise r.fail("'vision' and 'decoder.image_features' come together (a multimodal export has both)")
        if vision_dict is not None and model.hidden_size is None:
            raise r.fail("missing key 'model.hidden_size'")  # the width of image_features rows
    elif (image_dict is None) != (vision_dict is None):
        raise r.fail("'image_decoder' and 'vision' come together (a multimodal export has both)")
    if image_dict is not None and not image_dict.get("image_features"):
        raise r.fail("'image_decoder.image_features' is missing")
    multimodal_dict = r.get(data, "multimodal_decoder", "", dict, optional=True)
    if multimodal_dict is not None and (image_dict is None or not multimodal_dict.get("image_features")
                                        or model.hidden_size is None):
        raise r.fail("'multimodal_decoder' needs 'image_decoder', its own 'image_features' and 'model.hidden_size'")
    max_batch = 1
    if target == "tensorrt":
        max_batch = r.get(data, "max_batch", "", int)
        if max_batch < 1:
            raise r.fail(f"'max_batch' must be at least 1, got {max_batch}")

    def decoder(d: dict[str, Any], path: str) -> DecoderSpec:
        return _decoder(r, root, d, path, model.num_layers, target, max_context)

    defaults = r.get(data, "generation_defaults", "", dict, optional=True) or {}
    for k, v in defaults.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise r.fail(f"'generation_defaults.{k}' must be a number, got {v!r}")
    quantization = data.get("quantization")
    level = quantization.get("accuracy_level") if isinstance(quantization, dict) else None
    return Manifest(
        root=root,
        format_version=version,
        model=model,
        precision=r.get(data, "precision", "", str),
        target=target,
        max_context=max_context,
        decoder=decoder(decoder_dict, "decoder"),
        eval_decoder=None if eval_dict is None else decoder(eval_dict, "eval_decoder"),
        image_decoder=None if image_dict is None else decoder(image_dict, "image_decoder"),
        vision=None if vision_dict is None else _vision(r, root, vision_dict),
        tokenizer=root / r.get(data, "tokenizer", "", str),
        generation_defaults=dict(defaults),
        source=r.get(data, "source", "", dict, optional=True) or {},
        versions=r.get(data, "versions", "", dict, optional=True) or {},
        compute_dtype=r.get(data, "compute_dtype", "", str, optional=True) or "float32",
        max_batch=max_batch,
        multimodal_decoder=None if multimodal_dict is None else decoder(multimodal_dict, "multimodal_decoder"),
        accuracy_level=level if isinstance(level, int) and not isinstance(level, bool) else None,
    )


REFETCH = "copy the whole folder gemma3-export wrote again, or re-export it"


def require_file(path: Path, what: str) -> Path:
    """`path` if it exists, else a `ManifestError` saying which part of the export is missing."""
    if not path.is_file():
        raise ManifestError(f"the {what} {str(path)!r} named by {MANIFEST_FILE} is missing ({REFETCH})")
    return path


def _require_data(path: Path, what: str, size: int | None) -> None:
    """An external-data file the exporter recorded the size of: present and exactly that long."""
    if size is None:
        return  # hand-built folders (tests) keep their weights inside the graph
    if not path.is_file():
        raise ManifestError(f"the {what} {str(path)!r} is missing ({REFETCH})")
    actual = path.stat().st_size
    if actual != size:
        raise ManifestError(f"the {what} {str(path)!r} holds {actual} bytes but {MANIFEST_FILE} says {size}: it is "
                            f"truncated or from another export ({REFETCH})")


def weights_file(graph: Path) -> Path:
    """A graph's external weights: `decoder.onnx` -> `decoder.onnx.data` (every decoder graph reads the decoder's)."""
    return graph.with_name(graph.name + ".data")


def check_files(manifest: Manifest, eval_decoder: bool = False, generation: bool = True) -> None:
    """Every file an ort folder's graphs need, checked up front so a missing one is named at load time
    rather than by ONNX Runtime at the first image. `generation`: the decoders, vision graph and tokenizer
    of generation; `eval_decoder`: the perplexity graph (or the decoder it falls back to) and the tokenizer."""
    if manifest.target != "ort":
        return  # tensorrt folders run their engines (checked by runtime/tensorrt/engines.py)
    graphs: list[tuple[DecoderSpec | VisionSpec, str]] = []
    if generation:
        graphs.append((manifest.decoder, "decoder graph"))
        if manifest.multimodal_decoder is not None:
            graphs.append((manifest.multimodal_decoder, "multimodal decoder graph"))
        if manifest.image_decoder is not None:
            graphs.append((manifest.image_decoder, "image decoder graph"))
    if eval_decoder:
        graphs.append((manifest.eval_decoder or manifest.decoder, "eval decoder graph"))
    if generation and manifest.vision is not None:
        graphs.append((manifest.vision, "vision graph"))
    for spec, what in graphs:
        require_file(spec.file, what)
    weights = manifest.source.get("weights_bytes")
    if isinstance(weights, bool) or not isinstance(weights, int):
        weights = None  # older or hand-written manifests: nothing to compare against
    _require_data(weights_file(manifest.decoder.file), "decoder weights file", weights)  # shared by every decoder
    if generation and manifest.vision is not None:
        _require_data(weights_file(manifest.vision.file), "vision weights file", manifest.vision.weights_bytes)
    require_file(manifest.tokenizer, "tokenizer model")
