"""runtime/memory.py: a weights file's mapped pages leave the process's RSS and come back unchanged on reading."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from gemma3.runtime.memory import PagesReleased, mapped_ranges, release_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and MADV_PAGEOUT")


def _file_rss_mib(path: Path) -> float:
    """Resident KiB of this process's mappings of `path`, from /proc/self/smaps, in MiB."""
    resident, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) == 6 and fields[5] == str(path.resolve())
        elif inside and fields[0] == "Rss:":
            resident += int(fields[1])
    return resident / 1024


def test_released_pages_leave_rss_and_read_back_the_same(tmp_path):
    path = tmp_path / "weights.data"
    data = np.random.default_rng(0).integers(0, 255, 32 << 20, dtype=np.uint8)
    data.tofile(path)
    mapped = np.memmap(path, np.uint8, "r")
    assert int(mapped.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page touched
    assert mapped_ranges(path) and _file_rss_mib(path) > 30
    with PagesReleased([path], period=0.01):
        pass
    assert release_pages(path) == len(mapped_ranges(path))
    assert _file_rss_mib(path) < 4
    np.testing.assert_array_equal(mapped, data)  # the kernel reads them again from the file


def test_files_never_mapped_or_missing_are_nothing_to_do(tmp_path):
    assert release_pages(tmp_path / "absent.data") == 0
    with PagesReleased([tmp_path / "absent.data"]):
        pass
