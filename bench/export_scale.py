"""Big exports on a small machine: wall time, peak RSS and bytes written, per case, through `gemma3-export`.

    python -m bench.export_scale [--cases 12b-fp8 27b-int4 hf-1b-bf16 hf-4b-bf16 hf-4b-int8] [--out DIR]

Each case is the command a user types, run as a child process; its peak RSS is the kernel's (`wait4`'s
ru_maxrss), not a sample. The budget the exporter is held to: 2 GiB plus the largest tensor in float32 (the
tied table: every tensor is read, converted and quantized in fp32). `hf-*` cases export a real-format source:
a sharded bf16 safetensors folder in transformers' layout written by `bench.make_checkpoint` (random values,
cached under the bench cache), so the safetensors loader is measured, not `RandomCheckpoint`. Output folders are
deleted after measuring. Writes bench/results/export-scale.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import cache_root

RESULTS = Path(__file__).parent / "results"
# name: (size, precision, target, source): source "random" or "hf" (a make_checkpoint folder)
CASES = {
    "12b-fp8": ("12b", "fp8", "tensorrt", "random"),
    "27b-int4": ("27b", "int4", "tensorrt", "random"),
    "hf-1b-bf16": ("1b", "bf16", "tensorrt", "hf"),
    "hf-4b-bf16": ("4b", "bf16", "tensorrt", "hf"),
    "hf-4b-int8": ("4b", "int8", "ort", "hf"),
}


def largest_tensor_fp32(size: str) -> int:
    from gemma3.graphs.config import preset

    config = preset(size)
    return 4 * config.vocab_size * config.hidden_size


def hf_folder(size: str) -> Path:
    folder = cache_root() / "bench" / f"hf-random-{size}"
    if not (folder / "config.json").exists():
        subprocess.run([sys.executable, "-m", "bench.make_checkpoint", "--size", size, "--out", str(folder)],
                       check=True)
    return folder


def run_case(name: str, out_root: Path) -> dict:
    size, precision, target, source = CASES[name]
    out = out_root / name
    command = ["gemma3-export", "--size", size, "--precision", precision, "--target", target, "--out", str(out),
               "--force"]
    command += ["--random-weights"] if source == "random" else ["--checkpoint", str(hf_folder(size))]
    exe = Path(sys.executable).parent / "gemma3-export"
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    child = subprocess.Popen([str(exe), *command[1:]])
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name}: gemma3-export failed ({os.waitstatus_to_exitcode(status)})")
    written = sum(p.stat().st_size for p in out.iterdir())
    shutil.rmtree(out)
    largest = largest_tensor_fp32(size)
    return {"case": name, "command": " ".join(command), "wall_s": round(wall, 1),
            "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 2), "written_gib": round(written / 2**30, 2),
            "largest_tensor_fp32_gib": round(largest / 2**30, 2),
            "rss_budget_gib": round((2 * 2**30 + largest) / 2**30, 2), "cpus": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=cache_root() / "bench" / "export-scale",
                        help="where the exports are written (and deleted after measuring)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "export-scale.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.cases:
        row = run_case(name, args.out)
        results[name] = row
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        print(f"{name}: {row['wall_s'] / 60:.1f} min, peak RSS {row['peak_rss_gib']} GiB (budget "
              f"{row['rss_budget_gib']}), wrote {row['written_gib']} GiB", flush=True)


if __name__ == "__main__":
    main()
