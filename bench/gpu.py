"""The GPU check (`python -m bench.gpu`, `make gpu-check`): the attention kernel on one NVIDIA GPU, launched the
way TensorRT's AOT plugin launches it, with only torch, triton and cuda-python (under 8 minutes on an H200).

  1. PTX for the device's arch (sm_80 / sm_89 / sm_90a) from `attention_aot.compile_kernel`, in this process (it
     never sets TRITON_INTERPRET), once per (attributes, dtype, cache dtype, tactic), loaded with cuda-python.
  2. Correctness: the interpreter tests' cases (tests/test_attention_kernel.py) and real-shape GPU cases, both
     tactics, through `plugins/cuda_launcher.py`, against the reference (`bench.attention_cases.compare`). One
     workspace, zeroed once, serves every launch (as the runtime's does): the kernel must leave it clean.
  3. Speed: decode (S = 1, batch 1, 12B-like global layer) at 1K / 8K / 32K context, as bytes moved per second
     against the card's device-to-device copy bandwidth measured in the same run.
  4. Cross-check: the same launches through Triton's own launcher (`run_kernel`) must give the same bits. It runs
     last and stops at a time budget: Triton JIT-compiles every variant again.
  5. TensorRT: the 270M engine hook (`build_and_check_270m`) when tensorrt imports.
One table at the end, also written to bench/results/gpu-check.json. Exit 0: all passed, 1: a failure, 2: no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

from bench.attention_cases import Case, compare, make_inputs
from gemma3.plugins import attention_launch as launch
from gemma3.plugins.cuda_launcher import Device, LauncherError, SharedMemoryError, arch_for_capability, launch_attention

RESULTS = Path(__file__).resolve().parent / "results" / "gpu-check.json"
NO_GPU = 2
# Time budgets from the start (seconds): compiling is serial (~2-4 s a variant), the run must end under 8 minutes.
CORRECTNESS_BUDGET_S, CROSS_CHECK_BUDGET_S = 330.0, 390.0
SPEED_CONTEXTS = (1024, 8192, 32768)
SPEED_SHAPE = {"heads": 16, "kv_heads": 8, "head_dim": 256, "dtype": "bfloat16"}  # 12B-like global layer
SPEED_REPS, SPEED_LAUNCHES, SLEEP_CYCLES = 11, 40, 20_000_000  # median of reps; ~10 ms head start per rep
MIN_WORKING_SET = 512 << 20  # decode timings rotate over caches this large, so L2 cannot hold them
H200_COPY_TBPS = 4.3
FP8_CAPABILITY = (8, 9)


def _log(start: float, message: str) -> None:
    print(f"[{time.monotonic() - start:4.0f}s] {message}", file=sys.stderr, flush=True)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def interpreter_cases() -> list[Case]:
    """CASES + _random_cases(12) of the interpreter tests. Their module uses pytest only for decorators; on a
    bare CUDA image without pytest a stand-in with an identity `mark.parametrize` lets it import."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pytest")
        stub.mark = types.SimpleNamespace(parametrize=lambda *args, **kwargs: (lambda fn: fn))
        sys.modules["pytest"] = stub
    from tests.test_attention_kernel import CASES, _random_cases

    return [*CASES, *_random_cases(12)]


def gpu_cases(fp8: bool) -> list[Case]:
    """Real shapes the interpreter is too slow for: 1B/4B/12B local layers (head_dim 256, GQA 4 / 2, windows 512 /
    1024), a 27B-like global layer at 4K (head_dim 128, GQA 2), ragged batch-4 decode, the speed shape at 32K."""
    small = {"heads": 4, "kv_heads": 1, "head_dim": 256}  # 1B-like: GQA 4
    big = {"heads": 16, "kv_heads": 8, "head_dim": 256}  # 12B-like: GQA 2
    wide = {"heads": 32, "kv_heads": 16, "head_dim": 128}  # 27B-like global layer: GQA 2, head_dim 128
    bf16, fp16 = {"dtype": "bfloat16"}, {"dtype": "float16"}
    cases = [
        Case("gpu-256-gqa4-w512-prefill", (700,), 384, 512, window=512, **small, **bf16),
        Case("gpu-256-gqa4-w512-decode", (2000,), 1, 512, window=512, **small, **bf16),
        Case("gpu-256-gqa2-w1024-decode", (5000,), 1, 1024, window=1024, **big, **bf16),
        Case("gpu-256-gqa2-w1024-prefill-fp16", (900,), 256, 1024, window=1024, **big, **fp16),
        Case("gpu-128-gqa2-global-4k-decode", (4095,), 1, 4096, **wide, **bf16),
        Case("gpu-128-gqa2-global-4k-prefill-fp16", (3072,), 512, 4096, **wide, **fp16),
        Case("gpu-ragged-decode-b4", (0, 37, 1500, 4095), 1, 4096, **big, **bf16),
        Case("gpu-ragged-decode-b4-w1024", (3, 600, 1023, 3000), 1, 1024, window=1024, **big, **bf16),
        Case("gpu-speed-shape-32k-decode", (32767,), 1, 32768, **SPEED_SHAPE),
    ]
    if fp8:
        cases += [Case("gpu-fp8-128-global-4k-decode", (4000,), 1, 4096, fp8=True, **wide, **bf16),
                  Case("gpu-fp8-256-w1024-prefill", (800,), 128, 1024, window=1024, fp8=True, **big, **bf16)]
    return cases


def cache_dtype(case: Case) -> str:
    return "float8e4m3fn" if case.fp8 else case.dtype


class Kernels:
    """Compiled and loaded kernels by (attributes, dtype, cache dtype, tactic): each variant compiles once."""

    def __init__(self, device: Device, arch: str) -> None:
        self.device, self.arch = device, arch
        self.cache: dict[tuple, Any] = {}
        self.compile_s = 0.0

    def get(self, case: Case, tactic: int) -> Any:
        from gemma3.plugins.attention_aot import compile_kernel

        key = (case.attrs, case.dtype, cache_dtype(case), tactic)
        if key not in self.cache:
            begin = time.monotonic()
            compiled = compile_kernel(case.attrs, case.dtype, cache_dtype(case), launch.TACTICS[tactic], self.arch)
            self.compile_s += time.monotonic() - begin
            self.cache[key] = self.device.load(compiled)
        return self.cache[key]


def run_ours(kernels: Kernels, case: Case, inputs: dict, tactic: int, workspace: Any) -> tuple:
    """One step through the cuda-python launcher, caches in place (k_cache is also k_cache_out), on torch's
    current stream; returns (out, k_cache, v_cache) like `run_kernel`."""
    k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    out = torch.empty_like(inputs["q"])
    pointers = [inputs[n].data_ptr() for n in ("q", "k", "v")] + [k_cache.data_ptr(), v_cache.data_ptr()]
    pointers += [inputs["past_len"].data_ptr(), inputs["group_ids"].data_ptr(), workspace.data_ptr()]
    batch = len(case.past_lens)
    launch_attention(kernels.get(case, tactic), case.attrs, launch.TACTICS[tactic], new_tokens=case.new_tokens,
                     batch=batch, capacity=case.capacity, inputs=pointers,
                     outputs=[out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr()],
                     stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    if bool((workspace[: batch * case.attrs.num_kv_heads] != 0).any()):
        workspace.zero_()  # keep the later cases meaningful
        raise AssertionError("the kernel left a ticket counter non-zero")
    return out, k_cache, v_cache


class ContextLost(RuntimeError):
    """The CUDA context faulted (e.g. an illegal address): nothing after it can be trusted."""


def _guard(error: BaseException) -> None:
    try:
        torch.cuda.synchronize()
    except Exception as fault:
        raise ContextLost(_one_line(fault)) from error


def correctness(kernels: Kernels, cases: list[Case], workspace: Any, start: float) -> list[dict]:
    results: list[dict] = []
    for number, case in enumerate(cases):
        if time.monotonic() > start + CORRECTNESS_BUDGET_S:  # the run fails: incomplete
            results += [{"case": c.name, "tactic": t, "pass": False, "error": "not run: time budget"}
                        for c in cases[number:] for t in range(len(launch.TACTICS))]
            break
        inputs = make_inputs(case, "cuda")
        for tactic in range(len(launch.TACTICS)):
            entry: dict[str, Any] = {"case": case.name, "tactic": tactic}
            try:
                entry.update(compare(case, inputs, run_ours(kernels, case, inputs, tactic, workspace)))
                entry["pass"] = entry["cache_mismatches"] == 0 and entry["out_excess"] <= 0
            except SharedMemoryError as error:  # cannot launch on this GPU at all: listed, not a wrong result
                entry.update({"pass": False, "unfit": _one_line(error)})
            except Exception as error:  # one bad variant must not hide the others
                _guard(error)
                entry.update({"pass": False, "error": _one_line(error)})
            results.append(entry)
        if number % 10 == 9:
            _log(start, f"correctness: {number + 1}/{len(cases)} cases, {len(kernels.cache)} kernels")
    return results


def _same_bits(a: Any, b: Any) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def cross_check(kernels: Kernels, cases: list[Case], workspace: Any, deadline: float) -> tuple[list[dict], str]:
    """Ours against Triton's launcher on the same inputs, bit for bit. Returns (results, why it stopped early).
    Triton's JIT compiles its own variant of the same source (it specializes S == 1 and 16-divisible ints and
    pointers), so a tiny `out_max_diff` would be compiler-level; a launcher bug (order, grid) gives garbage."""
    from bench.attention_cases import run_kernel

    results: list[dict] = []
    for case in cases:
        for tactic in range(len(launch.TACTICS)):
            if time.monotonic() > deadline:
                return results, f"time budget ({CROSS_CHECK_BUDGET_S:.0f} s) reached"
            inputs = make_inputs(case, "cuda")
            entry: dict[str, Any] = {"case": case.name, "tactic": tactic}
            try:
                ours = run_ours(kernels, case, inputs, tactic, workspace)
            except SharedMemoryError:  # does not fit this GPU: nothing to compare
                continue
            except Exception as error:  # already a correctness failure: recorded there too
                _guard(error)
                results.append(dict(entry, identical=False, error=f"ours: {_one_line(error)}"))
                continue
            try:
                theirs = run_kernel(case, inputs, tactic=tactic)
            except AssertionError as error:  # a kernel finding (a ticket left behind): record it, go on
                results.append(dict(entry, identical=False, error=f"Triton's: {_one_line(error)}"))
                continue
            except Exception as error:  # Triton's launcher cannot run here (no C compiler, ...): stop
                _guard(error)
                return results, f"Triton's launcher failed: {_one_line(error)}"
            entry["identical"] = all(_same_bits(a, b) for a, b in zip(ours, theirs))
            if not entry["identical"]:
                entry["out_max_diff"] = float((ours[0].float() - theirs[0].float()).abs().max())
            results.append(entry)
    return results, ""


def _timed(step, reps: int, launches: int) -> float:
    """Median seconds per launch: the GPU first sleeps while the CPU queues the launches, so only GPU time (not
    Python's launch cost) falls between the events."""
    pairs = []
    for rep in range(reps):
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(SLEEP_CYCLES)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for i in range(launches):
            step(rep * launches + i)
        end.record()
        pairs.append((begin, end))
    torch.cuda.synchronize()
    return statistics.median(b.elapsed_time(e) for b, e in pairs) / 1e3 / launches


def decode_speed(kernels: Kernels, context: int, workspace: Any) -> dict:
    """Decode attention at `context` tokens; bytes = the K and V rows read (context - 1) + the new rows written."""
    case = Case(f"speed-{context}", (context - 1,), 1, context, **SPEED_SHAPE)
    attrs, tactic = case.attrs, launch.pick_tactic(1, case.attrs)
    row_bytes = 2 * attrs.num_kv_heads * attrs.head_dim * 2  # K and V, bf16
    moved = context * row_bytes
    l2 = int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20))
    sets = max(1, math.ceil(max(4 * l2, MIN_WORKING_SET) / moved))
    base = make_inputs(Case(case.name, case.past_lens, 1, 16, **SPEED_SHAPE), "cuda")  # q, k, v, lengths
    shape = (1, attrs.num_kv_heads, context, attrs.head_dim)
    caches = [(torch.randn(shape, device="cuda", dtype=torch.bfloat16),
               torch.randn(shape, device="cuda", dtype=torch.bfloat16)) for _ in range(sets)]
    out = torch.empty_like(base["q"])
    kernel, stream = kernels.get(case, tactic), torch.cuda.current_stream().cuda_stream
    fixed = [base[n].data_ptr() for n in ("q", "k", "v")]

    def step(i: int) -> None:
        k_cache, v_cache = caches[i % sets]
        launch_attention(kernel, attrs, launch.TACTICS[tactic], new_tokens=1, batch=1, capacity=context,
                         inputs=[*fixed, k_cache.data_ptr(), v_cache.data_ptr(), base["past_len"].data_ptr(),
                                 base["group_ids"].data_ptr(), workspace.data_ptr()],
                         outputs=[out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr()], stream=stream)

    for i in range(max(2 * sets, 10)):  # warm-up: clocks up, every buffer touched once
        step(i)
    seconds = _timed(step, SPEED_REPS, SPEED_LAUNCHES)
    caches.clear()
    torch.cuda.empty_cache()
    return {"context": context, "tactic": tactic, "us": seconds * 1e6, "bytes": moved,
            "bytes_per_s": moved / seconds, "buffers": sets}


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (an H200 does about 4.3 TB/s)."""
    size = 1 << 30
    src = torch.ones(size, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    return 2 * size / _timed(lambda i: dst.copy_(src), 10, 1)


def build_and_check_270m() -> tuple[str, str]:
    """The 270M engines (bf16, fp8, int4) built with this plugin, greedy tokens against the ORT fp32 export and
    decode tok/s (`gemma3.engine.check`); skipped, saying why, where the export dependencies are missing."""
    try:
        from gemma3.engine import check
    except Exception as error:
        reason = _one_line(error)
        print(f"engine build: skipped ({reason})")
        return "skipped", reason
    return check.build_and_check_270m()


def tensorrt_rows() -> list[tuple[str, str, str]]:
    try:
        import tensorrt
    except Exception as error:
        return [("TensorRT", "not installed (engine rows skipped)", _one_line(error))]
    return [("TensorRT", f"tensorrt {tensorrt.__version__}", "installed"),
            ("engine build (270M)", *build_and_check_270m())]


def _version(*names: str) -> str:
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return "?"


def _format_table(rows: list[tuple[str, str, str]]) -> str:
    rows = [("check", "result", "detail"), *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"| {a:<{widths[0]}} | {b:<{widths[1]}} | {c} |" for a, b, c in rows]
    lines.insert(1, f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|---|")
    return "\n".join(lines)


def _names(results: list[dict], key: str) -> str:
    bad = [f"{r['case']}/t{r['tactic']}" + (f" ({r['error']})" if "error" in r else "")
           for r in results if not r[key] and "unfit" not in r]
    return ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")


def _summary(results: list[dict], skipped_fp8: int) -> tuple[str, str]:
    """PASS when every variant that fits this GPU matches the reference; those too big for its shared memory are
    counted apart (fp32 head_dim 128/256 on 99 KB GPUs: a limit of the tactic, not a wrong result)."""
    passed = sum(r["pass"] for r in results)
    unfit = [f"{r['case']}/t{r['tactic']}" for r in results if "unfit" in r]
    failed = len(results) - passed - len(unfit)
    scored = [r for r in results if "out_excess" in r]
    detail = (f"worst out excess {max((r['out_excess'] for r in scored), default=float('nan')):.2e} (<= 0 passes), "
              f"cache byte mismatches {sum(r['cache_mismatches'] for r in scored)}")
    if skipped_fp8:
        detail += f"; {skipped_fp8} fp8 cases skipped (fp8 needs compute capability 8.9+)"
    if unfit:
        detail += f"; {len(unfit)} do not fit this GPU's shared memory: " + ", ".join(unfit[:4])
    if failed:
        detail += "; failed: " + _names(results, "pass")
    return f"{'FAIL' if failed else 'PASS'} {passed}/{len(results) - len(unfit)}", detail


def _cross_summary(checked: list[dict], stopped: str, n_cases: int) -> tuple[str, str]:
    same = sum(r["identical"] for r in checked)
    detail = f"{len(checked)}/{n_cases * len(launch.TACTICS)} launches compared bit for bit"
    detail += f"; stopped: {stopped}" if stopped else ""
    detail += f"; differ: {_names(checked, 'identical')}" if same < len(checked) else ""
    if not checked:
        return "not run", detail
    return f"{'identical' if same == len(checked) else 'DIFFER'} {same}/{len(checked)}", detail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The attention kernel on this machine's NVIDIA GPU.")
    parser.add_argument("--quick", action="store_true", help="a few interpreter cases, no speed (a smoke run)")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where the results go (default {RESULTS})")
    args = parser.parse_args(argv)
    start = time.monotonic()
    if not torch.cuda.is_available():
        print("gpu check: no CUDA GPU found (torch.cuda.is_available() is False); nothing was run")
        return NO_GPU
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("gpu check: TRITON_INTERPRET=1 is set; unset it (this check compiles and launches real PTX)")
        return 1
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    capability = (props.major, props.minor)
    arch = arch_for_capability(*capability)
    if arch is None:
        print(f"gpu check: {props.name} has compute capability {props.major}.{props.minor}; the plugin's PTX "
              "targets are sm_80 (8.0-8.8), sm_89 (8.9) and sm_90a (9.x), so nothing was run")
        return 1
    try:
        device = Device(torch.cuda.current_device())
    except LauncherError as error:
        print(f"gpu check: {error}")
        return 1
    versions = {"torch": torch.__version__, "triton": _version("triton"),
                "cuda-python": _version("cuda-python", "cuda-bindings"),
                "driver": f"{device.driver_version // 1000}.{device.driver_version % 1000 // 10}"}
    rows = [("GPU", f"{device.name} (cc {props.major}.{props.minor})",
             f"PTX {arch}; driver CUDA {versions['driver']}, torch {versions['torch']}, triton {versions['triton']},"
             f" cuda-python {versions['cuda-python']}")]
    report: dict[str, Any] = {"device": device.name, "capability": list(capability), "arch": arch, **versions}

    fp8 = capability >= FP8_CAPABILITY
    interp = interpreter_cases()
    cases = interp[::8] if args.quick else [*interp, *gpu_cases(fp8)]
    skipped_fp8 = sum(c.fp8 for c in cases) if not fp8 else 0
    cases = [c for c in cases if fp8 or not c.fp8]
    elements = launch.workspace_elements(max(len(c.past_lens) for c in cases), max(c.kv_heads for c in cases),
                                         max(c.head_dim for c in cases))
    workspace = torch.zeros(elements, dtype=torch.float32, device="cuda")  # zeroed once, as the runtime does
    kernels = Kernels(device, arch)
    ok = True
    try:
        _log(start, f"{device.name}: {len(cases)} cases x {len(launch.TACTICS)} tactics, PTX {arch}")
        results = correctness(kernels, cases, workspace, start)
        report["correctness"] = results
        verdict, detail = _summary(results, skipped_fp8)
        ok &= verdict.startswith("PASS")
        rows.append(("PTX kernels (compile_kernel)", f"{len(kernels.cache)} loaded",
                     f"{kernels.compile_s:.0f} s in triton.compile; up to "
                     f"{max((k.kernel.shared for k in kernels.cache.values()), default=0)} B shared memory"))
        rows.append(("correctness, cuda-python launcher", verdict, f"{len(cases)} cases x both tactics; {detail}"))
        if not args.quick:
            _log(start, "speed: decode at " + ", ".join(f"{c // 1024}K" for c in SPEED_CONTEXTS))
            copy = copy_bandwidth()
            torch.cuda.empty_cache()  # the 2 GiB of the copy go back before the decode buffers
            speeds = [decode_speed(kernels, context, workspace) for context in SPEED_CONTEXTS]
            report.update(copy_bytes_per_s=copy, speed=speeds)
            for s in speeds:
                rows.append((f"decode {s['context'] // 1024}K context", f"{s['us']:.1f} us",
                             f"{s['bytes_per_s'] / 1e9:.0f} GB/s = {s['bytes_per_s'] / copy:.0%} of copy; "
                             f"{s['bytes'] / 1e6:.1f} MB K+V; 16/8 heads x 256, bf16, global, tactic {s['tactic']}"))
            rows.append(("device copy bandwidth", f"{copy / 1e12:.2f} TB/s",
                         f"1 GiB torch copy, read + written (an H200 does about {H200_COPY_TBPS})"))
        _log(start, "cross-check: Triton's own launcher")
        checked, stopped = cross_check(kernels, cases, workspace, start + CROSS_CHECK_BUDGET_S)
        report["cross_check"] = {"results": checked, "stopped": stopped}
        rows.append(("cross-check vs Triton's launcher", *_cross_summary(checked, stopped, len(cases))))
        ok &= all(r["identical"] for r in checked)
    except ContextLost as error:
        ok = False
        rows.append(("aborted", "CUDA context lost", str(error)))
    rows += tensorrt_rows()
    elapsed = time.monotonic() - start
    rows.append(("GPU check", "PASS" if ok else "FAIL", f"{elapsed:.0f} s"))
    report.update(ok=ok, elapsed_s=elapsed, table=rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str))
    print(_format_table(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
