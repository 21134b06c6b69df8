"""Continuous batching on the real 270M: engine-level aggregate tokens/s at B = 1, 2, 4, 8.

python -m bench.batching [--model-dir DIR] [--precision fp32] [--threads 2] [--new-tokens 128] [--batches 1 2 4 8]
                         [--long-prompt 1024]

Each round submits B copies of one chat prompt (greedy, no stop ids, `--new-tokens` each) to a `BatchEngine` with
max_batch = B and times from the first submit to the last job's end: aggregate tokens/s = B x new tokens / wall
(prefills included, B of them run one after another between decode steps). For reference it also times the plain
one-sequence loop (runtime/generate.py) on the same prompt, and how long a `--long-prompt` joining three decoding
sequences holds them up, per prefill_chunk. Without --model-dir the GGUF shipped on PyPI is
exported once into the bench cache (`bench.ours.export_dir`, keyed by the exporter's code).
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import THREADS
from bench.ours import export_dir
from gemma3.graphs.loaders.embedded import embedded_270m_gguf
from gemma3.runtime.api import Model, load
from gemma3.runtime.batching import BatchEngine
from gemma3.runtime.generate import GenerationStats, generate
from gemma3.runtime.jobs import Job
from gemma3.runtime.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def engine_round(model: Model, ids: list[int], batch: int, new_tokens: int) -> tuple[float, list[list[int]], int]:
    """(wall seconds, every job's tokens, decode steps) for `batch` jobs of `new_tokens` each."""
    engine = BatchEngine(model, max_batch=batch, max_queue=batch)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    left = [batch]
    done = threading.Event()

    errors: list[BaseException] = []

    def on_done(reason: str, error: BaseException | None) -> None:
        if error is not None:
            errors.append(error)
        left[0] -= 1  # called on the engine's one thread: no race
        if left[0] == 0:
            done.set()

    start = time.perf_counter()
    for i in range(batch):
        engine.submit(Job(ids, GREEDY, new_tokens, frozenset(), lambda t, _, i=i: tokens[i].append(t), on_done))
    done.wait()
    wall = time.perf_counter() - start
    engine.close()
    if errors:
        raise errors[0]
    return wall, tokens, engine.steps


def stall_round(model: Model, ids: list[int], long_ids: list[int], chunk: int) -> tuple[float, float]:
    """Three sequences decode while a fourth with a long prompt joins: (the running ones' longest gap between two
    tokens in seconds, that prompt's time to its first token), with prefill steps of `chunk` tokens."""
    engine = BatchEngine(model, max_batch=4, prefill_chunk=chunk)
    stamps: list[float] = []
    first: list[float] = []
    done = threading.Event()
    ends = [0]

    def on_done(reason: str, error: BaseException | None) -> None:
        ends[0] += 1
        if ends[0] == 4:
            done.set()

    def running(t: int, _: object) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) == 30:  # all three are decoding: the long prompt arrives
            first.append(time.perf_counter())
            engine.submit(Job(long_ids, GREEDY, 2, frozenset(), lambda t, _: first.append(time.perf_counter()),
                              on_done))

    for _ in range(3):
        engine.submit(Job(ids, GREEDY, 60, frozenset(), running, on_done))
    done.wait()
    engine.close()
    gaps = np.diff(sorted(stamps))
    return float(gaps.max()), first[1] - first[0]


def serial_round(model: Model, ids: list[int], new_tokens: int) -> tuple[float, GenerationStats, list[int]]:
    stats = GenerationStats()
    start = time.perf_counter()
    cache = model.decoder.new_cache(len(ids) + new_tokens)
    tokens = [p.token_id for p in generate(model.decoder, cache, ids, GREEDY, new_tokens, stop_ids=(), stats=stats)]
    return time.perf_counter() - start, stats, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--long-prompt", type=int, default=1024,
                        help="tokens of the prompt that joins three decoding sequences (0: skip that measurement)")
    args = parser.parse_args()
    model = load(args.model_dir or export_dir(args.precision, embedded_270m_gguf()), threads=args.threads)
    ids = model.prompt_ids(PROMPT)
    engine_round(model, ids, 1, 8)  # warm-up: sessions' first runs, page faults
    wall, stats, plain = serial_round(model, ids, args.new_tokens)
    print(f"{model.manifest.precision}, {args.threads} threads, prompt {len(ids)} tokens, {args.new_tokens} new each")
    print(f"plain loop (generate.py): {args.new_tokens / wall:7.1f} tok/s end to end, "
          f"decode {stats.decode_tokens_per_s:.1f} tok/s, prefill {stats.prefill_tokens_per_s:.0f} tok/s")
    print(" B   wall s   aggregate tok/s   per sequence tok/s   decode steps   sequences with the plain loop's tokens")
    for batch in args.batches:
        wall, tokens, steps = engine_round(model, ids, batch, args.new_tokens)
        same = sum(t == plain for t in tokens)
        total = batch * args.new_tokens
        print(f"{batch:2d} {wall:8.2f} {total / wall:17.1f} {args.new_tokens / wall:20.1f} {steps:14d}   "
              f"{same}/{batch}", flush=True)
    if args.long_prompt:
        long_ids = (ids * (args.long_prompt // len(ids) + 1))[:args.long_prompt]
        print(f"a {len(long_ids)}-token prompt joins 3 decoding sequences: prefill_chunk, their longest gap between "
              "tokens, its time to first token")
        for chunk in (256, 64):
            gap, ttft = stall_round(model, ids, long_ids, chunk)
            print(f"{chunk:4d} {gap:6.2f} s {ttft:6.2f} s", flush=True)


if __name__ == "__main__":
    main()
