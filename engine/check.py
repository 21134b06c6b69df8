"""The engine part of the GPU check (`bench/gpu.py`): the real 270M exported for TensorRT in bf16, fp8 and int4,
built into engines with our plugin, and generated from through the public API, against the ORT fp32 export.

Needs TensorRT, an NVIDIA GPU and this project's export dependencies (torch for tracing). Not yet run: no machine
this project reaches has TensorRT.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

PROMPT = "The three most important inventions of the industrial revolution were"
PRECISIONS = ("bf16", "fp8", "int4")
MAX_CONTEXT = 1024


def _greedy(folder: Path, tokens: int) -> tuple[list[int], float]:
    from gemma3.runtime.api import load

    result = load(folder).generate(PROMPT, raw=True, max_new_tokens=tokens, temperature=0)
    stats = result.stats
    rate = stats.decode_steps / stats.decode_seconds if stats.decode_seconds else 0.0
    return result.token_ids, rate


def build_and_check_270m(tokens: int = 48, precisions: tuple[str, ...] = PRECISIONS) -> tuple[str, str]:
    """("pass" | "fail", detail): bf16 must give the fp32 export's greedy tokens; fp8 / int4 report agreement."""
    from gemma3.engine.build import build_engines
    from gemma3.exporter.export import export
    from gemma3.exporter.recipes import recipe
    from gemma3.graphs import open_checkpoint
    from gemma3.graphs.loaders.embedded import embedded_270m_gguf

    checkpoint = open_checkpoint(embedded_270m_gguf(), size="270m")
    with tempfile.TemporaryDirectory(prefix="gemma3-gpu-check-") as tmp:
        root = Path(tmp)
        reference = export(checkpoint, root / "ort-fp32", recipe("fp32"), max_context=MAX_CONTEXT, eval_graph=False)
        want, cpu_rate = _greedy(reference, tokens)
        parts, ok = [f"ORT fp32 on CPU {cpu_rate:.0f} tok/s"], True
        for name in precisions:
            folder = export(checkpoint, root / f"trt-{name}", recipe(name, "tensorrt"), max_context=MAX_CONTEXT,
                            eval_graph=False)
            build_engines(folder, max_context=MAX_CONTEXT)
            got, rate = _greedy(folder, tokens)
            same = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            parts.append(f"{name}: {same}/{len(want)} greedy tokens as fp32, {rate:.0f} tok/s")
            ok &= name != "bf16" or same == len(want)
    return ("pass" if ok else "fail"), "; ".join(parts)
