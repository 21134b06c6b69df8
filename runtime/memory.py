"""Keep the weights file's pages out of the process while ONNX Runtime loads a graph.

ONNX Runtime maps each external initializer of `decoder.onnx.data` and prepacks it into memory of its own
(MatMulNBits' packed blocks); the mapped pages it read stay resident until the initializer is released. For a
graph whose weights are used inside an `If` (decoder_multimodal.onnx) that is the end of the session's creation,
so the whole file (4 GiB for a 4B int8) sat in RSS on top of the packed copy: 9.7 GiB peak for 5.2 GiB resident
after. These pages are clean file pages, so `madvise(MADV_PAGEOUT)` on them only drops them from this process
(the kernel reads them again on the next touch: the embedding rows a step looks up, a few norm weights); a thread
does that every `period` seconds while the session is created. No data can be lost: clean pages are never written,
and a range that was meanwhile unmapped or reused is refused or left as it is by the kernel. Outside Linux (no
/proc/self/maps, no MADV_PAGEOUT) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now
_MAPS = Path("/proc/self/maps")


def _madvise() -> Callable[..., int] | None:
    if not _MAPS.exists():
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _madvise()


def mapped_ranges(path: str | os.PathLike) -> list[tuple[int, int]]:
    """[start, end) of every mapping of `path` in this process."""
    target = os.path.realpath(path)
    ranges = []
    try:
        lines = _MAPS.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


def release_pages(path: str | os.PathLike) -> int:
    """Drop this process's resident pages of `path`'s mappings; how many mappings were advised."""
    if _MADVISE is None:
        return 0
    ranges = mapped_ranges(path)
    for start, end in ranges:
        _MADVISE(start, end - start, MADV_PAGEOUT)  # EINVAL (old kernel) / ENOMEM (unmapped since): nothing to do
    return len(ranges)


class PagesReleased:
    """`with PagesReleased(files): session = ort.InferenceSession(...)`: the files' mapped pages are released every
    `period` seconds while the block runs (ONNX Runtime creates sessions without holding the GIL), and at its end."""

    def __init__(self, files: list[Path], period: float = 0.05) -> None:
        self.files = [f for f in files if f.is_file()]
        self.period = period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _release(self) -> None:
        for f in self.files:
            release_pages(f)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self._release()

    def __enter__(self) -> PagesReleased:
        if _MADVISE is not None and self.files:
            self._thread = threading.Thread(target=self._loop, name="release-weight-pages", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._release()
