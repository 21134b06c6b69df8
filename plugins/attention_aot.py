"""Compile the attention kernel ahead of time to PTX, with no GPU, and check its ABI.

TensorRT's AOT plugin (`tensorrt_plugin.py`) calls `compile_kernel` at engine build time and embeds the PTX in the
engine; the GPU check loads the same PTX with cuda-python. `python -m gemma3.plugins.attention_aot --out DIR`
writes the PTX for every architecture, dtype and tactic of a model's attention (what `make test` checks).

Triton 3.5.0 (pinned: NVIDIA's AOT plugin sample uses it) appends two pointer parameters to every kernel, global
and profile scratch. TensorRT's launcher, like Triton's own AOT launcher, has no scratch to give, so a kernel
that needs global scratch is refused here, and the two trailing pointers are passed as null by our launcher.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from gemma3.plugins import attention_launch as launch

TRITON_VERSION = "3.5.0"
ARCHS = {"sm_80": 80, "sm_89": 89, "sm_90a": 90}  # Triton names sm_90 targets sm_90a (arch-specific PTX)
HIDDEN_POINTERS = 2  # global_scratch, profile_scratch (Triton >= 3.4)
FP8_MIN_CAPABILITY = 89  # E4M3 conversions exist from Ada / Hopper on


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    arch: str
    ptx: str
    shared: int
    num_warps: int
    params: tuple[str, ...]  # the PTX .entry parameter types, in order (".u64 .ptr" pointers, ".u32" scalars)

    @property
    def block(self) -> int:
        return self.num_warps * 32


def arch_for_capability(major: int, minor: int) -> str:
    """The PTX target for a GPU: sm_80 PTX serves every Ampere card (8.0-8.7, JIT-compiled forward), sm_89 Ada,
    sm_90a Hopper (arch-specific: 9.0 only). Other cards are refused rather than run untested PTX."""
    capability = major * 10 + minor
    if 80 <= capability < 89:
        return "sm_80"
    if capability == 89:
        return "sm_89"
    if capability == 90:
        return "sm_90a"
    raise ValueError(f"compute capability {major}.{minor}: the attention plugin is built and checked for sm_80, "
                     "sm_89 and sm_90a (Ampere, Ada, Hopper)")


def current_capability() -> tuple[int, int]:
    """The compute capability of the GPU this process sees (engines are built on the GPU they run on)."""
    from triton.runtime import driver

    arch = driver.active.get_current_target().arch
    return arch // 10, arch % 10


def entry_params(ptx: str) -> tuple[str, ...]:
    """The parameter types of the PTX's single `.entry`, e.g. ('u64', 'u64', 'u32', ...)."""
    entries = re.findall(r"\.entry\s+\w+\s*\(([^)]*)\)", ptx)
    if len(entries) != 1:
        raise ValueError(f"expected one .entry in the PTX, found {len(entries)}")
    return tuple(re.findall(r"\.param\s+\.(\w+)", entries[0]))


def expected_params() -> tuple[str, ...]:
    """The ABI as PTX sees it: input pointers, int32 scalars, output pointers, then Triton's hidden pointers."""
    return ("u64",) * launch.N_INPUTS + ("u32",) * launch.N_SCALARS + ("u64",) * (launch.N_OUTPUTS + HIDDEN_POINTERS)


def check_triton() -> None:
    import triton

    if triton.__version__ != TRITON_VERSION:
        raise RuntimeError(f"triton {triton.__version__} is installed; the plugin's ABI is checked against "
                           f"{TRITON_VERSION} (pip install triton=={TRITON_VERSION})")


@functools.cache  # TensorRT asks once per layer; layers share their attributes (local / global)
def compile_kernel(attrs: launch.Attributes, dtype: str, cache_dtype: str, tactic: launch.Tactic,
                   arch: str) -> CompiledKernel:
    """PTX of the kernel for one architecture (no GPU needed), refused unless its ABI is the plugin's."""
    import triton
    from triton.backends.compiler import GPUTarget

    from gemma3.plugins.attention_kernel import hybrid_attention_kernel

    check_triton()
    launch.check(attrs, dtype, cache_dtype)
    if cache_dtype == "float8e4m3fn" and ARCHS[arch] < FP8_MIN_CAPABILITY:
        raise ValueError(f"fp8 caches need sm_89 or newer, not {arch}")
    constants = launch.constexprs(attrs, dtype, tactic)
    signature = dict(launch.signature(dtype, cache_dtype), **{name: "constexpr" for name in constants})
    source = triton.compiler.ASTSource(fn=hybrid_attention_kernel, signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", ARCHS[arch], 32),
                              options={"num_warps": tactic.num_warps, "num_stages": tactic.num_stages})
    meta = compiled.metadata
    if getattr(meta, "global_scratch_size", 0):
        raise RuntimeError(f"{meta.name} needs {meta.global_scratch_size} bytes of global scratch, which an AOT "
                           "plugin launch cannot provide")
    ptx = compiled.asm["ptx"]
    kernel = CompiledKernel(meta.name, arch, ptx, meta.shared, meta.num_warps, entry_params(ptx))
    if kernel.params != expected_params():
        raise RuntimeError(f"{meta.name} for {arch}: PTX parameters {kernel.params} are not the plugin ABI "
                           f"{expected_params()}")
    return kernel


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compile the HybridAttention kernel to PTX for every GPU target.")
    parser.add_argument("--out", type=Path, required=True, help="folder for the .ptx files and index.json")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--window", type=int, default=512, help="0 for a global layer")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--fp8-cache", action="store_true", help="fp8 E4M3 caches (sm_89 and newer only)")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="default: every target")
    args = parser.parse_args(argv)
    scale = 1.0 if args.fp8_cache else 0.0
    attrs = launch.Attributes(args.heads, args.kv_heads, args.head_dim, args.head_dim ** -0.5, args.window,
                              scale, scale)
    cache_dtype = "float8e4m3fn" if args.fp8_cache else args.dtype
    archs = args.arch or [a for a in ARCHS if not args.fp8_cache or ARCHS[a] >= FP8_MIN_CAPABILITY]
    args.out.mkdir(parents=True, exist_ok=True)
    index = []
    for arch in archs:
        for number, tactic in enumerate(launch.TACTICS):
            kernel = compile_kernel(attrs, args.dtype, cache_dtype, tactic, arch)
            file = f"{kernel.name}-{arch}-t{number}.ptx"
            (args.out / file).write_text(kernel.ptx)
            entry = {k: v for k, v in asdict(kernel).items() if k != "ptx"}
            index.append(dict(entry, file=file, tactic=number, attrs=asdict(attrs), dtype=args.dtype,
                              cache_dtype=cache_dtype))
    (args.out / "index.json").write_text(json.dumps(index, indent=1))


if __name__ == "__main__":
    main()
