"""The `gguf` package's reader, made fast to open on a 262144-entry vocabulary."""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

_DTYPES: dict[tuple[Any, str], np.dtype] = {}


class FastGGUFReader(gguf.GGUFReader):
    """GGUFReader that slices a plain ndarray view of its memory map instead of the `np.memmap` itself.

    The reader makes one small array per element of every metadata array (3 x 262144 for Gemma's
    vocabulary); slicing an `np.memmap` runs Python-level `__array_finalize__` each time, which makes
    opening the file take ~15 s. A plain view of the same mapping gives identical arrays in ~2 s. If a
    future gguf renames `_get`, this override is simply unused and we fall back to the slow path.
    """

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        order = self.byte_order if override_order is None else override_order
        dt = _DTYPES.get((dtype, order))
        if dt is None:
            dt = _DTYPES[dtype, order] = np.dtype(dtype).newbyteorder(order)
        return plain[offset : offset + dt.itemsize * int(count)].view(dt)
