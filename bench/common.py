"""Pieces every peer measurement shares: the job file a child reads, the speed loop, peak RSS, the child runner.

Each peer runs in its own child interpreter (the project's .venv, or the peers venv for llama.cpp), so
peak RSS is that peer's alone. Only the stdlib is imported at module level: the peers venv has numpy and
the peer's package, not this project, so `gemma3.runtime.perplexity` is loaded there from its file path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
THREADS = 2  # the machine has 2 cores; every peer gets both
PROMPT_TOKENS = 512  # speed prompt: the first 512 eval ids (bos + 511 tokens of the eval text)
DECODE_TOKENS = 128  # greedy decode steps after the prompt
REPEATS = 3  # timed runs after one warm-up; medians reported


class Skip(Exception):
    """A peer that cannot run here (not installed, failed to build); the message says why."""


def cache_root() -> Path:
    """Same rule as gemma3.graphs.loaders.embedded.cache_dir, without importing the project (peers venv)."""
    root = os.environ.get("GEMMA3_EXPORT_CACHE") or Path.home() / ".cache" / "gemma3-export"
    return Path(root)


def peers_python() -> Path:
    """Interpreter of the separate venv holding llama-cpp-python (compiled from source, kept out of git)."""
    return cache_root() / "peers-venv" / "bin" / "python"


def result(name: str, **fields: Any) -> dict[str, Any]:
    """A peer's result with the fixed keys first; extra keys (details) are kept after them."""
    out: dict[str, Any] = {
        "name": name,
        "prefill_tok_s": None,
        "decode_tok_s": None,
        "peak_rss_mb": None,
        "perplexity": None,
        "notes": "",
    }
    out.update(fields)
    return out


# --- in the child ---------------------------------------------------------------------------------------


def perplexity_module() -> ModuleType:
    """runtime/perplexity.py loaded by path: it is numpy + stdlib only, so any venv with numpy can run it."""
    path = REPO / "runtime" / "perplexity.py"
    spec = importlib.util.spec_from_file_location("_bench_perplexity", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def score_windows(
    ids: list[int], logits: Callable[[list[int]], Any], load_s: float, own_ids: list[int] | None = None
) -> dict[str, Any]:
    """A perplexity child's result: `logits(window inputs)` over the protocol's windows of `ids`.

    `own_ids`: the peer's own tokenization of the eval text (no bos), to report where it first disagrees.
    """
    p = perplexity_module()
    mismatch = None
    if own_ids is not None:
        mismatch = next((i + 1 for i, (a, b) in enumerate(zip(own_ids, ids[1:])) if a != b), None)
    t0 = time.perf_counter()
    total, count = p.evaluate(p.eval_windows(ids), logits)
    return {
        "perplexity": p.perplexity(total, count),
        "nll": total,
        "count": count,
        "eval_s": time.perf_counter() - t0,
        "load_s": load_s,
        "own_tokenizer_first_mismatch": mismatch,
    }


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # ru_maxrss is KiB on Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks this process used), both in USER_HZ; (0, 0) off Linux."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, int(own[11]) + int(own[12])  # utime + stime


def wait_until_quiet(max_wait_s: float, threshold: float = 0.1, sample_s: float = 2.0) -> float:
    """Wait (at most max_wait_s) until other processes use under `threshold` of the CPU; returns the last share.

    The bench machine is shared: a 2-thread run next to a busy neighbour measures the neighbour. Spin-waiting
    thread pools (llama.cpp, OpenMP) collapse when a core is taken, so timings are only comparable when quiet.
    """
    deadline = time.perf_counter() + max_wait_s
    while True:
        busy0, _ = _cpu_ticks()
        time.sleep(sample_s)
        busy1, _ = _cpu_ticks()
        share = (busy1 - busy0) / (sample_s * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1))
        if share < threshold or time.perf_counter() >= deadline:
            return share


def _foreign_share(busy0: int, own0: int, wall0: float) -> float:
    """Other processes on the machine steal cores from a 2-thread run: the share of the machine they used since
    (busy0, own0) = _cpu_ticks() at perf_counter() wall0."""
    busy1, own1 = _cpu_ticks()
    capacity = (time.perf_counter() - wall0) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    return max(0, (busy1 - busy0) - (own1 - own0)) / capacity if capacity > 0 else 0.0


def measure_speed(
    reset: Callable[[], None],
    prefill: Callable[[list[int]], int],
    step: Callable[[int], int],
    prompt: list[int],
    decode_tokens: int = DECODE_TOKENS,
    repeats: int = REPEATS,
) -> dict[str, Any]:
    """Warm-up once, then `repeats` timed runs; medians of prefill and decode throughput.

    `prefill(prompt)` runs the whole prompt from an empty cache and returns the greedy next token;
    `step(tok)` feeds one token and returns the next. Decode time covers `decode_tokens` steps.
    """
    prefill_s: list[float] = []
    decode_s: list[float] = []
    tokens: list[int] = []
    busy0, own0, wall0 = 0, 0, 0.0
    for run in range(repeats + 1):
        if run == 1:
            busy0, own0, wall0 = *_cpu_ticks(), time.perf_counter()
        reset()
        t0 = time.perf_counter()
        tok = prefill(prompt)
        t1 = time.perf_counter()
        tokens = [tok]
        for _ in range(decode_tokens):
            tok = step(tok)
            tokens.append(tok)
        t2 = time.perf_counter()
        if run:  # run 0 is the warm-up: allocations, kernel selection, page faults
            prefill_s.append(t1 - t0)
            decode_s.append(t2 - t1)
    foreign = _foreign_share(busy0, own0, wall0)
    return {
        "prefill_tok_s": len(prompt) / statistics.median(prefill_s),
        "decode_tok_s": decode_tokens / statistics.median(decode_s),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "greedy_tokens": tokens,
        "foreign_cpu_share": round(foreign, 3),  # 0 = machine otherwise idle, 1 = all cores busy elsewhere
    }


def measure_native(run: Callable[[], tuple[float, float, list[int]]], prompt_tokens: int,
                   repeats: int = REPEATS) -> dict[str, Any]:
    """A peer's own generation loop, as its users run it: `run()` generates from the prompt with the system's own
    greedy selection and detokenization and returns (seconds to the first token, seconds for the tokens after
    it, all generated ids). One warm-up, then `repeats` timed runs; medians."""
    first_s: list[float] = []
    rest_s: list[float] = []
    tokens: list[int] = []
    busy0, own0 = _cpu_ticks()
    wall0 = time.perf_counter()
    for index in range(repeats + 1):
        first, rest, tokens = run()
        if index:
            first_s.append(first)
            rest_s.append(rest)
    foreign = _foreign_share(busy0, own0, wall0)
    return {
        "prefill_tok_s": prompt_tokens / statistics.median(first_s),
        "decode_tok_s": (len(tokens) - 1) / statistics.median(rest_s),
        "first_token_s": first_s,
        "decode_s": rest_s,
        "greedy_tokens": tokens,
        "foreign_cpu_share": round(foreign, 3),
    }


def child_main(modes: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """Entry point of a child: `python -m bench.peer_x MODE job.json out.json`."""
    mode, job_path, out_path = sys.argv[1:4]
    job = json.loads(Path(job_path).read_text())
    out = modes[mode](job)
    out["peak_rss_mb"] = peak_rss_mb()
    Path(out_path).write_text(json.dumps(out))


def stream_bandwidth(gib: float = 1.0, threads: int = THREADS, repeats: int = 5) -> float:
    """This machine's streaming bandwidth in bytes/s: the best of `repeats` copies of a `gib` GiB numpy array,
    split across `threads` threads (numpy releases the GIL while copying), counting the bytes read and written.
    The ceiling a memory-bound decode step can approach: every weight is read once per token."""
    import threading

    import numpy as np

    src = np.ones(int(gib * 2**30) // 8, dtype=np.float64)  # ones, not empty: the pages are really mapped
    dst = np.zeros_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]

    def copy(lo: int, hi: int) -> None:
        np.copyto(dst[lo:hi], src[lo:hi])

    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=copy, args=b) for b in bounds]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


# --- in the parent --------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Thread pools read these at import time; each runtime is also told 2 threads explicitly.
    env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false")
    return env


def run_child(python: Path | str, module: str, mode: str, job: dict[str, Any], timeout: float = 3600) -> dict:
    """Run `module` in a fresh interpreter on `job`; return its JSON result. Raises with its stderr tail."""
    with tempfile.TemporaryDirectory(prefix="gemma3-bench-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        t0 = time.perf_counter()
        proc = subprocess.run(
            [str(python), "-m", module, mode, str(job_path), str(out_path)],
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or not out_path.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"{module} {mode} failed (exit {proc.returncode}):\n{tail}")
        out = json.loads(out_path.read_text())
        out["wall_s"] = round(time.perf_counter() - t0, 1)
        return out
