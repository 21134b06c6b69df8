"""Build TensorRT engines from a tensorrt-target export: `gemma3-build MODEL_DIR`.

Writes MODEL_DIR/engines/: decoder.engine (two optimization profiles, `profiles.py`), vision.engine for
multimodal sizes, timing.cache (reused by the next build), and engines.json, which records what the runtime
checks at load: TensorRT version, GPU and its architecture, precision, compute and cache dtypes, limits.

Networks are strongly typed (the graph's Q/DQ and casts decide every precision; TensorRT 11 requires it), the
attention nodes become our AOT plugin (`plugins/tensorrt_plugin.py`, whose PTX is embedded in the engine), and
the plugin's cache outputs alias their inputs (preview feature ALIASED_PLUGIN_IO_10_03). Files are written to a
temporary folder and renamed into place, so a failed build leaves nothing half-written.

Not yet run on a GPU in this repository's CI: no TensorRT can be installed on its machines. Written against
TensorRT's documented Python API (10.9+: AOT plugins; 10.x / 11.x builder, parser, profiles, timing cache).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from gemma3.engine.profiles import DECODE, PREFILL, Profile, decoder_profiles, vision_profile
from gemma3.exporter.progress import stage

log = logging.getLogger("gemma3.engine")

ENGINES_DIR = "engines"
FORMAT_VERSION = 1
DEFAULT_CHUNK = 512  # prefill tokens per step: two images' worth, and long prompts in a few steps
INSTALL_HINT = ("TensorRT >= 10.9 and an NVIDIA GPU are needed to build engines: pip install tensorrt-cu12 "
                "--extra-index-url https://pypi.nvidia.com (on the GPU machine)")


class BuildError(RuntimeError):
    """A build that cannot proceed, in one line."""


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildError(INSTALL_HINT) from None
    if not hasattr(trt, "QuickPluginCreationRequest"):  # AOT Python plugins appeared in 10.9
        raise BuildError(f"TensorRT {trt.__version__} has no AOT Python plugins; {INSTALL_HINT}")
    return trt


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "manifest.json"
    if not path.is_file():
        raise BuildError(f"{model_dir} has no manifest.json: give the folder gemma3-export wrote")
    manifest = json.loads(path.read_text())
    if manifest.get("target") != "tensorrt":
        raise BuildError(f"{model_dir} was exported for target {manifest.get('target')!r}; engines are built "
                         "from --target tensorrt exports")
    return manifest


def _gpu() -> dict[str, Any]:
    from gemma3.plugins.attention_aot import arch_for_capability, current_capability

    major, minor = current_capability()
    try:  # the name is only for people reading engines.json
        import torch

        name = torch.cuda.get_device_name()
    except ImportError:
        name = "NVIDIA GPU"
    return {"name": name, "compute_capability": [major, minor], "arch": arch_for_capability(major, minor)}


def _network(trt, builder, logger, onnx_path: Path):
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    flags |= 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # external weights are read from the graph's folder
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    return network


def _config(trt, builder, profiles: list[Profile], timing: bytes, workspace_gib: float):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    cache = config.create_timing_cache(timing)
    config.set_timing_cache(cache, ignore_mismatch=False)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    return config, cache


def _build(trt, logger, onnx_path: Path, profiles: list[Profile], timing_path: Path, workspace_gib: float) -> bytes:
    builder = trt.Builder(logger)
    network = _network(trt, builder, logger, onnx_path)
    timing = timing_path.read_bytes() if timing_path.is_file() else b""
    config, cache = _config(trt, builder, profiles, timing, workspace_gib)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BuildError(f"TensorRT could not build {onnx_path.name} (its log above says why)")
    timing_path.write_bytes(memoryview(cache.serialize()))
    return bytes(memoryview(engine))


def build_engines(model_dir: str | os.PathLike, max_batch: int | None = None, max_context: int | None = None,
                  max_chunk: int | None = None, max_images: int = 5, workspace_gib: float = 4.0,
                  force: bool = False) -> Path:
    """Build every engine of an export into MODEL_DIR/engines; returns that folder."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    limits = manifest["engine"]
    max_batch = max_batch or limits["max_batch"]
    max_context = max_context or limits["max_context"]
    max_chunk = max_chunk or min(DEFAULT_CHUNK, max_context)
    profiles = decoder_profiles(manifest, max_batch, max_context, max_chunk)  # checks the limits first
    out = model_dir / ENGINES_DIR
    if out.exists() and not force:
        raise BuildError(f"{out} exists; pass --force to rebuild")
    trt = import_tensorrt()
    from gemma3.plugins import tensorrt_plugin

    tensorrt_plugin.register()
    gpu = _gpu()
    if gpu["compute_capability"][0] * 10 + gpu["compute_capability"][1] < limits["min_sm"]:
        raise BuildError(f"{manifest['precision']} engines need sm_{limits['min_sm']}+; this GPU ({gpu['name']}) "
                         f"is {gpu['arch']}")
    logger = trt.Logger(trt.Logger.WARNING)
    work = model_dir / f".{ENGINES_DIR}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    timing_path = work / "timing.cache"
    if (out / "timing.cache").is_file():  # reuse the last build's kernel timings
        shutil.copy(out / "timing.cache", timing_path)
    try:
        record = {"format_version": FORMAT_VERSION, "tensorrt_version": trt.__version__, "gpu": gpu,
                  "precision": manifest["precision"], "compute_dtype": manifest["compute_dtype"],
                  "cache_dtype": manifest["decoder"]["cache_dtype"], "max_batch": max_batch,
                  "max_context": max_context, "max_chunk": max_chunk, "timing_cache": "timing.cache",
                  "decoder": {"file": "decoder.engine", "profiles": {PREFILL: 0, DECODE: 1}}}
        with stage("building decoder.engine (TensorRT picks kernels; minutes)"):
            engine = _build(trt, logger, model_dir / manifest["decoder"]["file"],
                            [profiles[PREFILL], profiles[DECODE]], timing_path, workspace_gib)
            (work / "decoder.engine").write_bytes(engine)
        if manifest.get("vision"):
            with stage("building vision.engine"):
                engine = _build(trt, logger, model_dir / manifest["vision"]["file"],
                                [vision_profile(manifest, max_images)], timing_path, workspace_gib)
                (work / "vision.engine").write_bytes(engine)
            record["vision"] = {"file": "vision.engine", "max_images": max_images}
        (work / "engines.json").write_text(json.dumps(record, indent=1))
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("engines in %s", out)
    return out
