"""The perplexity protocol (shared/docs/eval-protocol.md) in one place, so every precision and every peer
is scored on the same tokens with the same arithmetic.

- Text: every `pydoc_data.topics` topic, sorted by key, joined with blank lines (stdlib, on every machine).
- Tokens: the model's tokenizer with bos prepended; the first 4097 ids give 4096 targets.
- Windows of 1024 targets, no overlap. Window 0 feeds `ids[0:1024]` (it starts with bos) and scores
  `ids[1:1025]`. Window k >= 1 feeds `[bos] + ids[1024k : 1024k + 1024]` and scores
  `ids[1024k + 1 : 1024k + 1025]`: the prediction made at the inserted bos is dropped, so each window
  scores exactly 1024 targets and every target is predicted with at least one real token of context.
- Alignment rule for both cases: the targets belong to the LAST `len(targets)` positions of a window's
  logits (position i predicts the token after input i). `window_nll` applies it.
- Perplexity = exp(mean NLL over the 4096 targets); log-softmax in float64.

numpy and the stdlib only: this runs on a serving box without torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

EVAL_WINDOW = 1024  # targets per window
EVAL_TARGETS = 4096  # targets in all (4 windows)
_ROWS_PER_CHUNK = 128  # float64 log-softmax over a 262144 vocabulary is 2 MiB per row: bound the temporary


def eval_text() -> str:
    """The evaluation text: all pydoc topics, sorted by name, joined with a blank line."""
    from pydoc_data import topics  # imported here: ~0.5 MB of strings nobody else needs

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def eval_ids(encode: Callable[[str], Sequence[int]], bos_id: int = 2, targets: int = EVAL_TARGETS) -> list[int]:
    """`[bos] + encode(eval_text())`, cut to `targets + 1` ids. `encode` must NOT add bos itself."""
    ids = [bos_id, *encode(eval_text())]
    if len(ids) < targets + 1:
        raise ValueError(f"the eval text gave {len(ids)} ids, fewer than the {targets + 1} the protocol needs")
    if ids[1] == bos_id:
        raise ValueError("encode() added its own bos: pass an encoder without special tokens")
    return ids[: targets + 1]


def eval_windows(
    ids: list[int], bos_id: int = 2, window: int = EVAL_WINDOW, targets: int = EVAL_TARGETS
) -> list[tuple[list[int], list[int]]]:
    """(input ids fed, target ids scored) for each window; see the module docstring for the layout.

    `ids` starts with bos and holds at least `targets + 1` ids. Window 0's inputs are `window` long,
    later windows' `window + 1` (the re-inserted bos); every window scores `window` targets, which line up
    with the last `window` positions of its logits.
    """
    if targets % window:
        raise ValueError(f"targets ({targets}) must be a multiple of the window ({window})")
    if len(ids) < targets + 1:
        raise ValueError(f"need {targets + 1} ids (bos + {targets} targets), got {len(ids)}")
    if ids[0] != bos_id:
        raise ValueError(f"ids must start with bos ({bos_id}), got {ids[0]}")
    out: list[tuple[list[int], list[int]]] = []
    for k in range(targets // window):
        start = k * window
        # Window 0 already begins with the real bos; later windows get one so the model is not
        # conditioned on a mid-sentence first token it never saw in training.
        inputs = list(ids[start : start + window]) if k == 0 else [bos_id, *ids[start : start + window]]
        out.append((inputs, list(ids[start + 1 : start + window + 1])))
    return out


def nll(logits: np.ndarray, targets: Sequence[int]) -> float:
    """Sum of -log softmax(logits[i])[targets[i]] over i, computed in float64.

    `logits` has one row per target, shape [len(targets), vocab] (any float dtype, any leading batch of 1
    squeezed away by the caller).
    """
    logits = np.asarray(logits)
    tgt = np.asarray(targets, dtype=np.int64)
    if logits.ndim != 2 or logits.shape[0] != tgt.shape[0]:
        raise ValueError(f"logits {logits.shape} do not give one row per target ({tgt.shape[0]})")
    total = 0.0
    for lo in range(0, tgt.shape[0], _ROWS_PER_CHUNK):
        rows = logits[lo : lo + _ROWS_PER_CHUNK].astype(np.float64)
        t = tgt[lo : lo + _ROWS_PER_CHUNK]
        peak = rows.max(axis=-1, keepdims=True)  # subtract the max so exp() cannot overflow
        lse = np.log(np.exp(rows - peak).sum(axis=-1)) + peak[:, 0]
        total += float((lse - rows[np.arange(t.shape[0]), t]).sum())
    return total


def window_nll(logits: np.ndarray, targets: Sequence[int]) -> float:
    """NLL of one window from the logits of ALL its input positions ([len(inputs), vocab], or [1, ...]).

    Keeps the last len(targets) rows: that drops the prediction at the re-inserted bos of windows k >= 1.
    """
    logits = np.asarray(logits)
    if logits.ndim == 3:
        logits = logits[0]
    return nll(logits[-len(targets) :], targets)


def perplexity(total_nll: float, count: int) -> float:
    """exp(mean NLL)."""
    if count <= 0:
        raise ValueError("perplexity of zero targets")
    return math.exp(total_nll / count)


def evaluate(
    windows: Sequence[tuple[list[int], list[int]]], logits_fn: Callable[[list[int]], np.ndarray]
) -> tuple[float, int]:
    """(total NLL, target count) over the windows; `logits_fn(inputs)` returns logits for every input position.

    Each window is an independent sequence: `logits_fn` must start from an empty cache every call.
    """
    total, count = 0.0, 0
    for inputs, targets in windows:
        total += window_nll(logits_fn(inputs), targets)
        count += len(targets)
    return total, count
