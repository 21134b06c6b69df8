"""Build the onnxruntime-genai peer: GGUF -> HF safetensors folder -> genai's model builder, int4 block 32.

Both outputs are cached under the project cache (never in the repository) and rebuilt only when missing:

    <cache>/bench/gemma-3-270m-hf       safetensors + tokenizer, from transformers' GGUF load
    <cache>/bench/genai-int4-b32        genai_config.json, model.onnx(.data), tokenizer files

Run as `python -m bench.genai_build` (in the project .venv: it needs torch, transformers and the builder).
What we had to change for the builder is in FIXES, which the bench copies into the peer's notes.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import cache_root

log = logging.getLogger(__name__)

BUILDER_OPTIONS = ["block_size=32", "is_symmetric=true", "accuracy_level=4"]  # genai's CPU defaults, made explicit
FIXES = (
    "HF folder made by transformers from the GGUF (dequantized fp32) + save_pretrained(safetensors); "
    "config.json patched for the builder: per-layer-type rope_parameters flattened to the global entry "
    "(rope_theta 1e6, else KeyError 'rope_type') plus rope_local_base_freq=1e4 from the sliding entry, "
    "both top-level and inside rope_parameters (transformers 5 drops the top-level one on load, the builder "
    "reads config.rope_local_base_freq); "
    "and the GGUF quantization_config dropped (model.hf_quantizer=None, else save_pretrained refuses); "
    "builder -p int4 -e cpu --extra_options " + " ".join(BUILDER_OPTIONS)
)


def hf_dir() -> Path:
    return cache_root() / "bench" / "gemma-3-270m-hf"


def genai_dir() -> Path:
    return cache_root() / "bench" / "genai-int4-b32"


def flatten_rope(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes `rope_parameters` per layer type; the builder reads one flat dict.

    Gemma 3 keeps two RoPE bases: the global layers' (rope_parameters.full_attention, which also carries
    the linear factor 8 on 4b+) and the local layers' (sliding_attention). The builder takes the first from
    the flat rope_parameters / rope_theta and the second from the transformers 4 field rope_local_base_freq.
    """
    rope = config.get("rope_parameters") or {}
    if "full_attention" not in rope:
        return config  # already flat
    out = dict(config)
    local_theta = rope["sliding_attention"]["rope_theta"]
    # transformers 5 pops a top-level rope_local_base_freq while loading (it becomes the sliding entry), but
    # keeps unknown keys inside rope_parameters, which the builder copies onto the config object: so the
    # local base goes in both places, the first for transformers, the second for the builder.
    out["rope_parameters"] = {**rope["full_attention"], "rope_local_base_freq": local_theta}
    out["rope_theta"] = rope["full_attention"]["rope_theta"]
    out["rope_local_base_freq"] = local_theta
    return out


def make_hf_folder(gguf: Path, dest: Path) -> None:
    """transformers' dequantized fp32 view of the GGUF, saved as an ordinary HF checkpoint folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The tensors are already dequantized to fp32; only the gguf "quantizer" tag blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    config_path = tmp / "config.json"
    config = flatten_rope(json.loads(config_path.read_text()))
    config.pop("quantization_config", None)  # the weights are plain fp32 now; a gguf entry would confuse loaders
    config_path.write_text(json.dumps(config, indent=2))
    tmp.replace(dest)  # only a complete folder ever has the real name


def run_builder(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(tmp)]
    cmd += ["-p", "int4", "-e", "cpu", "-c", str(tmp.with_name("genai-builder-cache"))]
    cmd += ["--extra_options", *BUILDER_OPTIONS]
    log.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr)  # our stdout carries only the JSON summary
    tmp.replace(dest)


def ensure_built(gguf: Path) -> dict[str, float]:
    """Make whatever is missing; returns the seconds each step took (0 when cached)."""
    times = {"hf_folder_s": 0.0, "builder_s": 0.0}
    if not (hf_dir() / "config.json").exists():
        t0 = time.perf_counter()
        hf_dir().parent.mkdir(parents=True, exist_ok=True)
        make_hf_folder(gguf, hf_dir())
        times["hf_folder_s"] = time.perf_counter() - t0
    if not (genai_dir() / "genai_config.json").exists():
        t0 = time.perf_counter()
        run_builder(hf_dir(), genai_dir())
        times["builder_s"] = time.perf_counter() - t0
    return times


if __name__ == "__main__":
    from gemma3.graphs.loaders.embedded import embedded_270m_gguf

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(ensure_built(embedded_270m_gguf())))
