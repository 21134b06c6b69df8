"""Install the peers outside git: llama-cpp-python in its own cached venv, onnxruntime-genai in this one.

    python -m bench.setup_peers

- llama-cpp-python has no wheel for this platform on PyPI: pip compiles llama.cpp from the sdist
  (about 9 minutes on 2 cores, 40 on a busy machine). It gets a venv of its own under the project cache so a
  rebuild never touches the project's venv and the compiled wheel survives `make clean`. It is compiled
  GGML_NATIVE (`-march=native`) but without AMX: see `LLAMA_CPP_FLAGS`.
- onnxruntime-genai 0.18 wants onnxruntime >= 1.31, which the project venv already has, and its model
  builder needs torch + transformers from that venv: so it is installed there.
Both steps are skipped when already done. Failures are reported, not raised: the bench skips that peer.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import peers_python

LLAMA_CPP = "llama-cpp-python==0.3.36"
# -march=native on a CPU with AMX (Sapphire Rapids and later, e.g. the Xeon this bench ran on on 2026-12-06)
# defines __AMX_INT8__, so ggml builds its AMX backend and repacks the Q4_K / Q6_K / Q8_0 weights of the
# 270M into an "AMX" buffer. gcc 12 -O3 drops the stores that fill ggml_tile_config_init's stack tile config
# (libggml-cpu.so: `vmovdqa64 zmm0(=0) -> cfg; movb $1 -> cfg; ldtilecfg cfg`, rows and colsb all 0), so the
# first AMX kernel's `tilezero %tmm4` raises #UD: SIGILL in ggml_backend_amx_mul_mat on the first llama_decode
# of any prompt (reported as a segfault before). Upstream: ggml-org/llama.cpp PR #26954 (open), which moves
# the config to .rodata. The same build runs with use_extra_bufts=False; one compiled with these flags
# (-march=native otherwise unchanged: AVX-512, VNNI, BF16 stay; gcc drops an ISA given as -mno-* whatever
# the order) passes. Changing these flags rebuilds the venv (see _stamp).
LLAMA_CPP_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# llama-cpp-python's `server` extra (its METADATA), installed by name so pip never touches the compiled package:
# `pip install llama-cpp-python[server]` would be satisfied by the installed build, but a changed pin or flags
# would recompile it (~9 minutes). Used by bench.serve (`python -m llama_cpp.server`).
LLAMA_CPP_SERVER = ["uvicorn>=0.22.0", "fastapi>=0.100.0", "pydantic-settings>=2.0.1", "sse-starlette>=1.6.1",
                    "starlette-context>=0.3.6,<0.4", "PyYAML>=5.1"]
GENAI = "onnxruntime-genai==0.18.0"

log = logging.getLogger(__name__)


def _run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[bool, str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def _stamp(python: Path) -> Path:
    """What the peers venv's llama-cpp-python was built as: a build with other flags (an AMX one) is redone."""
    return python.parent.parent / "gemma3-export-llama-cpp.txt"


def _built_as() -> str:
    return f"{LLAMA_CPP} CFLAGS=CXXFLAGS={LLAMA_CPP_FLAGS}\n"


def ensure_llama_cpp() -> str | None:
    """None when ready, else why not."""
    python = peers_python()
    stamp = _stamp(python)
    built = stamp.exists() and stamp.read_text() == _built_as()
    if built and python.exists() and _run([str(python), "-c", "import llama_cpp"])[0]:
        return None
    venv = python.parent.parent
    if not python.exists():
        ok, out = _run([sys.executable, "-m", "venv", str(venv)])
        if not ok:
            return f"cannot create {venv}: {out[-300:]}"
    log.info("compiling %s into %s with %s (about 9 minutes on 2 cores)", LLAMA_CPP, venv, LLAMA_CPP_FLAGS)
    t0 = time.perf_counter()
    # CMake takes CFLAGS / CXXFLAGS from the environment into every compile line. --no-cache-dir and
    # --force-reinstall: pip's wheel cache keys on the sdist alone and would hand back an earlier (AMX) build.
    env = {**os.environ, "CFLAGS": LLAMA_CPP_FLAGS, "CXXFLAGS": LLAMA_CPP_FLAGS}
    cmd = [str(python), "-m", "pip", "install", "-q", "--no-cache-dir", "--force-reinstall", LLAMA_CPP, "numpy"]
    ok, out = _run(cmd, env)
    if not ok:
        return f"pip install {LLAMA_CPP} failed: {out[-500:]}"
    stamp.write_text(_built_as())
    log.info("llama-cpp-python installed in %.0f s", time.perf_counter() - t0)
    return None


def ensure_llama_cpp_server() -> str | None:
    """llama.cpp's OpenAI server in the peers venv (its dependencies only): None when ready, else why not."""
    problem = ensure_llama_cpp()
    if problem is not None:
        return problem
    python = str(peers_python())
    if _run([python, "-c", "import llama_cpp.server.app"])[0]:
        return None
    ok, out = _run([python, "-m", "pip", "install", "-q", *LLAMA_CPP_SERVER])
    if not ok:
        return f"pip install of llama-cpp-python's server extra failed: {out[-500:]}"
    ok, out = _run([python, "-c", "import llama_cpp.server.app"])
    return None if ok else f"llama_cpp.server does not import: {out[-500:]}"


def ensure_genai() -> str | None:
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        return None
    ok, out = _run([sys.executable, "-m", "pip", "install", "-q", GENAI])
    return None if ok else f"pip install {GENAI} failed: {out[-500:]}"


def ensure_all() -> dict[str, str | None]:
    return {"llama.cpp": ensure_llama_cpp(), "llama.cpp server": ensure_llama_cpp_server(),
            "onnxruntime-genai": ensure_genai()}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for peer, problem in ensure_all().items():
        print(f"{peer}: {'ready' if problem is None else problem}")
