"""Prompt prefill in steps, shared by the decoder backends (ONNX Runtime, TensorRT).

Each backend says how a prompt is cut (`chunks`: at most its step size, images kept whole) and runs one step
(`step`); this checks the prompt once, feeds the steps in order and hands each step the rows of its image soft
tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def prefill_in_steps(decoder: Any, cache: Any, ids: np.ndarray | list[int],
                     image_features: np.ndarray | None = None) -> np.ndarray:
    """The last step's logits. `image_features` [rows, hidden]: the rows of every image soft token in `ids`."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError("nothing to prefill")
    cache.reserve(ids.size)  # checks room before anything runs; a growing cache grows once, not chunk by chunk
    image = decoder.manifest.model.image_token_id if decoder.sees_images else None
    rows = int((ids == image).sum()) if image is not None else 0
    given = 0 if image_features is None else len(image_features)
    if rows != given:
        raise ValueError(f"the prompt has {rows} image soft tokens but {given} image feature rows")
    logits, used = None, 0
    for start, end in decoder.chunks(ids):
        chunk = ids[start:end]
        n = int((chunk == image).sum()) if image is not None else 0
        logits = decoder.step(cache, chunk, image_features[used:used + n] if n else None)
        used += n
    return logits
