"""Launch the AOT-compiled attention kernel with the CUDA driver API, as TensorRT's AOT plugin launches it.

TensorRT loads the PTX that `attention_aot.compile_kernel` returns and calls cuLaunchKernel with the grid, block
and shared memory of its KernelLaunchParams and the kernel parameters in ABI order (facts file 1.2): the input
pointers, the int32 scalars, the output pointers. Triton 3.5 appends two hidden pointers (global and profile
scratch) that no AOT launcher fills, so they go in as null. This module does the same with cuda-python, so the
GPU check (`bench/gpu.py`) runs exactly what an engine would, outside TensorRT.

No torch here (tensors arrive as device pointers, plain ints) and cuda-python is imported only when a device is
opened: `pack_params`, `launch_attention`'s geometry and the arch checks run on a machine without either.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Sequence
from typing import Any

from gemma3.plugins import attention_launch as launch
from gemma3.plugins.attention_aot import ARCHS, HIDDEN_POINTERS, CompiledKernel, expected_params
from gemma3.plugins.attention_aot import arch_for_capability as aot_arch

DEFAULT_SHARED_LIMIT = 48 * 1024  # above this a kernel must opt in to more dynamic shared memory
PTX_TYPES: dict[type, str] = {ctypes.c_void_p: "u64", ctypes.c_int32: "u32"}  # how .entry declares each ctype
_JIT_LOG_BYTES = 8192
_INT32 = (-(2 ** 31), 2 ** 31 - 1)


class LauncherError(RuntimeError):
    """A one-line reason the kernel could not be loaded or launched."""


class SharedMemoryError(LauncherError):
    """The variant needs more shared memory per block than this GPU has (e.g. fp32 head_dim 256 on sm_89)."""


Param = tuple[int, type]


def pack_params(inputs: Sequence[int], scalars: Sequence[int], outputs: Sequence[int]) -> list[Param]:
    """The kernel parameters in ABI order as (value, ctype): input pointers, int32 scalars, output pointers, then
    null for Triton's hidden scratch pointers. Pointers are plain ints (`tensor.data_ptr()`, a CUdeviceptr)."""
    groups = (("input pointers", inputs, launch.N_INPUTS), ("scalars", scalars, launch.N_SCALARS),
              ("output pointers", outputs, launch.N_OUTPUTS))
    for what, values, count in groups:
        if len(values) != count:
            raise LauncherError(f"the kernel takes {count} {what}, got {len(values)}")
    for pointer in (*inputs, *outputs):
        if not isinstance(pointer, int) or not 0 <= pointer < 2 ** 64:
            raise LauncherError(f"device pointer {pointer!r} is not an address (pass tensor.data_ptr())")
    for scalar in scalars:
        if not isinstance(scalar, int) or not _INT32[0] <= scalar <= _INT32[1]:
            raise LauncherError(f"scalar {scalar!r} does not fit the kernel's int32")
    return ([(int(p), ctypes.c_void_p) for p in inputs] + [(int(s), ctypes.c_int32) for s in scalars]
            + [(int(p), ctypes.c_void_p) for p in outputs] + [(0, ctypes.c_void_p)] * HIDDEN_POINTERS)


def ptx_types(params: Sequence[Param]) -> tuple[str, ...]:
    """The .entry parameter types that `params` fill, comparable with `attention_aot.expected_params()`."""
    return tuple(PTX_TYPES[ctype] for _, ctype in params)


def arch_for_capability(major: int, minor: int) -> str | None:
    """The PTX target compiled for a device (attention_aot's choice), None where the plugin has none."""
    try:
        return aot_arch(major, minor)
    except ValueError:
        return None


def ptx_target(kernel: CompiledKernel) -> str:
    """The PTX's own `.target` (the truth a driver goes by), else the arch it was compiled for."""
    found = re.search(r"^\s*\.target\s+(\w+)", kernel.ptx, re.M)
    return found.group(1) if found else kernel.arch


def runs_on(arch: str, major: int, minor: int) -> bool:
    """PTX for sm_80 / sm_89 JIT-compiles on that capability and newer; arch-specific sm_90a only on 9.0."""
    if arch not in ARCHS:
        return False
    if arch.endswith("a"):
        return major * 10 + minor == ARCHS[arch]
    return major * 10 + minor >= ARCHS[arch]


def check_arch(kernel: CompiledKernel, major: int, minor: int) -> None:
    arch = ptx_target(kernel)
    if not runs_on(arch, major, minor):
        want = arch_for_capability(major, minor)
        hint = f"compile it for {want}" if want else "no PTX target of the plugin fits this GPU"
        raise LauncherError(f"{kernel.name} is {arch} PTX, which cannot run on this compute capability "
                            f"{major}.{minor} GPU ({hint})")


def load_driver() -> Any:
    """cuda-python's driver module: `cuda.bindings.driver` (cuda-python >= 12.6, 13), else `cuda.cuda`."""
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver
        except ImportError:
            raise LauncherError("cuda-python is not installed (pip install cuda-python)") from None
    return driver


class Device:
    """One GPU's primary context (the one torch and TensorRT use, so their device pointers are valid here), made
    current on the thread that opens it: launch from that thread."""

    def __init__(self, ordinal: int = 0) -> None:
        self.driver = drv = load_driver()
        try:
            self._check("cuInit", drv.cuInit(0))
        except RuntimeError as error:  # LauncherError included; cuda-python raises when libcuda.so is absent
            raise LauncherError(f"no NVIDIA GPU: {error}") from None
        count = self._check("cuDeviceGetCount", drv.cuDeviceGetCount())
        if ordinal >= count:
            raise LauncherError(f"no NVIDIA GPU {ordinal}: {count} visible")
        self.device = self._check("cuDeviceGet", drv.cuDeviceGet(ordinal))
        attr = drv.CUdevice_attribute
        self.capability = (self.attribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                           self.attribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR))
        self.shared_optin = self.attribute(attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        name = self._check("cuDeviceGetName", drv.cuDeviceGetName(256, self.device))
        self.name = name.split(b"\0", 1)[0].decode(errors="replace")
        self.driver_version = self._check("cuDriverGetVersion", drv.cuDriverGetVersion())
        self.context = self._check("cuDevicePrimaryCtxRetain", drv.cuDevicePrimaryCtxRetain(self.device))
        self._check("cuCtxSetCurrent", drv.cuCtxSetCurrent(self.context))

    def attribute(self, which: Any) -> int:
        return int(self._check("cuDeviceGetAttribute", self.driver.cuDeviceGetAttribute(which, self.device)))

    def error_name(self, error: Any) -> str:
        try:
            found, name = self.driver.cuGetErrorName(error)
            if found == self.driver.CUresult.CUDA_SUCCESS and name:
                return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # an unknown code: the enum's own name is all there is
            pass
        return str(getattr(error, "name", error))

    def _check(self, what: str, result: Any, hint: str = "") -> Any:
        """cuda-python returns (CUresult, *values): raise on an error, else return the value(s)."""
        error, *values = result if isinstance(result, tuple) else (result,)
        if error != self.driver.CUresult.CUDA_SUCCESS:
            raise LauncherError(f"{what} failed: {self.error_name(error)}{hint}")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def load(self, kernel: CompiledKernel) -> LoadedKernel:
        return LoadedKernel(self, kernel)

    def synchronize(self) -> None:
        self._check("cuCtxSynchronize", self.driver.cuCtxSynchronize())

    def close(self) -> None:
        if getattr(self, "context", None) is not None:
            self.driver.cuDevicePrimaryCtxRelease(self.device)
            self.context = None


class LoadedKernel:
    """A CompiledKernel's PTX loaded as a module on a Device (JIT-compiled by the driver), ready to launch."""

    def __init__(self, device: Device, kernel: CompiledKernel) -> None:
        if kernel.params != expected_params():
            raise LauncherError(f"{kernel.name}: PTX parameters {kernel.params} are not the plugin ABI")
        check_arch(kernel, *device.capability)
        self.device, self.kernel = device, kernel
        self.module = self._load_module()
        try:
            self._prepare()
        except LauncherError:
            self.unload()
            raise

    def _prepare(self) -> None:
        """The function handle, and the shared memory it launches with (checked against the device's limit)."""
        device, drv, kernel = self.device, self.device.driver, self.kernel
        self.function = device._check("cuModuleGetFunction", drv.cuModuleGetFunction(self.module,
                                                                                     kernel.name.encode()))
        fattr = drv.CUfunction_attribute
        static = device._check("cuFuncGetAttribute",
                               drv.cuFuncGetAttribute(fattr.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, self.function))
        needed = kernel.shared + int(static)
        if needed > device.shared_optin:
            raise SharedMemoryError(f"{kernel.name} needs {needed} bytes of shared memory; this GPU allows "
                                    f"{device.shared_optin} per block")
        if kernel.shared > DEFAULT_SHARED_LIMIT:  # Triton's shared memory is dynamic: opt in, as TensorRT does
            device._check("cuFuncSetAttribute", drv.cuFuncSetAttribute(
                self.function, fattr.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, kernel.shared))

    def _load_module(self) -> Any:
        device, drv = self.device, self.device.driver
        image = self.kernel.ptx.encode() + b"\0"  # the driver reads PTX as a C string
        log = bytearray(_JIT_LOG_BYTES)
        jit = drv.CUjit_option
        try:
            result = drv.cuModuleLoadDataEx(image, 2, [jit.CU_JIT_ERROR_LOG_BUFFER,
                                                       jit.CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES], [log, len(log)])
        except TypeError:  # a binding that takes no bytearray as a log buffer: load without the log
            result = drv.cuModuleLoadData(image)
        version = re.search(r"^\s*\.version\s+(\S+)", self.kernel.ptx, re.M)
        hint = ""
        if result[0] == drv.CUresult.CUDA_ERROR_UNSUPPORTED_PTX_VERSION:
            hint = (f" (PTX ISA {version.group(1) if version else '?'} is newer than this driver, "
                    f"CUDA {device.driver_version // 1000}.{device.driver_version % 1000 // 10}: update the driver)")
        elif log.strip(b"\0"):
            hint = " (" + log.split(b"\0", 1)[0].decode(errors="replace").strip().replace("\n", "; ") + ")"
        return device._check(f"cuModuleLoadData({self.kernel.name}, {self.kernel.arch})", result, hint)

    def launch(self, grid: Sequence[int], block: int, params: Sequence[Param], stream: int = 0) -> None:
        """cuLaunchKernel with `params` as the void** array the driver copies the values from."""
        if len(grid) != 3 or min(grid) < 1:
            raise LauncherError(f"grid {tuple(grid)} is empty: nothing to launch")
        if ptx_types(params) != self.kernel.params:
            raise LauncherError(f"parameters {ptx_types(params)} do not match {self.kernel.name}'s .entry")
        values = [ctype(value) for value, ctype in params]  # alive until the call returns (the driver copies)
        argv = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        device = self.device
        device._check(f"cuLaunchKernel({self.kernel.name})", device.driver.cuLaunchKernel(
            self.function, *(int(g) for g in grid), int(block), 1, 1, self.kernel.shared, int(stream),
            ctypes.addressof(argv), 0))

    def unload(self) -> None:
        if getattr(self, "module", None) is not None:
            self.device.driver.cuModuleUnload(self.module)
            self.module = None


def launch_attention(kernel: LoadedKernel, attrs: launch.Attributes, tactic: launch.Tactic, *, new_tokens: int,
                     batch: int, capacity: int, inputs: Sequence[int], outputs: Sequence[int],
                     stream: int = 0) -> None:
    """One HybridAttention step: the grid, block and scalars TensorRT computes from the same shapes
    (attention_launch), inputs = (q, k, v, k_cache, v_cache, past_len, group_ids, workspace) and
    outputs = (out, k_cache_out, v_cache_out) as device pointers; the caches alias (same pointer in and out)."""
    block = launch.block(tactic)
    if kernel.kernel.block != block:
        raise LauncherError(f"{kernel.kernel.name} was compiled for {kernel.kernel.block} threads, the tactic "
                            f"launches {block}")
    params = pack_params(inputs, launch.scalar_args(new_tokens, capacity), outputs)
    kernel.launch(launch.grid(new_tokens, batch, attrs, tactic), block, params, stream)
