"""The cuda-python launcher of the AOT attention kernel (plugins/cuda_launcher.py) and the GPU check (bench/gpu.py),
as far as a machine without a GPU can check them: the kernel parameters in ABI order (the 8 input pointers, the 2
int32 scalars, the 3 output pointers, Triton's 2 hidden pointers as null) against the PTX `.entry`, the launch
geometry from attention_launch, the arch chooser, the one-line errors, and `python -m bench.gpu` exiting 2 with
one line when no GPU is visible. What needs a GPU and cuda-python skips here.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from gemma3.plugins import attention_launch as launch
from gemma3.plugins import cuda_launcher as cl
from gemma3.plugins.attention_aot import CompiledKernel, expected_params

REPO = Path(__file__).resolve().parents[1]
GPU_SKIP = "needs an NVIDIA GPU: not run in this repository's CI"
ATTRS = launch.Attributes(num_heads=4, num_kv_heads=1, head_dim=256, scale=256 ** -0.5, window=512)
INPUTS = [0x7F00_0000_0000 + 0x1000 * i for i in range(launch.N_INPUTS)]  # q k v k_cache v_cache past group ws
OUTPUTS = [0x7F10_0000_0000, INPUTS[3], INPUTS[4]]  # out, then the caches aliased in place


def _env_without_interpreter(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return dict(env, **extra)


def _gpu_ready() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("cuda") is not None


def test_params_follow_the_abi_position_by_position():
    params = cl.pack_params(INPUTS, launch.scalar_args(1, 512), OUTPUTS)
    assert len(params) == launch.N_INPUTS + launch.N_SCALARS + launch.N_OUTPUTS + 2 == 15
    assert cl.ptx_types(params) == expected_params()
    assert [c for _, c in params] == [ctypes.c_void_p] * 8 + [ctypes.c_int32] * 2 + [ctypes.c_void_p] * 5
    assert [v for v, _ in params] == [*INPUTS, 1, 512, *OUTPUTS, 0, 0]  # the hidden scratch pointers are null
    assert ctypes.sizeof(ctypes.c_void_p) == 8 and ctypes.sizeof(ctypes.c_int32) == 4  # .u64 / .u32


def test_params_match_the_entry_of_real_ptx():
    """The packing against the .entry of PTX compiled here (a subprocess: the suite runs Triton's interpreter)."""
    script = ("import json; from gemma3.plugins import attention_launch as l; "
              "from gemma3.plugins.attention_aot import compile_kernel; "
              "a = l.Attributes(2, 1, 64, 0.125, 0); "
              "k = compile_kernel(a, 'float16', 'float16', l.TACTICS[1], 'sm_80'); "
              "print(json.dumps([k.params, k.num_warps]))")
    run = subprocess.run([sys.executable, "-c", script], env=_env_without_interpreter(), capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    params, num_warps = json.loads(run.stdout.strip().splitlines()[-1])
    assert tuple(params) == cl.ptx_types(cl.pack_params(INPUTS, (1, 16), OUTPUTS))
    assert num_warps * 32 == launch.block(launch.TACTICS[1])


class _Recorder:
    """Stands in for a LoadedKernel: records what launch_attention would hand cuLaunchKernel."""

    def __init__(self, num_warps: int = 4) -> None:
        self.kernel = CompiledKernel("hybrid_attention_kernel", "sm_90a", ".target sm_90a", 98560, num_warps,
                                     expected_params())
        self.calls: list[tuple] = []

    def launch(self, grid, block, params, stream=0):
        self.calls.append((tuple(grid), block, list(params), stream))


@pytest.mark.parametrize("new_tokens", [1, 300])
def test_launch_uses_the_shared_geometry(new_tokens):
    tactic = launch.TACTICS[launch.pick_tactic(new_tokens, ATTRS)]
    recorder = _Recorder()
    cl.launch_attention(recorder, ATTRS, tactic, new_tokens=new_tokens, batch=3, capacity=512, inputs=INPUTS,
                        outputs=OUTPUTS, stream=7)
    (grid, block, params, stream), = recorder.calls
    assert grid == launch.grid(new_tokens, 3, ATTRS, tactic) and block == launch.block(tactic) and stream == 7
    assert [v for v, _ in params][8:10] == [new_tokens, 512]
    assert params[3] == params[11] and params[4] == params[12]  # k_cache / v_cache are their own outputs


def test_a_kernel_of_another_tactic_is_refused():
    with pytest.raises(cl.LauncherError, match="compiled for 64 threads"):
        cl.launch_attention(_Recorder(num_warps=2), ATTRS, launch.TACTICS[0], new_tokens=4, batch=1, capacity=512,
                            inputs=INPUTS, outputs=OUTPUTS)


@pytest.mark.parametrize(("inputs", "scalars", "match"), [
    (INPUTS[:7], (1, 8), "takes 8 input pointers, got 7"),
    (INPUTS, (1, 2 ** 31), "does not fit the kernel's int32"),
    ([*INPUTS[:7], -1], (1, 8), "is not an address"),
    ([*INPUTS[:7], 1.5], (1, 8), "is not an address"),
])
def test_bad_params_are_refused_in_one_line(inputs, scalars, match):
    with pytest.raises(cl.LauncherError, match=match):
        cl.pack_params(inputs, scalars, OUTPUTS)


@pytest.mark.parametrize(("capability", "arch"), [
    ((8, 0), "sm_80"), ((8, 6), "sm_80"), ((8, 7), "sm_80"), ((8, 9), "sm_89"), ((9, 0), "sm_90a"),
    ((7, 5), None), ((10, 0), None), ((12, 0), None),
])
def test_arch_chooser(capability, arch):
    assert cl.arch_for_capability(*capability) == arch


def test_ptx_runs_only_where_its_target_does():
    assert cl.runs_on("sm_80", 9, 0) and cl.runs_on("sm_80", 8, 6) and cl.runs_on("sm_89", 9, 0)
    assert not cl.runs_on("sm_89", 8, 0) and not cl.runs_on("sm_90a", 8, 9) and not cl.runs_on("sm_90a", 10, 0)
    hopper = CompiledKernel("k", "sm_90a", "//\n.version 8.7\n.target sm_90a\n", 0, 4, expected_params())
    assert cl.ptx_target(hopper) == "sm_90a"
    cl.check_arch(hopper, 9, 0)
    with pytest.raises(cl.LauncherError, match=r"sm_90a PTX, which cannot run on this compute capability 8\.9 GPU "
                                               r"\(compile it for sm_89\)"):
        cl.check_arch(hopper, 8, 9)


def test_missing_cuda_python_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda", None)  # makes every `import cuda...` fail
    with pytest.raises(cl.LauncherError, match=r"^cuda-python is not installed \(pip install cuda-python\)$"):
        cl.load_driver()


class _Names:
    """Stands in for one of cuda-python's enums: each member is its own name."""

    def __init__(self, *names: str) -> None:
        for name in names:
            setattr(self, name, name)


class _FakeDriver:
    """cuda-python's driver API as the launcher calls it (every call returns (CUresult, *values)), recording the
    calls; cuLaunchKernel reads the kernel parameters back from the void** array, as the real driver does."""

    CUresult = _Names("CUDA_SUCCESS", "CUDA_ERROR_NO_DEVICE", "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
                      "CUDA_ERROR_INVALID_PTX")
    CUdevice_attribute = _Names("CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR",
                                "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR",
                                "CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN")
    CUfunction_attribute = _Names("CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES",
                                  "CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES")
    CUjit_option = _Names("CU_JIT_ERROR_LOG_BUFFER", "CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES")
    OK = "CUDA_SUCCESS"

    def __init__(self, capability=(9, 0), init="CUDA_SUCCESS", load="CUDA_SUCCESS", log=b"") -> None:
        self.capability, self.init, self.load, self.log = capability, init, load, log
        self.calls: list[tuple] = []

    def cuInit(self, flags):
        if isinstance(self.init, Exception):
            raise self.init
        return (self.init,)

    def cuGetErrorName(self, error):
        return self.OK, error.encode()

    def cuDeviceGetCount(self):
        return self.OK, 1

    def cuDeviceGet(self, ordinal):
        return self.OK, f"device{ordinal}"

    def cuDeviceGetAttribute(self, which, device):
        values = dict(zip(vars(self.CUdevice_attribute), (*self.capability, 232448)))
        return self.OK, values[which]

    def cuDeviceGetName(self, length, device):
        return self.OK, b"NVIDIA H200\0\0\0"

    def cuDriverGetVersion(self):
        return self.OK, 12000

    def cuDevicePrimaryCtxRetain(self, device):
        return self.OK, "context"

    def cuModuleLoadDataEx(self, image, count, options, values):
        self.calls.append(("load", image))
        values[0][: len(self.log)] = self.log
        return (self.load, "module" if self.load == self.OK else None)

    def cuModuleGetFunction(self, module, name):
        return self.OK, f"function {name.decode()}"

    def cuFuncGetAttribute(self, which, function):
        return self.OK, 0

    def cuFuncSetAttribute(self, function, which, value):
        self.calls.append(("set", which, value))
        return (self.OK,)

    def cuLaunchKernel(self, function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        argv = (ctypes.c_void_p * 15).from_address(params)
        kinds = {"u64": ctypes.c_uint64, "u32": ctypes.c_int32}
        values = [kinds[t].from_address(argv[i]).value for i, t in enumerate(expected_params())]
        self.calls.append(("launch", function, (gx, gy, gz), (bx, by, bz), shared, stream, values, extra))
        return (self.OK,)

    def __getattr__(self, name):  # cuCtxSetCurrent, cuCtxSynchronize, cuModuleUnload, ...: succeed
        return lambda *args: (self.OK,)


def _kernel(shared: int, arch: str = "sm_90a") -> CompiledKernel:
    ptx = f"//\n.version 8.7\n.target {arch}\n.address_size 64\n"
    return CompiledKernel("hybrid_attention_kernel", arch, ptx, shared, 4, expected_params())


@pytest.mark.parametrize("shared", [98560, 43520])
def test_the_launcher_drives_the_driver_like_tensorrt(monkeypatch, shared):
    fake = _FakeDriver()
    monkeypatch.setattr(cl, "load_driver", lambda: fake)
    device = cl.Device(0)
    assert (device.name, device.capability) == ("NVIDIA H200", (9, 0))
    loaded = device.load(_kernel(shared))
    tactic = launch.TACTICS[1]
    cl.launch_attention(loaded, ATTRS, tactic, new_tokens=1, batch=2, capacity=512, inputs=INPUTS,
                        outputs=OUTPUTS, stream=1234)
    (_, image), *settings, launched = fake.calls
    assert image.endswith(b"\0") and b".target sm_90a" in image
    big = [("set", "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", shared)]
    assert settings == (big if shared > 48 * 1024 else [])
    _, function, grid, block, shm, stream, values, extra = launched
    assert function == "function hybrid_attention_kernel" and grid == launch.grid(1, 2, ATTRS, tactic)
    assert block == (launch.block(tactic), 1, 1) and shm == shared and stream == 1234 and extra == 0
    assert values == [*INPUTS, 1, 512, *OUTPUTS, 0, 0]


@pytest.mark.parametrize(("fake", "match"), [
    (_FakeDriver(init="CUDA_ERROR_NO_DEVICE"), r"^no NVIDIA GPU: cuInit failed: CUDA_ERROR_NO_DEVICE$"),
    (_FakeDriver(init=RuntimeError("libcuda.so not found")), r"^no NVIDIA GPU: libcuda.so not found$"),
])
def test_no_gpu_is_one_line(monkeypatch, fake, match):
    monkeypatch.setattr(cl, "load_driver", lambda: fake)
    with pytest.raises(cl.LauncherError, match=match):
        cl.Device(0)


@pytest.mark.parametrize(("fake", "kernel", "match"), [
    (_FakeDriver(capability=(8, 9)), _kernel(0), r"sm_90a PTX, which cannot run on this compute capability 8\.9"),
    (_FakeDriver(load="CUDA_ERROR_UNSUPPORTED_PTX_VERSION"), _kernel(0),
     r"CUDA_ERROR_UNSUPPORTED_PTX_VERSION \(PTX ISA 8\.7 is newer than this driver, CUDA 12\.0: update"),
    (_FakeDriver(load="CUDA_ERROR_INVALID_PTX", log=b"ptxas fatal\nbad line\0"), _kernel(0),
     r"failed: CUDA_ERROR_INVALID_PTX \(ptxas fatal; bad line\)$"),
])
def test_load_errors_are_one_line(monkeypatch, fake, kernel, match):
    monkeypatch.setattr(cl, "load_driver", lambda: fake)
    with pytest.raises(cl.LauncherError, match=match):
        cl.Device(0).load(kernel)
    if "capability" in match:
        assert fake.calls == []  # refused before the driver saw the PTX


def test_a_variant_too_big_for_the_gpu_is_told_apart(monkeypatch):
    """fp32 head_dim 256 needs 213504 B of shared memory with tactic 0: more than an sm_89 block may have."""
    from bench import gpu

    monkeypatch.setattr(cl, "load_driver", lambda: _FakeDriver())
    with pytest.raises(cl.SharedMemoryError, match=r"needs 300000 bytes of shared memory; this GPU allows 232448"):
        cl.Device(0).load(_kernel(300_000))
    results = [{"case": "a", "tactic": 0, "pass": True, "out_excess": -0.5, "cache_mismatches": 0},
               {"case": "b", "tactic": 0, "pass": False, "unfit": "SharedMemoryError: ..."}]
    verdict, detail = gpu._summary(results, skipped_fp8=0)
    assert verdict == "PASS 1/1" and "1 do not fit this GPU's shared memory: b/t0" in detail
    results.append({"case": "c", "tactic": 1, "pass": False, "out_excess": 0.1, "cache_mismatches": 0})
    verdict, detail = gpu._summary(results, skipped_fp8=0)
    assert verdict == "FAIL 1/2" and detail.endswith("failed: c/t1")


def test_gpu_check_without_a_gpu_exits_2_with_one_line():
    run = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=_env_without_interpreter(CUDA_VISIBLE_DEVICES=""))
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stdout.strip().splitlines() == [
        "gpu check: no CUDA GPU found (torch.cuda.is_available() is False); nothing was run"]


def test_gpu_cases_are_valid_steps():
    from bench import gpu

    cases = gpu.interpreter_cases()
    assert len(cases) == 39
    for case in [*cases, *gpu.gpu_cases(fp8=True)]:
        launch.check(case.attrs, case.dtype, gpu.cache_dtype(case))
        if not case.window:
            assert max(case.past_lens) + case.new_tokens <= case.capacity, case.name
    assert not any(c.fp8 for c in gpu.gpu_cases(fp8=False))


def test_engine_rows_without_tensorrt(monkeypatch, capsys):
    from bench import gpu

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert gpu.tensorrt_rows()[0][:2] == ("TensorRT", "not installed (engine rows skipped)")
    monkeypatch.setitem(sys.modules, "gemma3.engine", None)  # the engine builder not importable
    result, reason = gpu.build_and_check_270m()
    assert result == "skipped" and "gemma3.engine" in reason
    assert capsys.readouterr().out == f"engine build: skipped ({reason})\n"


def test_engine_hook_calls_the_builders_check(monkeypatch):
    from bench import gpu

    fake = types.ModuleType("gemma3.engine.check")
    fake.build_and_check_270m = lambda: ("PASS", "built and generated")
    package = types.ModuleType("gemma3.engine")
    package.check = fake
    monkeypatch.setitem(sys.modules, "gemma3.engine", package)
    monkeypatch.setitem(sys.modules, "gemma3.engine.check", fake)
    assert gpu.build_and_check_270m() == ("PASS", "built and generated")


def test_gpu_smoke_run():
    """A few cases through both launchers on a real GPU (`python -m bench.gpu --quick`)."""
    if not _gpu_ready():
        pytest.skip(GPU_SKIP)
    run = subprocess.run([sys.executable, "-m", "bench.gpu", "--quick", "--json", os.devnull], cwd=REPO,
                         capture_output=True, text=True, timeout=600, env=_env_without_interpreter())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_device_opens_with_the_primary_context():
    if not _gpu_ready():
        pytest.skip(GPU_SKIP)
    device = cl.Device(0)
    try:
        assert cl.arch_for_capability(*device.capability) is not None and device.shared_optin >= 48 * 1024
        device.synchronize()
    finally:
        device.close()
