"""Our exports of the same GGUF, measured like the peers: one child for speed, one for perplexity.

python -m bench.ours {speed|native|ppl} job.json out.json     (children; the parent side is `entry(precision)`)

`native` is the public API as users run it (`load(dir).stream(...)`: sampling, detokenization, stats);
`speed` is the raw step loop (OrtDecoder.step + argmax), the same harness the peers get.

The export is made once per precision with `gemma3-export` and cached under the bench cache folder; the children
import only gemma3.runtime (no torch), as a serving box would.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import DECODE_TOKENS, THREADS, cache_root, child_main, measure_native, measure_speed, run_child
from bench.peers import merge

PRECISIONS = ("fp32", "int8", "int8-head4", "int8-head4-fast", "int4-mixed", "int4", "int4-full")


def _exporter_version() -> str:
    """A hash of the exporter's and graphs' sources: a changed quantizer never reuses a stale cached export."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("exporter/*.py"), *root.glob("graphs/**/*.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def export_dir(precision: str, gguf: Path) -> Path:
    """Our export of `gguf` at `precision`, made on first use (keyed by the GGUF and the exporter's code)."""
    stat = gguf.stat()
    folder = cache_root() / "bench" / f"ours-{precision}-{stat.st_size}-{int(stat.st_mtime)}-{_exporter_version()}"
    if not (folder / "manifest.json").exists():
        exporter = Path(sys.executable).with_name("gemma3-export")
        subprocess.run(
            [
                str(exporter),
                "--size",
                "270m",
                "--checkpoint",
                str(gguf),
                "--precision",
                precision,
                "--out",
                str(folder),
                "--force",
            ],
            check=True,
        )
    return folder


def entry(precision: str) -> Callable[[Any], dict[str, Any]]:
    def measure(inputs: Any) -> dict[str, Any]:
        folder = export_dir(precision, inputs.gguf)
        job = inputs.job(model_dir=str(folder))
        speed_out = run_child(sys.executable, "bench.ours", "speed", job)
        ppl_out = run_child(sys.executable, "bench.ours", "ppl", job)
        weights = sum(f.stat().st_size for f in folder.glob("*.data"))
        notes = (f"gemma3-export --precision {precision} (ort target), gemma3.runtime OrtDecoder with IO binding, "
                 f"{THREADS} threads, prefill in chunks of 256; weights file {weights / 2**20:.0f} MiB")
        return merge(f"ours {precision}", speed_out, ppl_out, notes, weights_bytes=weights)

    return measure


# --- children ---------------------------------------------------------------------------------------------


def speed(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from gemma3.runtime.manifest import load_manifest
    from gemma3.runtime.ort_decoder import OrtDecoder

    t0 = time.perf_counter()
    decoder = OrtDecoder(load_manifest(job["model_dir"]), threads=THREADS)
    load_s = time.perf_counter() - t0
    state: dict[str, Any] = {}

    def reset() -> None:
        state["cache"] = decoder.new_cache(len(job["prompt"]) + 256)

    def prefill(ids: list[int]) -> int:
        return int(np.argmax(decoder.prefill(state["cache"], ids)))

    def step(token: int) -> int:
        return int(np.argmax(decoder.step(state["cache"], [token])))

    out = measure_speed(reset, prefill, step, job["prompt"])
    out["load_s"] = load_s
    return out


def native(job: dict[str, Any]) -> dict[str, Any]:
    from gemma3.runtime.api import load

    t0 = time.perf_counter()
    model = load(job["model_dir"], threads=THREADS)
    load_s = time.perf_counter() - t0
    prompt = job["prompt"]
    text = model.tokenizer.decode(prompt[1:])  # the API takes text: the same ids back (checked below)
    same_ids = model.prompt_ids(text, raw=True) == prompt

    def run() -> tuple[float, float, list[int]]:
        stream = model.stream(text, raw=True, max_new_tokens=DECODE_TOKENS + 1, temperature=0)
        t0 = time.perf_counter()
        t1 = None
        for _ in stream:  # text pieces, as users read them; the first comes with the first token
            if t1 is None:
                t1 = time.perf_counter()
        t2 = time.perf_counter()
        return (t1 or t2) - t0, t2 - (t1 or t2), stream.result.token_ids

    out = measure_native(run, len(prompt))
    out.update(load_s=load_s, prompt_ids_identical=same_ids)
    return out


def ppl(job: dict[str, Any]) -> dict[str, Any]:
    from gemma3.runtime.evaluate import window_nll
    from gemma3.runtime.manifest import load_manifest
    from gemma3.runtime.ort_decoder import OrtDecoder
    from gemma3.runtime.perplexity import eval_windows, perplexity

    manifest = load_manifest(job["model_dir"])
    decoder = OrtDecoder(manifest, manifest.eval_decoder or manifest.decoder, threads=THREADS)
    t0 = time.perf_counter()
    total, count = 0.0, 0
    for inputs, targets in eval_windows(job["eval_ids"]):
        total += window_nll(decoder, inputs, targets)
        count += len(targets)
    return {"perplexity": perplexity(total, count), "count": count, "eval_s": time.perf_counter() - t0}


if __name__ == "__main__":
    child_main({"speed": speed, "native": native, "ppl": ppl})
