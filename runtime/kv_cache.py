"""The hybrid KV cache: fixed windowed buffers for local layers, growing buffers for global layers.

Every cache tensor is [1, kv_heads, C, head_dim] (BNSH, GroupQueryAttention's layout).
- Local layers: C is the manifest's fixed capacity (>= the window). The op keeps the most recent positions in
  rows [0, L) and compacts internally; the runtime never reads or moves their contents. L depends on the
  position alone (`local_rows`, measured on ONNX Runtime 1.32 and checked by tests/test_speculative.py):
  a step that would pass C keeps the last L(new) - S rows at the top, and rows >= L are never read.
- Rollback (speculative decoding): lowering `length` to y is exact for global layers (rows >= y are rewritten
  before any step reads them) and for a local layer as long as no compaction happened between y and the
  current length (same first position in row 0): then rows [0, L(y)) already hold what a cache fed only up to
  y holds. `rewindable` says how long a step may be for every later rollback into it to stay exact.
- Global layers: row j holds position j, so C must be >= past_len + S for a step of S tokens. They start small
  and grow by doubling (capped at max_context); growing copies rows [0, past_len) once into the new buffer.

Each buffer is a numpy array wrapped (not copied) by an `OrtValue`; the decoder binds that same OrtValue as the
layer's past input and present output, so the op updates the cache in place: no copy per token.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from gemma3.runtime.manifest import GLOBAL, DecoderSpec

log = logging.getLogger(__name__)

DEFAULT_GLOBAL_CAPACITY = 256  # rows a global cache starts with unless told otherwise
CAPACITY_ALIGN = 256  # global capacities are rounded up to a multiple of this (then capped at max_context)


class ContextLengthError(ValueError):
    """The conversation would not fit in the exported context (max_context tokens)."""


@dataclass
class _Buffer:
    array: np.ndarray  # [1, kv_heads, C, head_dim]; the memory the OrtValue wraps
    value: ort.OrtValue

    @classmethod
    def zeros(cls, shape: tuple[int, ...], dtype: np.dtype) -> _Buffer:
        array = np.zeros(shape, dtype=dtype)
        return cls(array, ort.OrtValue.ortvalue_from_numpy(array))


@dataclass
class _LayerCache:
    kind: str
    names: tuple[str, str, str, str]  # past_key, past_value, present_key, present_value
    key: _Buffer
    value: _Buffer

    @property
    def capacity(self) -> int:
        return self.key.array.shape[2]


def check_room(length: int, new_tokens: int, max_context: int) -> None:
    """Raise `ContextLengthError` unless `new_tokens` more positions fit in max_context (every cache kind)."""
    if length + new_tokens > max_context:
        raise ContextLengthError(
            f"{length} tokens in context + {new_tokens} new would exceed the model's context of {max_context} tokens"
        )


def round_capacity(rows: int, max_context: int) -> int:
    """`rows` rounded up to the allocation granularity, capped at max_context."""
    return min(max_context, -(-max(rows, 1) // CAPACITY_ALIGN) * CAPACITY_ALIGN)


def grown_capacity(current: int, needed: int, max_context: int) -> int:
    """Global rows after growing from `current` to hold `needed`: doubled until they do, capped at max_context."""
    capacity = max(current, 1)
    while capacity < needed:
        capacity *= 2
    return round_capacity(capacity, max_context)


def local_rows(past: int, window: int, capacity: int) -> int:
    """Rows [0, L) a GroupQueryAttention sliding-window cache holds after `past` positions: all of them up to
    the capacity, then the op compacts to keep the last window - 1 before appending, so L cycles through
    [window, capacity] with period capacity - window + 1."""
    if past <= capacity:
        return past
    return window + (past - capacity - 1) % (capacity - window + 1)


def local_first(past: int, window: int, capacity: int) -> int:
    """The position held in row 0 after `past` positions (it moves only when the op compacts)."""
    return past - local_rows(past, window, capacity)


_SERIALS = itertools.count()


class KVCache:
    """All layers' cache buffers and the number of positions they hold (`length`)."""

    def __init__(
        self,
        spec: DecoderSpec,
        num_kv_heads: int,
        head_dim: int,
        max_context: int,
        initial_capacity: int = DEFAULT_GLOBAL_CAPACITY,
    ) -> None:
        self.max_context = max_context
        self.length = 0  # positions already in the cache: the next step's past_len
        self.version = 0  # bumped whenever a buffer is replaced, so bindings know to refresh
        self.serial = next(_SERIALS)  # unlike id(), never reused by a later cache once this one is freed
        self._shape = (1, num_kv_heads, head_dim)
        self._dtype = np.dtype(spec.cache_dtype)
        global_capacity = round_capacity(initial_capacity, max_context)
        self.layers: list[_LayerCache] = []
        self.rings = sorted({(layer.window, layer.capacity) for layer in spec.layers
                             if layer.kind != GLOBAL and layer.capacity is not None})  # (W, C) of local layers
        for layer in spec.layers:
            capacity = global_capacity if layer.kind == GLOBAL else layer.capacity
            names = (layer.past_key, layer.past_value, layer.present_key, layer.present_value)
            self.layers.append(_LayerCache(layer.kind, names, self._zeros(capacity), self._zeros(capacity)))

    def _zeros(self, capacity: int) -> _Buffer:
        b, h, d = self._shape
        return _Buffer.zeros((b, h, capacity, d), self._dtype)

    @property
    def global_capacity(self) -> int | None:
        """Rows of the global caches (None for a model without global layers)."""
        caps = [layer.capacity for layer in self.layers if layer.kind == GLOBAL]
        return caps[0] if caps else None

    @property
    def nbytes(self) -> int:
        """Bytes of cache memory currently allocated (keys and values of every layer)."""
        return sum(layer.key.array.nbytes + layer.value.array.nbytes for layer in self.layers)

    def check_room(self, new_tokens: int) -> None:
        check_room(self.length, new_tokens, self.max_context)

    def reserve(self, new_tokens: int) -> bool:
        """Make the global caches hold `length + new_tokens` rows; True if buffers were reallocated."""
        self.check_room(new_tokens)
        needed = self.length + new_tokens
        current = self.global_capacity
        if current is None or needed <= current:
            return False
        capacity = grown_capacity(current, needed, self.max_context)
        log.debug("growing global KV caches from %d to %d rows (%d in use)", current, capacity, self.length)
        for layer in self.layers:
            if layer.kind != GLOBAL:
                continue
            for attr in ("key", "value"):
                old: _Buffer = getattr(layer, attr)
                new = self._zeros(capacity)
                new.array[:, :, : self.length] = old.array[:, :, : self.length]
                setattr(layer, attr, new)
        self.version += 1
        return True

    def advance(self, new_tokens: int) -> None:
        """Record that a step wrote `new_tokens` positions."""
        self.length += new_tokens

    def rewindable(self, length: int, limit: int) -> int:
        """The longest step (<= limit) from `length` after which the cache can roll back exactly to any length
        from length + 1 on: every local ring must not compact after its first token (see the module doc)."""
        steps = limit
        for window, capacity in self.rings:
            first = local_first(length + 1, window, capacity)
            while steps > 1 and local_first(length + steps, window, capacity) != first:
                steps -= 1
        return steps

    def rollback(self, length: int) -> None:
        """Forget the positions from `length` on (rejected speculative tokens), exactly (see the module doc)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back a cache of {self.length} positions to {length}")
        for window, capacity in self.rings:
            if local_first(length, window, capacity) != local_first(self.length, window, capacity):
                raise ValueError(f"a window-{window} ring compacted between positions {length} and {self.length}: "
                                 "rolling back there is not exact")
        self.length = length

    def bindings(self) -> Iterator[tuple[str, str, ort.OrtValue]]:
        """(input name, output name, OrtValue) for every cache tensor: the same value on both sides."""
        for layer in self.layers:
            past_key, past_value, present_key, present_value = layer.names
            yield past_key, present_key, layer.key.value
            yield past_value, present_value, layer.value.value

    def key_array(self, layer: int) -> np.ndarray:
        """The numpy view of a layer's key buffer (for inspection and tests)."""
        return self.layers[layer].key.array

    def value_array(self, layer: int) -> np.ndarray:
        return self.layers[layer].value.array
