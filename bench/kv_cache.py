"""Theoretical KV-cache size per Gemma 3 preset: full context on every layer vs the hybrid minimum.

Per token per layer a cache holds K and V: 2 * kv_heads * head_dim * bytes. Gemma 3 has 5 local
(sliding-window) layers for every global one, and a local layer never attends further back than its
window W, so its cache needs only min(context, W) positions:

    hybrid = per_token_layer * (global_layers * context + local_layers * min(context, W))
    full   = per_token_layer * num_layers * context     (what a cache unaware of the window allocates)

These are lower bounds for one sequence: real runtimes add slack (ORT's windowed cache keeps W + slack,
llama.cpp rounds to its cell size and may keep a full-size SWA cache).

    python -m bench.kv_cache [--bytes 2] [--contexts 1024 8192 32768]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from gemma3.graphs.config import GLOBAL, PRESETS, Gemma3Config

CONTEXTS = (1024, 8192, 32768)


def per_token_layer_bytes(c: Gemma3Config, elem_bytes: int) -> int:
    return 2 * c.num_kv_heads * c.head_dim * elem_bytes  # K and V


def kv_bytes(c: Gemma3Config, context: int, elem_bytes: int = 2, hybrid: bool = True) -> int:
    n_global = sum(t == GLOBAL for t in c.layer_types)
    n_local = c.num_layers - n_global
    local_positions = min(context, c.sliding_window) if hybrid else context
    return per_token_layer_bytes(c, elem_bytes) * (n_global * context + n_local * local_positions)


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def table(contexts: Sequence[int] = CONTEXTS, elem_bytes: int = 2) -> str:
    """Markdown: per preset and context, full vs hybrid bytes and the saving factor."""
    head = ["model", "layers (local/global)", "window", "per token per layer"]
    for ctx in contexts:
        head += [f"full {ctx // 1024}K", f"hybrid {ctx // 1024}K", "x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, c in PRESETS.items():
        n_global = sum(t == GLOBAL for t in c.layer_types)
        row = [name, f"{c.num_layers} ({c.num_layers - n_global}/{n_global})", str(c.sliding_window)]
        row.append(_human(per_token_layer_bytes(c, elem_bytes)))
        for ctx in contexts:
            full, hybrid = kv_bytes(c, ctx, elem_bytes, hybrid=False), kv_bytes(c, ctx, elem_bytes)
            row += [_human(full), _human(hybrid), f"{full / hybrid:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bytes", type=int, default=2, help="bytes per cached element (2 = fp16/bf16)")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    args = parser.parse_args(argv)
    print(f"KV cache for one sequence, {args.bytes} bytes per element:\n")
    print(table(args.contexts, args.bytes))


if __name__ == "__main__":
    main()
