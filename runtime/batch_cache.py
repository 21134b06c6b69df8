"""The caches of several sequences in one buffer per layer, for batched decode steps (runtime/batching.py).

Every layer's key and value buffers are [slots, kv_heads, C, head_dim]: row b is one sequence's cache, laid out
exactly as a one-sequence `KVCache` (kv_cache.py): local layers a fixed capacity that GroupQueryAttention compacts
per sequence, global layers row j = position j. The graph takes them as one batch, so they must share one C.
- A decode step over the sequences in rows [0, B) binds rows [0, B) of every buffer: a contiguous view, wrapped
  (not copied) by an OrtValue that is the layer's past input and present output, as kv_cache.py does.
- A sequence being prefilled runs the decoder's own one-sequence path on a `SlotCache`: its row as [1, ...] views
  behind the `KVCache` interface (`OrtDecoder.step` and `prefill` take it unchanged, image steps included).
- Memory grows with use, never preallocated for max_context x max_batch: global rows double (capped at
  max_context) when the longest sequence needs more, slots double (capped at max_batch) as sequences join; either
  copies what is held once. `reset` drops back to the smallest buffers when the engine runs empty.
- The engine keeps its sequences packed in rows [0, n); `move` copies a row to fill the hole a finished one left.
Cost of one shared C: every slot has the longest sequence's global rows (270M fp32: 6 KiB per row and slot, so
8 slots beside one 32K-token conversation hold 1.5 GiB of global rows where alone it would hold 0.19 GiB).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort

from gemma3.runtime.kv_cache import DEFAULT_GLOBAL_CAPACITY, check_room, grown_capacity, round_capacity
from gemma3.runtime.manifest import GLOBAL, DecoderSpec

Binding = tuple[str, str, ort.OrtValue]  # (past input, present output, the value bound to both)
_SERIALS = itertools.count(1 << 40)  # apart from kv_cache's serials: OrtDecoder tells caches apart by them


class BatchCache:
    """Key/value buffers [slots, kv_heads, C, head_dim] for every layer of a decoder graph with a batch axis."""

    def __init__(self, spec: DecoderSpec, num_kv_heads: int, head_dim: int, max_context: int, max_slots: int,
                 initial_rows: int = DEFAULT_GLOBAL_CAPACITY) -> None:
        self.max_context, self.max_slots = max_context, max_slots
        self.version = 0  # bumped whenever buffers are replaced or a row moves: cached views are then stale
        self._spec, self._heads, self._dim = spec, num_kv_heads, head_dim
        self._dtype = np.dtype(spec.cache_dtype)
        self._has_global = any(layer.kind == GLOBAL for layer in spec.layers)
        self.initial_rows = round_capacity(initial_rows, max_context)
        self._views: dict[tuple[int, int], list[Binding]] = {}
        self._allocate(1, self.initial_rows)

    def _allocate(self, slots: int, rows: int) -> None:
        old = getattr(self, "arrays", None)
        arrays: list[np.ndarray] = []  # per layer: key, value
        for i, layer in enumerate(self._spec.layers):
            capacity = rows if layer.kind == GLOBAL else layer.capacity
            for kind in range(2):
                array = np.zeros((slots, self._heads, capacity, self._dim), self._dtype)
                if old is not None:
                    prev = old[2 * i + kind]
                    n, c = min(prev.shape[0], slots), min(prev.shape[2], capacity)
                    array[:n, :, :c] = prev[:n, :, :c]
                arrays.append(array)
        self.arrays, self.slots, self.global_rows = arrays, slots, rows  # swapped at once: stats() may read them
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self._views.clear()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def reserve(self, rows: int, slots: int) -> bool:
        """Room for `slots` sequences of up to `rows` positions; True if the buffers were reallocated."""
        check_room(rows, 0, self.max_context)
        if slots > self.max_slots:
            raise ValueError(f"{slots} sequences asked of a cache for {self.max_slots}")
        new_rows = grown_capacity(self.global_rows, rows, self.max_context) if self._has_global else self.global_rows
        new_slots = self.slots
        while new_slots < slots:
            new_slots = min(2 * new_slots, self.max_slots)
        if (new_rows, new_slots) == (self.global_rows, self.slots):
            return False
        self._allocate(new_slots, new_rows)
        return True

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` (every layer, keys and values) over row `dst`."""
        for array in self.arrays:
            array[dst] = array[src]
        self._changed()

    def reset(self) -> None:
        """Back to one slot and the initial global rows (nothing is held)."""
        self._allocate(1, self.initial_rows)

    def bindings(self, start: int, stop: int) -> list[Binding]:
        """Rows [start, stop) of every buffer as OrtValues over the same memory, past and present alike."""
        key = (start, stop)
        if key not in self._views:
            names = [(layer.past_key, layer.present_key, layer.past_value, layer.present_value)
                     for layer in self._spec.layers]
            views = []
            for i, (pk, ok, pv, ov) in enumerate(names):
                for (past, present), array in (((pk, ok), self.arrays[2 * i]), ((pv, ov), self.arrays[2 * i + 1])):
                    views.append((past, present, ort.OrtValue.ortvalue_from_numpy(array[start:stop])))
            self._views[key] = views
        return self._views[key]

    def slot(self, row: int) -> SlotCache:
        return SlotCache(self, row)


class SlotCache:
    """One row of a `BatchCache` behind the `KVCache` interface that `OrtDecoder.step` and `prefill` use."""

    def __init__(self, batch: BatchCache, row: int) -> None:
        self.batch, self.row = batch, row
        self.max_context = batch.max_context
        self.length = 0  # positions held: the next step's past_len
        self.serial = next(_SERIALS)

    @property
    def version(self) -> tuple[int, int]:
        return self.batch.version, self.row  # a move or a reallocation makes OrtDecoder bind afresh

    @property
    def nbytes(self) -> int:
        return self.batch.nbytes // max(self.batch.slots, 1)

    @property
    def global_capacity(self) -> int:
        return self.batch.global_rows

    def check_room(self, new_tokens: int) -> None:
        check_room(self.length, new_tokens, self.max_context)

    def reserve(self, new_tokens: int) -> bool:
        self.check_room(new_tokens)
        return self.batch.reserve(self.length + new_tokens, self.row + 1)

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def bindings(self) -> Iterator[Binding]:
        yield from self.batch.bindings(self.row, self.row + 1)

    def key_array(self, layer: int) -> np.ndarray:
        return self.batch.arrays[2 * layer][self.row:self.row + 1]

    def value_array(self, layer: int) -> np.ndarray:
        return self.batch.arrays[2 * layer + 1][self.row:self.row + 1]
