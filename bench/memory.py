"""Peak RSS of a text prompt and of an image prompt through the public API, against the weights file.

    python -m bench.memory 1b=out/1b-int8 4b=out/4b-int8 12b=out/12b-int4   # folders gemma3-export wrote
    python -m bench.memory --two-sessions 4b=out/4b-int8                     # the previous runtime, for comparison

Each case runs `load(dir).generate(...)` in a fresh interpreter (bench.common.run_child), whose own ru_maxrss is
its peak: text is a 17-token prompt and 8 greedy tokens; image (multimodal exports) one 800x600 random image, its
256 soft tokens, and 4 greedy tokens. `--two-sessions` runs what the runtime did before decoder_multimodal.onnx:
decoder.onnx plus decoder_images.onnx as a second session, the weights file's pages left resident while loading.
Targets (issue 13): text peak <= 1.15 x weights file + KV cache; image peak <= text peak + 1.5 GB.
Writes bench/results/memory.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import REPO, THREADS, child_main, run_child

GB = 1e9
MODULE = "bench.memory"


def _case(job: dict[str, Any]) -> dict[str, Any]:
    """In the child: one prompt through the public API."""
    import numpy as np
    from PIL import Image

    from gemma3.runtime import api, ort_decoder

    if job["two_sessions"]:  # the earlier runtime: no one-graph decoder, mapped pages kept while loading
        read = api.load_manifest
        api.load_manifest = lambda folder: dataclasses.replace(read(folder), multimodal_decoder=None)
        ort_decoder.PagesReleased = lambda files: contextlib.nullcontext()
    model = api.load(job["model_dir"], threads=THREADS)
    images = None
    if job["case"] == "image":
        pixels = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
        images = [Image.fromarray(pixels)]
    new = 4 if images else 8
    r = model.generate("Describe the weather today in one line.", images=images, max_new_tokens=new, temperature=0)
    return {"prompt_tokens": r.stats.prompt_tokens, "kv_cache_bytes": r.stats.kv_cache_bytes,
            "tokens": r.token_ids, "decode_tok_s": round(r.stats.decode_tokens_per_s, 3)}


def measure(size: str, folder: Path, two_sessions: bool) -> dict[str, Any]:
    manifest = json.loads((folder / "manifest.json").read_text())
    weights = (folder / "decoder.onnx.data").stat().st_size
    row: dict[str, Any] = {"size": size, "folder": str(folder), "precision": manifest["precision"],
                           "runtime": "two sessions (before)" if two_sessions else "one session",
                           "weights_bytes": weights}
    cases = ["text", "image"] if manifest.get("vision") else ["text"]
    for case in cases:
        job = {"model_dir": str(folder), "case": case, "two_sessions": two_sessions}
        out = run_child(sys.executable, MODULE, "case", job)
        peak = out["peak_rss_mb"] * 2**20
        row[case] = {"peak_rss_bytes": int(peak), "ratio_to_weights": round(peak / weights, 3),
                     **{k: out[k] for k in ("prompt_tokens", "kv_cache_bytes", "tokens", "decode_tok_s")}}
        print(f"{size} {row['runtime']} {case}: peak {peak / GB:.2f} GB = {peak / weights:.2f} x weights "
              f"{weights / GB:.2f} GB (KV {out['kv_cache_bytes'] / GB:.3f} GB)", flush=True)
    text = row["text"]
    row["text_target_bytes"] = int(1.15 * weights + text["kv_cache_bytes"])
    row["text_within_target"] = text["peak_rss_bytes"] <= row["text_target_bytes"]
    if "image" in row:
        row["image_over_text_bytes"] = row["image"]["peak_rss_bytes"] - text["peak_rss_bytes"]
        row["image_within_target"] = row["image_over_text_bytes"] <= 1.5 * GB
    return row


def main(argv: list[str] | None = None) -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "case":
        child_main({"case": _case})
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="SIZE=DIR", help="an export folder per size, e.g. 4b=out/4b-int8")
    p.add_argument("--two-sessions", action="store_true", help="measure the previous runtime's two sessions")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "memory.json")
    args = p.parse_args(argv)
    rows = []
    for spec in args.models:
        size, sep, folder = spec.partition("=")
        if not sep or not (Path(folder) / "manifest.json").is_file():
            p.error(f"{spec!r} is not SIZE=DIR with an exported folder (manifest.json) at DIR")
        rows.append(measure(size, Path(folder), args.two_sessions))
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    key = "two_sessions" if args.two_sessions else "one_session"
    old[key] = {**old.get(key, {}), **{r["size"]: r for r in rows}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(old, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
