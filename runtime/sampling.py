"""Next-token selection: greedy, temperature, top-k, top-p, min-p and repetition penalty, in numpy.

Each filter is a small pure function over a 1-D logits vector that returns a new vector with the removed
tokens set to -inf; `sample` chains them in transformers' order (repetition penalty, temperature, top-k,
top-p, min-p) and draws from a seeded `numpy.random.Generator`, so a seed reproduces a generation.
After top-k only the survivors are carried on (64 of 262144 with Gemma's defaults), so the per-token cost is
one O(vocab) partition, not a sort of the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

NEG_INF = -np.inf
SEED_LIMIT = 2**63  # seeds are non-negative and fit an int64: any seed can be logged, stored and replayed
# The smallest temperature and repetition penalty: logits are divided by them in float32, and below this a large
# logit (> 3e34) could overflow to inf, which would fail mid-generation ("no token has a finite logit").
MIN_DIVISOR = 1e-4


def _real(value: Any) -> float:
    """`value` as a float for range checks; nan (which fails every comparison) for anything not a real number."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return math.nan
    try:
        return float(value)
    except OverflowError:  # an int beyond float range: out of every range checked here
        return math.inf


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."  # a 400-digit int stays a one-line message


def _check_real(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {_shown(value)}")


def _check_int(name: str, value: Any, low: int, high: int | None, expected: str) -> None:
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not is_int or value < low or (high is not None and value >= high):
        raise ValueError(f"{name} must be {expected}, got {_shown(value)}")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 64  # keep the k most likely tokens (ties at the k-th value kept); 0 = off
    top_p: float = 0.95  # keep the smallest top set whose probability reaches p; 1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (CTRL / transformers rule)
    seed: int | None = None  # None: fresh entropy

    def __post_init__(self) -> None:
        # Each check also rejects nan / inf and non-numbers, so a bad value fails here, not mid-generation.
        t = _real(self.temperature)
        _check_real("temperature", self.temperature, t == 0.0 or MIN_DIVISOR <= t < math.inf,
                    f"0 (greedy) or a finite number >= {MIN_DIVISOR:g}")
        _check_int("top_k", self.top_k, 0, None, "an integer >= 0 (0 = off)")
        _check_real("top_p", self.top_p, 0.0 < _real(self.top_p) <= 1.0, "in (0, 1]")
        _check_real("min_p", self.min_p, 0.0 <= _real(self.min_p) <= 1.0, "in [0, 1]")
        _check_real("repetition_penalty", self.repetition_penalty,
                    MIN_DIVISOR <= _real(self.repetition_penalty) < math.inf,
                    f"a finite number >= {MIN_DIVISOR:g} (1 = off)")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, SEED_LIMIT, "a non-negative integer below 2**63")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def updated(self, overrides: Mapping[str, Any]) -> SamplingParams:
        """A copy with the given fields replaced (None values ignored); unknown names are an error."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64; -inf entries get exactly 0. At least one entry must be finite."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x)
    if not np.isfinite(top):
        raise ValueError("no token has a finite logit")
    e = np.exp(x - top)
    return e / e.sum()


def apply_repetition_penalty(logits: np.ndarray, seen_ids: np.ndarray, penalty: float) -> np.ndarray:
    """Make the tokens in `seen_ids` less likely: positive logits divided by `penalty`, negative multiplied."""
    out = np.array(logits, dtype=np.float32)
    if penalty == 1.0 or len(seen_ids) == 0:
        return out
    ids = np.asarray(seen_ids, dtype=np.int64)
    picked = out[ids]
    out[ids] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    if temperature <= 0:
        raise ValueError("temperature 0 means greedy: take the argmax instead of scaling")
    return np.asarray(logits, dtype=np.float32) / np.float32(temperature)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the tokens whose logit is >= the k-th largest (so ties at the boundary all stay)."""
    x = np.array(logits, dtype=np.float32)
    if k <= 0 or k >= x.size:
        return x
    kth = np.partition(x, x.size - k)[x.size - k]
    x[x < kth] = NEG_INF
    return x


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose total probability is >= p (at least one token)."""
    x = np.array(logits, dtype=np.float32)
    if p >= 1.0:
        return x
    order = np.argsort(-x, kind="stable")
    cumulative = np.cumsum(softmax(x)[order])
    # Token order[i] is kept if the tokens before it hold less than p: the one that crosses p stays.
    keep = np.concatenate(([True], cumulative[:-1] < p))
    x[order[~keep]] = NEG_INF
    return x


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below `min_p` times the most likely token's (which always stays)."""
    x = np.array(logits, dtype=np.float32)
    if min_p <= 0:
        return x
    probs = softmax(x)
    x[probs < min_p * probs.max()] = NEG_INF
    return x


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with the given probabilities (one uniform number per draw)."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(probs) - 1))


def sample(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    seen_ids: np.ndarray | None = None,
) -> int:
    """The next token id from 1-D `logits` (the vocabulary), given the ids already in the context."""
    x = np.asarray(logits, dtype=np.float32).reshape(-1)
    if seen_ids is not None:
        x = apply_repetition_penalty(x, seen_ids, params.repetition_penalty)
    if params.greedy:  # one pass: argmax finds a NaN or an all -inf vector's first entry, which is not finite
        token = int(np.argmax(x))
        if not np.isfinite(x[token]):
            raise ValueError("no token has a finite logit")
        return token
    x = top_k_filter(x, params.top_k)
    candidates = np.flatnonzero(x > NEG_INF)
    if candidates.size == 0:
        raise ValueError("no token has a finite logit")
    # Temperature, top-p and min-p only depend on the surviving values: carry on with those alone.
    y = apply_temperature(x[candidates], params.temperature)
    y = top_p_filter(y, params.top_p)
    y = min_p_filter(y, params.min_p)
    return int(candidates[draw(softmax(y), rng)])


def make_rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)
