"""SigLIP + projector latency per 896x896 image at full size (4b preset, random weights), and Pan & Scan cost.

    python -m bench.vision [--repeats 3] [--quiet-wait 600] [--out bench/results]

Ours: the exported vision.onnx in ONNX Runtime (fp32; 8-bit block 128, what every quantized precision ships; and
4-bit block 128, measured only to justify refusing it). Reference: transformers eager, its `SiglipVisionModel` +
`Gemma3MultiModalProjector` on the same weights. Each system runs in its own child (2 threads, peak RSS its own),
one warm-up then `--repeats` timed runs on the same pixels; median ms/image. Feature differences are taken against
transformers. Pan & Scan: `gemma3.runtime.images.prepare_images` on random images of a few sizes.
Writes <out>/vision.json and <out>/vision-table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPEATS, REPO, THREADS, _cpu_ticks, cache_root, child_main, run_child, wait_until_quiet
from bench.ours import _exporter_version

SIZE = "4b"  # whose vision config (SigLIP so400m at 896) and text width (2560) the graphs take
SYSTEMS = {  # name -> child mode, vision weights
    "transformers eager fp32": ("transformers", None),
    "ours fp32 (ORT)": ("ort", "fp32"),
    "ours int8 block 128 (ORT)": ("ort", "int8"),
    "ours int4 block 128 (ORT, not shipped)": ("ort", "int4"),
}
REFERENCE = "transformers eager fp32"
PAN_AND_SCAN_SIZES = [(896, 896), (640, 480), (1280, 720), (1920, 1080), (4032, 3024), (3000, 1000),
                      (1000, 3000), (2048, 512)]  # (width, height)


def export_dir(weights: str) -> Path:
    """The full-size vision graph with `weights` vision weights, exported once per exporter version."""
    from gemma3.exporter.recipes import Recipe, Scheme, recipe
    from gemma3.exporter.vision_graph import export_vision, vision_precision
    from gemma3.graphs.config import preset
    from gemma3.graphs.loaders.random_weights import RandomCheckpoint

    folder = cache_root() / "bench" / f"vision-{SIZE}-{weights}-{_exporter_version()}"
    if not (folder / "manifest.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        vision = {"fp32": vision_precision(recipe("fp32")), "int8": vision_precision(recipe("int8")),
                  "int4": Recipe("int4-block128", "ort", "4-bit asymmetric weights, block 128 (measurement only)",
                                 Scheme("int4", 128, symmetric=False, search=True), Scheme("float32"))}[weights]
        manifest = export_vision(RandomCheckpoint(preset(SIZE)), folder, recipe("fp32"), vision=vision)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


# --- children ---------------------------------------------------------------------------------------------


def _timed(run, pixels, repeats: int) -> dict[str, Any]:
    times = []
    busy0, own0, wall0 = 0, 0, 0.0
    for i in range(repeats + 1):
        if i == 1:
            busy0, own0, wall0 = *_cpu_ticks(), time.perf_counter()
        t0 = time.perf_counter()
        features = run(pixels)
        if i:  # run 0 is the warm-up
            times.append(time.perf_counter() - t0)
    busy1, own1 = _cpu_ticks()
    capacity = (time.perf_counter() - wall0) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    return {"ms_per_image": 1000 * statistics.median(times) / len(pixels), "times_s": times, "features": features,
            "foreign_cpu_share": round(max(0, (busy1 - busy0) - (own1 - own0)) / capacity, 3)}


def ort_child(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(Path(job["folder"]) / "vision.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    out = _timed(lambda x: session.run(None, {"pixel_values": x})[0], np.load(job["pixels"]), job["repeats"])
    np.save(job["features"], out.pop("features"))
    return {**out, "load_s": load_s}


def transformers_child(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import Gemma3Config, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    from gemma3.graphs.config import preset
    from gemma3.graphs.loaders.names import hf_to_ours
    from gemma3.graphs.loaders.random_weights import RandomCheckpoint

    torch.set_num_threads(THREADS)
    config = preset(SIZE)
    v = config.vision
    vision_config = SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps, vision_use_head=False, hidden_act="gelu_pytorch_tanh",
    )
    hf_config = Gemma3Config(text_config={"hidden_size": config.hidden_size}, vision_config=vision_config.to_dict(),
                             mm_tokens_per_image=v.mm_tokens_per_image)
    checkpoint = RandomCheckpoint(config)
    t0 = time.perf_counter()
    with torch.device("meta"):  # weights come from the same random checkpoint as our export
        tower = SiglipVisionModel._from_config(hf_config.vision_config, attn_implementation="eager")
        projector = Gemma3MultiModalProjector(hf_config)
    for module, prefix in ((tower, "model.vision_tower."), (projector, "model.multi_modal_projector.")):
        module.load_state_dict({name: checkpoint.tensor(hf_to_ours(prefix + name)) for name in module.state_dict()},
                               assign=True)
    # position_ids is a non-persistent buffer: built on meta and absent from the state dict, so make it here
    # (left on meta it silently wrecked the features: 0.165 relative RMS off the reference in the first run)
    embeddings = tower.embeddings if hasattr(tower, "embeddings") else tower.vision_model.embeddings
    embeddings.position_ids = torch.arange(embeddings.position_embedding.num_embeddings)[None]
    if any(t.is_meta for m in (tower, projector) for t in [*m.parameters(), *m.buffers()]):
        raise AssertionError("transformers' vision tower still has meta tensors")
    tower.eval()
    projector.eval()
    load_s = time.perf_counter() - t0

    @torch.no_grad()
    def run(pixels):  # Gemma3Model.get_image_features
        return projector(tower(pixel_values=torch.from_numpy(pixels)).last_hidden_state).numpy()

    out = _timed(run, np.load(job["pixels"]), job["repeats"])
    np.save(job["features"], out.pop("features"))
    return {**out, "load_s": load_s}


# --- parent -----------------------------------------------------------------------------------------------


def pan_and_scan_rows(repeats: int = 5) -> list[dict[str, Any]]:
    import numpy as np

    from gemma3.runtime.images import prepare_images

    rows, rng = [], np.random.default_rng(0)
    for width, height in PAN_AND_SCAN_SIZES:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        row: dict[str, Any] = {"width": width, "height": height}
        for key, pan in (("plain_ms", False), ("pan_and_scan_ms", True)):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                pixels, crops = prepare_images([image], pan_and_scan=pan)
                times.append(1000 * (time.perf_counter() - t0))
            row[key] = round(statistics.median(times), 1)
            if pan:
                row["crops"], row["images_to_encode"] = crops[0], len(pixels)
        rows.append(row)
    return rows


def markdown(results: list[dict[str, Any]], pan: list[dict[str, Any]], repeats: int) -> str:
    ref = next((r for r in results if r["name"] == REFERENCE), None)
    ours = next((r for r in results if r["name"] == "ours int8 block 128 (ORT)"), None)
    lines = [
        f"SigLIP + projector (Gemma 3 {SIZE} vision config: 896x896, 27 layers, hidden 1152; random weights), one "
        f"image per call, {THREADS} threads, median of {repeats} after a warm-up. Feature error against "
        "transformers eager fp32 on the same weights and pixels (max abs and relative RMS).",
        "",
        "| system | ms / image | vs transformers | weights MB | peak RSS MB | max abs diff | rel RMS diff "
        "| other CPU load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        speedup = f"{ref['ms_per_image'] / r['ms_per_image']:.2f}x" if ref else "-"
        diffs = "reference | reference" if r is ref else f"{r['max_abs_diff']:.2e} | {r['rel_rms_diff']:.2e}"
        lines.append(f"| {r['name']} | {r['ms_per_image']:.0f} | {speedup} | {r.get('weights_mb', '-')} "
                     f"| {r['peak_rss_mb']:.0f} | {diffs} | {100 * r['foreign_cpu_share']:.0f}% |")
    lines += [
        "", "Pan & Scan preprocessing (`gemma3.runtime.images.prepare_images`, random RGB images, median of 5): "
        "crops per image and the time to produce all pixel values; each crop is one more image to encode.", "",
        "| image (w x h) | crops | images to encode | preprocessing ms (plain) | preprocessing ms (Pan & Scan) "
        "| + vision ms (int8, per image x count) |",
        "|---|---|---|---|---|---|",
    ]
    for p in pan:
        vision = f"{p['images_to_encode'] * ours['ms_per_image']:.0f}" if ours else "-"
        lines.append(f"| {p['width']} x {p['height']} | {p['crops']} | {p['images_to_encode']} | {p['plain_ms']} "
                     f"| {p['pan_and_scan_ms']} | {vision} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--quiet-wait", type=float, default=600, help="seconds to wait for an idle CPU per system")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    wait_until_quiet(args.quiet_wait)
    pan = pan_and_scan_rows()
    results = []
    with tempfile.TemporaryDirectory(prefix="gemma3-vision-bench-") as tmp:
        pixels = Path(tmp) / "pixels.npy"
        np.save(pixels, np.random.default_rng(0).uniform(-1, 1, (1, 3, 896, 896)).astype(np.float32))
        for name, (mode, weights) in SYSTEMS.items():
            job = {"pixels": str(pixels), "features": str(Path(tmp) / f"{mode}-{weights}.npy"), "repeats": args.repeats}
            if weights:
                job["folder"] = str(export_dir(weights))
            wait_until_quiet(args.quiet_wait)
            print(f"measuring {name}", file=sys.stderr)
            r = {"name": name, **run_child(sys.executable, "bench.vision", mode, job)}
            if weights:
                manifest = json.loads((Path(job["folder"]) / "manifest.json").read_text())
                r["weights_mb"], r["note"] = round(manifest["weights_bytes"] / 2**20), manifest["note"]
            r["features"] = job["features"]
            results.append(r)
        reference = np.load(next(r["features"] for r in results if r["name"] == REFERENCE))
        for r in results:
            diff = np.load(r.pop("features")) - reference
            r["max_abs_diff"] = float(f"{np.abs(diff).max():.2e}")
            r["rel_rms_diff"] = float(f"{np.sqrt(np.mean(diff**2) / np.mean(reference**2)):.2e}")
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"size": SIZE, "threads": THREADS, "repeats": args.repeats, "results": results, "pan_and_scan": pan}
    (args.out / "vision.json").write_text(json.dumps(payload, indent=1) + "\n")
    table = markdown(results, pan, args.repeats)
    (args.out / "vision-table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("ort", "transformers"):
        child_main({"ort": ort_child, "transformers": transformers_child})
    else:
        sys.exit(main())
