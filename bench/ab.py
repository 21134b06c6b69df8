"""Interleaved A/B decode comparison of one of our precisions against onnxruntime-genai int4.

    python -m bench.ab [--precision int8-head4-fast] [--rounds 6]

On a shared machine decode rates drift by 10-20% over minutes, more than the gap between two close systems, so
`make bench`'s one-after-the-other runs cannot rank them. Here each round runs both speed children back to back
(the order alternates between rounds), and the drift cancels in the per-round ratio. Prints each round and the
median, min and max of ours / genai, and writes bench/results/ab-<precision>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench import ours, peers
from bench.common import run_child

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="int8-head4-fast", choices=ours.PRECISIONS)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    from gemma3.graphs.loaders.embedded import embedded_270m_gguf

    inputs = peers.load_inputs(embedded_270m_gguf())
    jobs = {
        "genai": ("bench.peer_genai", inputs.job(model_dir=str(peers.build_genai()[0]))),
        "ours": ("bench.ours", inputs.job(model_dir=str(ours.export_dir(args.precision, inputs.gguf)))),
    }
    rounds = []
    for index in range(args.rounds):
        order = ["genai", "ours"] if index % 2 == 0 else ["ours", "genai"]
        rates = {}
        for name in order:
            module, job = jobs[name]
            rates[name] = run_child(sys.executable, module, "speed", job)["decode_tok_s"]
        rates["ratio"] = rates["ours"] / rates["genai"]
        rounds.append(rates)
        print(f"round {index + 1}: genai {rates['genai']:.1f}, ours {args.precision} {rates['ours']:.1f} tok/s, "
              f"ratio {rates['ratio']:.3f}", flush=True)
    ratios = [r["ratio"] for r in rounds]
    summary = {"precision": args.precision, "rounds": rounds, "median_ratio": statistics.median(ratios),
               "min_ratio": min(ratios), "max_ratio": max(ratios)}
    print(f"ours {args.precision} / genai decode: median {summary['median_ratio']:.3f} "
          f"(min {summary['min_ratio']:.3f}, max {summary['max_ratio']:.3f}) over {len(ratios)} rounds")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ab-{args.precision}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
