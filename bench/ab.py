"""Interleaved decode rounds: our public API against each peer's own native generation loop.

    python -m bench.ab [--precision int8-head4-fast] [--rounds 4] [--no-llamacpp]

Each system runs as its users run it (`bench.common.measure_native`): onnxruntime-genai through
`generate_next_token` (greedy inside genai, a tokenizer stream per token), llama.cpp through llama-cpp-python's
`generate` loop (temperature 0) with `detokenize`, ours through `load(dir).stream(...)`. Ours is also timed as
the raw step loop (`OrtDecoder.step` + argmax), to show what the generation loop costs on top of the graph.

On a shared machine decode rates drift by 10-20% over minutes, more than the gap between two close systems, so
every round runs all systems back to back, in the reverse order every other round, and the drift cancels in the
per-round ratios. Prints each round, then the median, min and max of each ratio; writes
bench/results/ab-<precision>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench import ours, peers
from bench.common import peers_python, run_child, stream_bandwidth

RESULTS = Path(__file__).resolve().parent / "results"


def weight_bytes(name: str, job: dict) -> int | None:
    """Bytes of weights a system reads per decoded token: its weights files on disk."""
    if name == "llama.cpp":
        return Path(job["gguf"]).stat().st_size
    folder = Path(job["model_dir"])
    files = [*folder.glob("*.onnx.data")] if name == "genai" else [folder / "decoder.onnx.data"]
    return sum(f.stat().st_size for f in files if f.exists()) or None


def _systems(precision: str, inputs: peers.BenchInputs, llamacpp: bool) -> dict[str, tuple[str, str, str, dict]]:
    """name -> (python, module, mode, job)."""
    ours_job = inputs.job(model_dir=str(ours.export_dir(precision, inputs.gguf)))
    systems = {
        "genai": (sys.executable, "bench.peer_genai", "native", inputs.job(model_dir=str(peers.build_genai()[0]))),
        "ours": (sys.executable, "bench.ours", "native", ours_job),
        "ours-step-loop": (sys.executable, "bench.ours", "speed", ours_job),
    }
    if llamacpp:
        systems["llama.cpp"] = (str(peers_python()), "bench.peer_llamacpp", "native", inputs.job())
    return systems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="int8-head4-fast", choices=ours.PRECISIONS)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp (its venv compiles ~9 min)")
    args = parser.parse_args()

    from gemma3.graphs.loaders.embedded import embedded_270m_gguf

    inputs = peers.load_inputs(embedded_270m_gguf())
    systems = _systems(args.precision, inputs, not args.no_llamacpp and peers_python().exists())
    names = list(systems)
    rounds = []
    for index in range(args.rounds):
        order = names if index % 2 == 0 else names[::-1]
        rates, shares = {}, {}
        for name in order:
            python, module, mode, job = systems[name]
            out = run_child(python, module, mode, job)
            rates[name], shares[name] = out["decode_tok_s"], out["foreign_cpu_share"]
        ratios = {f"ours/{peer}": rates["ours"] / rates[peer] for peer in names if peer != "ours"}
        rounds.append({"rates": rates, "foreign_cpu_share": shares, "ratios": ratios})
        print(f"round {index + 1}: " + ", ".join(f"{n} {rates[n]:.1f}" for n in names) + " tok/s; "
              + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()), flush=True)
    summary: dict = {"precision": args.precision, "decode_tokens_per_run": 128, "prompt_tokens": len(inputs.prompt),
                     "rounds": rounds, "ratios": {}}
    for key in rounds[0]["ratios"]:
        values = [r["ratios"][key] for r in rounds]
        summary["ratios"][key] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                                  "per_round": values}
        print(f"{key}: median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f}) "
              f"over {len(values)} rounds")
    bandwidth = stream_bandwidth()
    summary["stream_bandwidth_gb_s"] = bandwidth / 1e9
    summary["bandwidth_fraction"] = {}
    print(f"streaming bandwidth (1 GiB numpy copy, 2 threads, read + write): {bandwidth / 1e9:.2f} GB/s")
    for name in names:
        nbytes = weight_bytes(name, systems[name][3])
        if nbytes is None:
            continue
        rate = statistics.median(r["rates"][name] for r in rounds)
        fraction = nbytes * rate / bandwidth
        summary["bandwidth_fraction"][name] = {"weight_bytes": nbytes, "decode_tok_s": rate, "fraction": fraction}
        print(f"{name}: {nbytes / 2**20:.0f} MiB of weights per token x {rate:.1f} tok/s = "
              f"{nbytes * rate / 1e9:.2f} GB/s, {100 * fraction:.0f}% of the streaming bandwidth")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ab-{args.precision}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
