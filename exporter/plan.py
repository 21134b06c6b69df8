"""`gemma3-export --dry-run`: what an export would write and what serving it costs, before anything is written.

Weight bytes come from the exporter's own planning (the decoder traced on the meta device, its weights planned
by the recipe exactly as an export would lay them out, page alignment included), so the plan cannot drift from
the export. KV-cache bytes are arithmetic over the config: local layers hold min(context, W) rows, global layers
every position; "all-global" is the same model if every layer kept the whole context (what a cache without the
hybrid layout would need).
"""

from __future__ import annotations

from gemma3.graphs.config import Gemma3Config

from .recipes import Recipe

CONTEXTS = (8_192, 32_768, 131_072)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8e4m3fn": 1}


def kv_cache_bytes(config: Gemma3Config, context: int, batch: int = 1, dtype: str = "bfloat16",
                   hybrid: bool = True) -> int:
    """Bytes of keys and values for `context` tokens (the one definition of this arithmetic)."""
    per_row = 2 * config.num_kv_heads * config.head_dim * DTYPE_BYTES[dtype]
    rows = sum(min(context, config.window(i)) if (hybrid and config.window(i)) else context
               for i in range(config.num_layers))
    return batch * rows * per_row


def planned_weight_bytes(config: Gemma3Config, recipe: Recipe) -> dict[str, int]:
    """Bytes of decoder.onnx.data (and vision.onnx.data) as an export of `recipe` would write them."""
    from .export import DATA_FILE, _decoder_graph
    from .vision_graph import DATA_FILE as VISION_DATA
    from .vision_graph import trace_vision, vision_precision
    from .weight_pass import plan_weights
    from .weights import WeightPlan

    model, plan = _decoder_graph(config, recipe, all_logits=False)
    sizes = {DATA_FILE: plan.layout(model.graph, ".")}
    if config.vision is not None:
        import torch

        chosen = vision_precision(recipe)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            chosen.compute_dtype]
        vision, vision_plan = trace_vision(config, dtype), WeightPlan(VISION_DATA)
        plan_weights(vision, chosen, vision_plan, {})
        sizes[VISION_DATA] = vision_plan.layout(vision.graph, ".")
    return sizes


def export_plan(config: Gemma3Config, recipe: Recipe, max_context: int, max_batch: int = 1) -> dict:
    """Weights, KV cache at 8K / 32K / 128K (capped at the model's context), and totals, in bytes."""
    cache_dtype = recipe.cache_dtype
    weights = planned_weight_bytes(config, recipe)
    kv = {}
    for context in CONTEXTS:
        if context > config.max_position_embeddings:
            continue
        hybrid = kv_cache_bytes(config, context, max_batch, cache_dtype)
        kv[context] = {"hybrid": hybrid, "all_global": kv_cache_bytes(config, context, max_batch, cache_dtype,
                                                                       hybrid=False),
                       "total_with_weights": sum(weights.values()) + hybrid}
    return {"model": config.name, "target": recipe.target, "precision": recipe.name, "cache_dtype": cache_dtype,
            "max_context": max_context, "max_batch": max_batch, "weights": weights,
            "weights_total": sum(weights.values()), "kv_cache": kv}


def format_plan(plan: dict) -> str:
    gib = 2**30
    lines = [f"gemma3-export plan: {plan['model']}, --target {plan['target']} --precision {plan['precision']} "
             f"(cache {plan['cache_dtype']}, batch {plan['max_batch']}); nothing written"]
    for file, size in plan["weights"].items():
        lines.append(f"  {file:<22} {size / gib:8.2f} GiB")
    lines.append(f"  {'weights total':<22} {plan['weights_total'] / gib:8.2f} GiB")
    lines.append("  KV cache       hybrid (local = window)   all-global    weights + hybrid cache")
    for context, row in plan["kv_cache"].items():
        lines.append(f"  {context // 1024:>4}K tokens   {row['hybrid'] / gib:10.2f} GiB   "
                     f"{row['all_global'] / gib:10.2f} GiB   {row['total_with_weights'] / gib:10.2f} GiB")
    return "\n".join(lines)
