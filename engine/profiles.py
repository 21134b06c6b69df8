"""Optimization profiles of the engines, as plain data from the export's manifest (no TensorRT here).

The decoder engine has two profiles over the same weights:
  - prefill (profile 0): batch 1..max_batch, new tokens 1..max_chunk (a chunk holding an image needs >= 256);
  - decode (profile 1): batch 1..max_batch, one new token per sequence.
Caches are fixed per layer: local layers a ring of exactly `window` rows, global layers `max_context` rows (the
runtime allocates them once, so a CUDA graph of the decode step never sees an address change). The plugin's
workspace input has a static shape (sized for the export's --max-batch) and needs no profile.
"""

from __future__ import annotations

from typing import Any

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)

PREFILL, DECODE = "prefill", "decode"
IMAGE_TOKENS = 256  # soft tokens per image (every Gemma 3 vision size)


def check_limits(manifest: dict[str, Any], max_batch: int, max_context: int, max_chunk: int) -> None:
    """The engine can serve at most what the graphs were exported for; one line per violation."""
    exported_batch, exported_context = manifest["engine"]["max_batch"], manifest["engine"]["max_context"]
    if not 1 <= max_batch <= exported_batch:
        raise ValueError(f"--max-batch {max_batch}: the export was sized for 1..{exported_batch} sequences "
                         "(its attention workspace); re-export with a larger --max-batch")
    if not 2 <= max_context <= exported_context:
        raise ValueError(f"--max-context {max_context}: between 2 and the export's {exported_context}")
    if not 1 <= max_chunk <= max_context:
        raise ValueError(f"--max-chunk {max_chunk}: between 1 and --max-context {max_context}")
    if "image_features" in manifest["decoder"] and max_chunk < IMAGE_TOKENS:
        raise ValueError(f"--max-chunk {max_chunk}: a multimodal decoder step holds whole images, "
                         f"so chunks need at least {IMAGE_TOKENS} tokens")


def decoder_profiles(manifest: dict[str, Any], max_batch: int, max_context: int, max_chunk: int
                     ) -> dict[str, Profile]:
    """Shapes of every dynamic decoder input, per profile."""
    check_limits(manifest, max_batch, max_context, max_chunk)
    io, model = manifest["decoder"], manifest["model"]
    kv_heads, head_dim = model["num_kv_heads"], model["head_dim"]
    profiles: dict[str, Profile] = {}
    for name, (tokens_opt, tokens_max) in {PREFILL: (max_chunk, max_chunk), DECODE: (1, 1)}.items():
        batch_opt = 1 if name == PREFILL else max_batch  # prefill runs one sequence at a time; decode batches
        p: Profile = {
            io["input_ids"]: ((1, 1), (batch_opt, tokens_opt), (max_batch, tokens_max)),
            io["past_len"]: ((1,), (batch_opt,), (max_batch,)),
        }
        for layer in io["layers"]:
            rows = layer["window"] or max_context
            for key in ("past_key", "past_value"):
                p[layer[key]] = ((1, kv_heads, rows, head_dim), (batch_opt, kv_heads, rows, head_dim),
                                 (max_batch, kv_heads, rows, head_dim))
        if "image_features" in io:  # rows = image soft tokens in the step; 0 on text steps
            hidden = model["hidden_size"]
            most = tokens_max if name == PREFILL else 0
            opt = min(IMAGE_TOKENS, most)
            p[io["image_features"]] = ((0, hidden), (opt, hidden), (most, hidden))
        profiles[name] = p
    return profiles


def vision_profile(manifest: dict[str, Any], max_images: int) -> Profile:
    """pixel_values [images, 3, size, size]: 1..max_images per call (Pan & Scan gives up to 1 + crops)."""
    if max_images < 1:
        raise ValueError(f"--max-images {max_images}: at least 1")
    size = manifest["vision"]["image_size"]
    name = manifest["vision"]["pixel_values"]
    return {name: ((1, 3, size, size), (1, 3, size, size), (max_images, 3, size, size))}
