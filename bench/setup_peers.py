"""Install the peers outside git: llama-cpp-python in its own cached venv, onnxruntime-genai in this one.

    python -m bench.setup_peers

- llama-cpp-python has no wheel for this platform on PyPI: pip compiles llama.cpp from the sdist
  (about 9 minutes on 2 cores). It gets a venv of its own under the project cache so a rebuild never
  touches the project's venv and the compiled wheel survives `make clean`.
- onnxruntime-genai 0.18 wants onnxruntime >= 1.31, which the project venv already has, and its model
  builder needs torch + transformers from that venv: so it is installed there.
Both steps are skipped when already done. Failures are reported, not raised: the bench skips that peer.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import time

from bench.common import peers_python

LLAMA_CPP = "llama-cpp-python==0.3.36"
GENAI = "onnxruntime-genai==0.18.0"

log = logging.getLogger(__name__)


def _run(cmd: list[str]) -> tuple[bool, str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def ensure_llama_cpp() -> str | None:
    """None when ready, else why not."""
    python = peers_python()
    if python.exists() and _run([str(python), "-c", "import llama_cpp"])[0]:
        return None
    venv = python.parent.parent
    if not python.exists():
        ok, out = _run([sys.executable, "-m", "venv", str(venv)])
        if not ok:
            return f"cannot create {venv}: {out[-300:]}"
    log.info("compiling %s into %s (about 9 minutes on 2 cores)", LLAMA_CPP, venv)
    t0 = time.perf_counter()
    ok, out = _run([str(python), "-m", "pip", "install", "-q", LLAMA_CPP, "numpy"])
    if not ok:
        return f"pip install {LLAMA_CPP} failed: {out[-500:]}"
    log.info("llama-cpp-python installed in %.0f s", time.perf_counter() - t0)
    return None


def ensure_genai() -> str | None:
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        return None
    ok, out = _run([sys.executable, "-m", "pip", "install", "-q", GENAI])
    return None if ok else f"pip install {GENAI} failed: {out[-500:]}"


def ensure_all() -> dict[str, str | None]:
    return {"llama.cpp": ensure_llama_cpp(), "onnxruntime-genai": ensure_genai()}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for peer, problem in ensure_all().items():
        print(f"{peer}: {'ready' if problem is None else problem}")
