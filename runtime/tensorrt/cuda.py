"""Thin, torch-free helpers over cuda-python's runtime API: device and pinned buffers, copies on a stream, CUDA graphs.

cuda-python returns `(error, *values)` from every call; `check` turns a failure into a `CudaError` naming the
cudaError_t (cudaErrorMemoryAllocation, ...). Both module layouts are accepted: `cuda.bindings.runtime`
(cuda-python >= 12.6, 13.x) and the older `cuda.cudart`. Only the runtime API is used: it shares the primary
context TensorRT uses, so pointers from here can be bound to engine tensors as they are.

The host-side dtype helpers at the end convert numpy arrays to and from the bytes of device element types numpy
lacks (bfloat16), without ml_dtypes.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8e4m3fn": 1, "int64": 8, "int32": 4, "int8": 1,
            "uint8": 1, "bool": 1}
_cudart: Any = None


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the call and the cudaError_t."""


def runtime_bindings():
    """cuda-python's runtime API module (ImportError naming cuda-python if neither layout is installed)."""
    global _cudart
    if _cudart is None:
        try:
            from cuda.bindings import runtime
        except ImportError:
            try:
                from cuda import cudart as runtime
            except ImportError:
                raise ImportError("No module named 'cuda.bindings' (cuda-python)") from None
        _cudart = runtime
    return _cudart


def check(result: Any, what: str) -> Any:
    """The value(s) of a cuda-python call, or `CudaError` "what: cudaErrorName"."""
    err, *values = result if isinstance(result, tuple) else (result,)
    code = int(getattr(err, "value", err))
    if code != 0:
        raise CudaError(f"{what}: {getattr(err, 'name', f'cudaError {code}')}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def set_device(device: int) -> None:
    check(runtime_bindings().cudaSetDevice(device), "cudaSetDevice")


def device_capability(device: int = 0) -> tuple[int, int]:
    rt = runtime_bindings()
    attr = rt.cudaDeviceAttr
    major = check(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute")
    minor = check(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute")
    return int(major), int(minor)


def device_name(device: int = 0) -> str:
    name = check(runtime_bindings().cudaGetDeviceProperties(device), "cudaGetDeviceProperties").name
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).split("\x00")[0].strip()


class Stream:
    """A non-blocking stream (TensorRT warns against the default stream: it adds device-wide syncs)."""

    def __init__(self) -> None:
        rt = runtime_bindings()
        self.cuda = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self.handle = int(self.cuda)  # what TensorRT's execute_async_v3 / set_optimization_profile_async take

    def synchronize(self) -> None:
        check(runtime_bindings().cudaStreamSynchronize(self.cuda), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.cuda is not None:
            check(runtime_bindings().cudaStreamDestroy(self.cuda), "cudaStreamDestroy")
            self.cuda = None


def _release(free: str, ptr: int) -> None:
    """Finalizer of a buffer dropped without `free()`: never raises (it may run while CUDA shuts down)."""
    try:
        getattr(runtime_bindings(), free)(ptr)
    except Exception as e:  # a finalizer has nobody to raise to
        log.debug("%s(%#x) failed: %s", free, ptr, e)


class DeviceBuffer:
    """`nbytes` of device memory (cudaMalloc: 256-byte aligned, as TensorRT needs for tensors and activations).
    Freed by `free()`, or when garbage-collected."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr: int | None = int(check(runtime_bindings().cudaMalloc(max(self.nbytes, 1)), "cudaMalloc"))
        self._finalizer = weakref.finalize(self, _release, "cudaFree", self.ptr)
        self._finalizer.atexit = False  # at exit the driver reclaims everything

    def zero(self, stream: Stream) -> None:
        check(runtime_bindings().cudaMemsetAsync(self.ptr, 0, self.nbytes, stream.cuda), "cudaMemsetAsync")

    def upload(self, host: np.ndarray, stream: Stream) -> None:
        """Copy a C-contiguous host array into the start of this buffer (pinned: truly async; keep it unchanged
        until the stream is synchronized)."""
        if host.nbytes > self.nbytes:
            raise ValueError(f"{host.nbytes} bytes do not fit a buffer of {self.nbytes}")
        rt = runtime_bindings()
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(rt.cudaMemcpyAsync(self.ptr, host.ctypes.data, host.nbytes, kind, stream.cuda), "cudaMemcpyAsync H2D")

    def download(self, host: np.ndarray, stream: Stream) -> None:
        """Copy the start of this buffer into a C-contiguous host array (valid after stream synchronization)."""
        if host.nbytes > self.nbytes:
            raise ValueError(f"a buffer of {self.nbytes} bytes cannot fill {host.nbytes}")
        rt = runtime_bindings()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt.cudaMemcpyAsync(host.ctypes.data, self.ptr, host.nbytes, kind, stream.cuda), "cudaMemcpyAsync D2H")

    def free(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr = self.ptr, None
            self._finalizer.detach()
            check(runtime_bindings().cudaFree(ptr), "cudaFree")


class PinnedArray:
    """A numpy array in page-locked host memory: the staging side of async copies."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | str) -> None:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        nbytes = max(count * dtype.itemsize, 1)
        self.ptr: int | None = int(check(runtime_bindings().cudaMallocHost(nbytes), "cudaMallocHost"))
        raw = (ctypes.c_char * nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)
        self._finalizer = weakref.finalize(self, _release, "cudaFreeHost", self.ptr)
        self._finalizer.atexit = False

    def free(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr = self.ptr, None
            self.array = None
            self._finalizer.detach()
            check(runtime_bindings().cudaFreeHost(ptr), "cudaFreeHost")


class Graph:
    """A CUDA graph of the work `enqueue` puts on a stream, instantiated for replay."""

    def __init__(self, graph: Any, instance: Any) -> None:
        self._graph, self._instance = graph, instance

    @classmethod
    def capture(cls, stream: Stream, enqueue: Callable[[], bool]) -> Graph:
        """Capture `enqueue()` (which returns False on failure); `CudaError` if anything in it cannot be captured.
        Thread-local mode: other threads' CUDA calls are not affected by this capture."""
        rt = runtime_bindings()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(stream.cuda, mode), "cudaStreamBeginCapture")
        enqueued, failure = False, None
        try:
            enqueued = bool(enqueue())
        except Exception as e:  # TensorRT raises its own types; the capture must be ended whatever happened
            failure = e
        finally:
            ended = rt.cudaStreamEndCapture(stream.cuda)  # leaves capture mode even after a failed capture
        rt.cudaGetLastError()  # a failed capture leaves the error as the last one; the stream goes on
        if failure is not None or not enqueued:
            if int(getattr(ended[0], "value", ended[0])) == 0 and ended[1] is not None:
                rt.cudaGraphDestroy(ended[1])
            raise CudaError(f"the enqueue under capture failed ({failure or 'it returned False'})")
        graph = check(ended, "cudaStreamEndCapture")
        try:
            instance = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except CudaError:
            rt.cudaGraphDestroy(graph)
            raise
        return cls(graph, instance)

    def launch(self, stream: Stream) -> None:
        check(runtime_bindings().cudaGraphLaunch(self._instance, stream.cuda), "cudaGraphLaunch")

    def destroy(self) -> None:
        if self._instance is not None:
            rt = runtime_bindings()
            rt.cudaGraphExecDestroy(self._instance)
            rt.cudaGraphDestroy(self._graph)
            self._graph = self._instance = None


# --- host arrays in device element types --------------------------------------------------------------------


def to_device_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    """A C-contiguous array holding `array`'s values as `dtype` bytes (bfloat16: round to nearest even)."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        rounded = rounded.astype(np.uint16)
        return np.where(np.isnan(array), np.uint16(0x7FC0), rounded)  # keep NaN a NaN (rounding may carry it)
    if dtype in ("float32", "float16", "int32", "int64"):
        return np.ascontiguousarray(array, dtype=dtype)
    raise ValueError(f"no host conversion to {dtype}")


def from_device_dtype(raw: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of `raw`, an array holding `dtype` elements (bfloat16: as uint16 bits, `host_storage`)."""
    if dtype == "bfloat16":
        return (raw.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    if dtype in ("float32", "float16"):
        return raw.astype(np.float32)
    raise ValueError(f"no host conversion from {dtype}")


def host_storage(dtype: str) -> np.dtype:
    """The numpy dtype holding one device element of `dtype` (bfloat16 as uint16 bits)."""
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
