"""`gemma3-build MODEL_DIR`: TensorRT engines from a `gemma3-export --target tensorrt` folder, on the GPU machine."""

from __future__ import annotations

import logging
import sys

import click

from gemma3.engine.build import BuildError, build_engines


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--max-batch", type=int, default=None,
              help="Most sequences per step (default and ceiling: the export's --max-batch).")
@click.option("--max-context", type=int, default=None,
              help="Longest conversation in tokens (default and ceiling: the export's --max-context).")
@click.option("--max-chunk", type=int, default=None,
              help="Most prompt tokens per prefill step (default 512, or the max context if smaller; at least 256 "
                   "for image prompts).")
@click.option("--max-images", type=int, default=5, show_default=True,
              help="Most images per vision call (1 + Pan & Scan crops).")
@click.option("--workspace-gib", type=float, default=4.0, show_default=True,
              help="TensorRT's scratch memory limit while building.")
@click.option("--force", is_flag=True, help="Rebuild over an existing engines/ folder (its timing cache is reused).")
@click.option("-v", "--verbose", is_flag=True, help="Debug lines.")
def main(model_dir, max_batch, max_context, max_chunk, max_images, workspace_gib, force, verbose):
    """Build MODEL_DIR/engines/ (decoder.engine, vision.engine for multimodal sizes, engines.json).

    Needs TensorRT >= 10.9 and the NVIDIA GPU the engines will run on (an engine is specific to its GPU
    architecture and TensorRT version; the runtime checks both). fp8 exports need sm_89 or newer.
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("gemma3").setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        out = build_engines(model_dir, max_batch, max_context, max_chunk, max_images, workspace_gib, force)
    except (BuildError, ValueError) as e:
        click.echo(f"gemma3-build: {e}", err=True)
        sys.exit(2)
    click.echo(str(out))


if __name__ == "__main__":
    main()
