"""Quality of the tensorrt-target graphs, measured on this CPU: perplexity of the real Gemma 3 270M per precision.

    python -m bench.tensorrt_quality [--precisions bf16 fp8 int4 fp16 fp32] [--windows 4] [--kv-cache fp8]

Each precision is exported with `gemma3-export --target tensorrt` (cached under the bench cache, keyed by the
exporter's code), and the exported eval graph itself runs in ONNX Runtime on the CPU with its HybridAttention
nodes lowered to the reference op and its 16-bit tensors rounded where the graph writes them
(`gemma3.exporter.tensorrt_on_cpu`). Perplexity follows ../shared/docs/eval-protocol.md on transformers' ids
(the same ids as `make bench`). Bytes per decoded token: the decoder's weights file (every weight, the tied
table included, is read once per token). Writes bench/results/tensorrt-quality.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import cache_root
from bench.ours import _exporter_version
from bench.peers import load_inputs

RESULTS = Path(__file__).parent / "results"
FP32_CEILING = 13.409  # transformers fp32 on the GGUF's dequantized weights (README, eval-protocol.md)
BUDGET = {"fp32": 0.0, "bf16": 0.005, "fp16": 0.005, "fp8": 0.01, "int4": 0.10}  # relative to the ceiling


def export_dir(precision: str, gguf: Path, kv_cache: str = "compute") -> Path:
    stat = gguf.stat()
    kv = "" if kv_cache == "compute" else f"-{kv_cache}kv"
    folder = (cache_root() / "bench" /
              f"trt-{precision}{kv}-{stat.st_size}-{int(stat.st_mtime)}-{_exporter_version()}")
    if not (folder / "manifest.json").exists():
        command = [sys.executable, "-m", "gemma3.exporter.cli", "--size", "270m", "--checkpoint", str(gguf),
                   "--target", "tensorrt", "--precision", precision, "--out", str(folder), "--force",
                   "--max-context", "2048", "--kv-cache", kv_cache]
        subprocess.run(command, check=True)
    return folder


def perplexity(folder: Path, eval_ids: list[int], windows: int, chunk: int = 0) -> tuple[float, float]:
    """Each window in one step, or (`chunk` > 0) in steps of `chunk` tokens: an fp8 KV cache changes only what
    later steps read (a step attends to its own keys as computed), so it is measured chunked."""
    from gemma3.exporter.tensorrt_on_cpu import CpuSteps
    from gemma3.runtime.perplexity import EVAL_WINDOW, eval_windows, perplexity, window_nll

    total, count, nonfinite = 0.0, 0, 0
    for inputs, targets in eval_windows(eval_ids)[:windows]:
        steps = CpuSteps(folder, graph="eval_decoder", global_capacity=EVAL_WINDOW + 1)
        ids = np.array([inputs], dtype=np.int64)
        step = chunk or ids.shape[1]
        logits = np.concatenate([steps(ids[:, i:i + step])[0] for i in range(0, ids.shape[1], step)])
        nonfinite += int((~np.isfinite(logits)).sum())
        total += window_nll(logits, targets)
        count += len(targets)
    return perplexity(total, count), nonfinite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp8", "int4", "fp16"])
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows of 1024 targets (protocol: 4)")
    parser.add_argument("--kv-cache", choices=["compute", "fp8"], default="compute",
                        help="fp8: export with --kv-cache fp8 (rows named PRECISION+fp8kv)")
    parser.add_argument("--chunk", type=int, default=0,
                        help="evaluate each window in steps of this many tokens (rows named ...@chunkN)")
    args = parser.parse_args()
    from gemma3.graphs.loaders.embedded import embedded_270m_gguf

    gguf = embedded_270m_gguf()
    inputs = load_inputs(gguf)
    rows = []
    for precision in args.precisions:
        t0 = time.perf_counter()
        folder = export_dir(precision, gguf, args.kv_cache)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ppl, nonfinite = perplexity(folder, inputs.eval_ids, args.windows, args.chunk)
        manifest = json.loads((folder / "manifest.json").read_text())
        weights = (folder / "decoder.onnx.data").stat().st_size
        name = precision if args.kv_cache == "compute" else f"{precision}+{args.kv_cache}kv"
        name += f"@chunk{args.chunk}" if args.chunk else ""
        rows.append({"precision": name, "kv_cache": manifest["decoder"]["cache_dtype"], "perplexity": ppl,
                     "vs_fp32": ppl / FP32_CEILING - 1,
                     "budget": BUDGET.get(precision), "nonfinite_logits": nonfinite, "weights_bytes": weights,
                     "compute_dtype": manifest["compute_dtype"], "windows": args.windows, "chunk": args.chunk,
                     "export_s": export_s, "eval_s": time.perf_counter() - t0,
                     "scheme": (manifest.get("quantization") or {}).get("scheme")})
        r = rows[-1]
        print(f"{name}: perplexity {ppl:.3f} ({100 * r['vs_fp32']:+.2f}% vs fp32 {FP32_CEILING}), "
              f"{weights / 2**20:.0f} MiB per token, non-finite logits {nonfinite}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "tensorrt-quality.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous.update({r["precision"]: r for r in rows})
    path.write_text(json.dumps(previous, indent=1))


if __name__ == "__main__":
    main()
