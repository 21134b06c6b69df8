"""gemma3-eval: perplexity of an exported folder under the shared protocol (shared/docs/eval-protocol.md).

    gemma3-eval out/gemma-3-270m --json

The text, windows and arithmetic come from `gemma3.runtime.perplexity`. Each window runs on a fresh cache
through the manifest's `eval_decoder` (all-position logits), in chunks whose negative log-likelihood is summed
as they come, so memory stays at one chunk of logits rather than a whole window's (1 GiB for Gemma's vocabulary).
Exports without an `eval_decoder` fall back to the generation decoder, one scored token per step (slower).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass

from gemma3.runtime.api import load_tokenizer
from gemma3.runtime.cli import HelpFormatter
from gemma3.runtime.manifest import ManifestError, check_files, load_manifest
from gemma3.runtime.ort_decoder import OrtDecoder
from gemma3.runtime.perplexity import EVAL_TARGETS, EVAL_WINDOW, eval_ids, eval_windows, nll, perplexity

log = logging.getLogger("gemma3.runtime.evaluate")
PROG = "gemma3-eval"
EVAL_CHUNK = 256  # positions per step: bounds the [chunk, vocab] logits held at once


@dataclass
class EvalResult:
    perplexity: float
    tokens: int  # targets scored
    nll: float  # their summed negative log-likelihood (nats)
    seconds: float
    tokens_per_s: float
    decoder: str  # the graph file that produced the logits
    precision: str


def window_nll(decoder: OrtDecoder, inputs: list[int], targets: list[int], chunk: int = EVAL_CHUNK) -> float:
    """NLL of one window on a fresh cache: the last len(targets) input positions predict the targets."""
    cache = decoder.new_cache(len(inputs))
    first = len(inputs) - len(targets)  # first scored position
    if first < 0:
        raise ValueError(f"{len(targets)} targets for {len(inputs)} inputs")
    total, start = 0.0, 0
    if decoder.spec.logits == "last":  # one logits row per step: feed the unscored prefix at once, then one by one
        chunk = 1
        if first > 0:
            decoder.prefill(cache, inputs[:first])
            start = first
    while start < len(inputs):
        ids = inputs[start : start + chunk]
        logits = decoder.step(cache, ids)
        logits = logits.reshape(-1, logits.shape[-1])  # [len(ids), vocab]
        lo = max(first - start, 0)
        if lo < len(ids):
            total += nll(logits[lo:], targets[start + lo - first : start + len(ids) - first])
        start += len(ids)
    return total


def evaluate(
    model_dir: str | os.PathLike,
    threads: int | None = None,
    targets: int = EVAL_TARGETS,
    window: int = EVAL_WINDOW,
    chunk: int = EVAL_CHUNK,
) -> EvalResult:
    manifest = load_manifest(model_dir)
    check_files(manifest, eval_decoder=True, generation=False)  # a missing graph or weights file, named up front
    spec = manifest.eval_decoder
    if spec is None:
        log.warning("no eval_decoder in the manifest: scoring one token per step with %s", manifest.decoder.file.name)
        spec = manifest.decoder
    if window + 1 > manifest.max_context:
        raise ValueError(f"a window of {window} (+ bos) does not fit the model's context of {manifest.max_context}")
    tokenizer = load_tokenizer(manifest)  # a corrupt tokenizer.model: one line naming it
    decoder = OrtDecoder(manifest, spec, threads=threads, chunk_size=chunk)
    bos = manifest.model.bos_token_id
    windows = eval_windows(eval_ids(tokenizer.encode, bos, targets), bos, window, targets)
    start = time.perf_counter()
    total, count = 0.0, 0
    for k, (inputs, scored) in enumerate(windows):
        total += window_nll(decoder, inputs, scored, chunk)
        count += len(scored)
        log.info("window %d/%d: running perplexity %.4f", k + 1, len(windows), perplexity(total, count))
    seconds = time.perf_counter() - start
    return EvalResult(
        perplexity=perplexity(total, count), tokens=count, nll=total, seconds=seconds,
        tokens_per_s=count / seconds if seconds > 0 else 0.0, decoder=spec.file.name, precision=manifest.precision,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Perplexity of an exported Gemma 3 folder on the shared protocol: pydoc topics, bos + 4096 "
        "targets in 4 windows of 1024, each window on a fresh cache, float64 log-softmax.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", metavar="MODEL_DIR", help="exported model folder (with manifest.json)")
    p.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--targets", type=int, default=EVAL_TARGETS, metavar="N",
                   help="targets scored (fewer for quick checks; the default is the protocol)")
    p.add_argument("--window", type=int, default=EVAL_WINDOW, metavar="N", help="targets per window")
    p.add_argument("--chunk", type=int, default=EVAL_CHUNK, metavar="N", help="positions per decoder step")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    # basicConfig leaves a level set earlier in the process (an embedding program, the exporter's CLI) alone;
    # ours decides -v, which also decides whether ONNX Runtime's own log shows (ort_decoder.session_options).
    logging.getLogger("gemma3").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        if min(args.targets, args.window, args.chunk) < 1 or (args.threads is not None and args.threads < 1):
            raise ValueError("--targets, --window, --chunk and --threads must be positive")
        result = evaluate(args.model, args.threads, args.targets, args.window, args.chunk)
    except (ManifestError, ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens "
              f"({result.decoder}, {result.precision}) in {result.seconds:.1f} s ({result.tokens_per_s:.0f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
