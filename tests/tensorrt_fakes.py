"""Fakes of `tensorrt` and cuda-python for the TensorRT backend's CPU tests (tests/test_runtime_tensorrt.py).

Device memory is host memory (ctypes buffers at their addresses); the fake engine's introspection comes from the
exported ONNX graph and the builder's profiles, and its work (`ort_run`) runs that graph on ONNX Runtime, reading
inputs from and writing outputs to the addresses the decoder bound; stream capture records the enqueued work and a
graph launch replays it.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
from onnx import TensorProto

from gemma3.runtime.tensorrt import cuda

VERSION = "10.13.0.35"
ONNX_TRT = {TensorProto.FLOAT: "FLOAT", TensorProto.BFLOAT16: "BF16", TensorProto.FLOAT16: "HALF",
            TensorProto.INT64: "INT64", TensorProto.INT32: "INT32", TensorProto.FLOAT8E4M3FN: "FP8"}
OURS = {"FLOAT": "float32", "BF16": "bfloat16", "HALF": "float16", "INT64": "int64", "INT32": "int32",
        "FP8": "float8e4m3fn"}

def graph_tensors(onnx_file: Path) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """name -> (io, TensorRT dtype name, dims with -1 for symbolic ones), as TensorRT's parser would see them."""
    graph = onnx.load(onnx_file, load_external_data=False).graph
    out = {}
    for io, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            t = v.type.tensor_type
            out[v.name] = (io, ONNX_TRT[t.elem_type], tuple(d.dim_value if d.HasField("dim_value") else -1
                                                             for d in t.shape.dim))
    return out


class FakeEngine:
    """A tensorrt.ICudaEngine's introspection, from the ONNX graph and the builder's profiles; `run` executes it."""

    def __init__(self, tensors: dict, profiles: list[dict], run=None, out_shape=None) -> None:
        self.tensors, self.profiles, self.run, self.out_shape = tensors, profiles, run, out_shape
        self.contexts: list[FakeContext] = []

    @property
    def num_io_tensors(self):
        return len(self.tensors)

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_mode(self, name):
        return self.tensors[name][0]

    def get_tensor_dtype(self, name):
        return SimpleNamespace(name=self.tensors[name][1])

    def get_tensor_shape(self, name):
        return self.tensors[name][2]

    def get_tensor_profile_shape(self, name, index):
        return list(self.profiles[index][name])

    def is_shape_inference_io(self, name):
        return False

    def get_device_memory_size_for_profile_v2(self, index):
        return 4096

    def create_execution_context(self, strategy=None):
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


FAKE_TRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="input", OUTPUT="output"))



class _Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorStreamCaptureUnsupported = 900


OK = _Err.cudaSuccess


class FakeCudart:
    """cuda-python's runtime API over host memory; stream capture records the work enqueued, launch replays it."""

    cudaStreamNonBlocking = 1
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)
    cudaDeviceAttr = SimpleNamespace(cudaDevAttrComputeCapabilityMajor="major",
                                     cudaDevAttrComputeCapabilityMinor="minor")

    def __init__(self, capture_fails: bool = False) -> None:
        self.memory: dict[int, ctypes.Array] = {}
        self.capturing: dict[int, list] = {}
        self.capture_fails, self.launches, self.streams = capture_fails, 0, 0

    def cudaSetDevice(self, device):
        return (OK,)

    def cudaDeviceGetAttribute(self, attr, device):
        return OK, 9 if attr == "major" else 0

    def cudaGetDeviceProperties(self, device):
        return OK, SimpleNamespace(name=b"Fake H200\x00")

    def cudaStreamCreateWithFlags(self, flags):
        self.streams += 1
        return OK, 100 + self.streams

    def cudaMalloc(self, nbytes):
        buffer = ctypes.create_string_buffer(nbytes)
        self.memory[ctypes.addressof(buffer)] = buffer
        return OK, ctypes.addressof(buffer)

    cudaMallocHost = cudaMalloc

    def cudaFree(self, ptr):
        del self.memory[ptr]
        return (OK,)

    cudaFreeHost = cudaFree

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        ctypes.memset(ptr, value, nbytes)
        return (OK,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert stream not in self.capturing, "the decoder copies outside the captured graph"
        ctypes.memmove(dst, src, nbytes)
        return (OK,)

    def cudaStreamSynchronize(self, stream):
        return (OK,)

    cudaStreamDestroy = cudaStreamSynchronize

    def cudaStreamBeginCapture(self, stream, mode):
        if self.capture_fails:
            return (_Err.cudaErrorStreamCaptureUnsupported,)
        self.capturing[stream] = []
        return (OK,)

    def cudaStreamEndCapture(self, stream):
        return OK, self.capturing.pop(stream)

    def cudaGraphInstantiate(self, graph, flags):
        return OK, graph

    def cudaGraphLaunch(self, graph, stream):
        self.launches += 1
        for work in graph:
            work()
        return (OK,)

    def cudaGraphExecDestroy(self, graph):
        return (OK,)

    cudaGraphDestroy = cudaGraphExecDestroy

    def cudaGetLastError(self):
        return (OK,)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.addresses, self.shapes, self.profile = engine, {}, {}, 0

    def set_device_memory(self, ptr, size):
        assert ptr and size

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.profiles[self.profile][name]
        ok = all(lo <= s <= hi for lo, s, hi in zip(low, shape, high))
        if ok:
            self.shapes[name] = tuple(shape)
        return ok

    def infer_shapes(self):
        return [n for n, (io, _, dims) in self.engine.tensors.items() if io == "input" and -1 in dims
                and n not in self.shapes]

    def get_tensor_shape(self, name):
        return self.engine.out_shape(self.shapes)

    def execute_async_v3(self, stream):
        state = dict(self.addresses), dict(self.shapes)  # a CUDA graph keeps what was bound at capture
        work = lambda: self.engine.run(self.engine, *state)  # noqa: E731
        capture = FAKE.cudart.capturing.get(stream) if FAKE.cudart else None
        if capture is not None:
            capture.append(work)
        else:
            work()
        return True


FAKE = SimpleNamespace(cudart=None)


def read(ptr: int, shape, dtype: str) -> np.ndarray:
    count = int(np.prod(shape))
    storage = cuda.host_storage(dtype)
    raw = np.frombuffer((ctypes.c_char * (count * storage.itemsize)).from_address(ptr), storage, count).reshape(shape)
    return raw.copy() if dtype in ("int64", "int32") else cuda.from_device_dtype(raw, dtype)


def write(ptr: int, value: np.ndarray, dtype: str) -> None:
    data = cuda.to_device_dtype(value, dtype)
    ctypes.memmove(ptr, data.ctypes.data, data.nbytes)


def ort_run(session, record: list):
    """The engine's work: the exported graph on ONNX Runtime, from and to the bound device addresses."""
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]

    def run(engine: FakeEngine, addresses: dict, shapes: dict) -> None:
        def shape(name):
            return shapes.get(name, engine.tensors[name][2])

        feeds = {n: read(addresses[n], shape(n), OURS[engine.tensors[n][1]]) for n in names}
        rows = engine.tensors.get("image_features") and read(addresses["image_features"], shape("image_features"),
                                                             OURS[engine.tensors["image_features"][1]])
        record.append({"ids": feeds["input_ids"][0].tolist(), "past": int(feeds["past_len"][0]), "rows": rows,
                       "past_key.0": addresses["past_key.0"], "present_key.0": addresses.get("present_key.0")})
        for name, value in zip(outputs, session.run(outputs, feeds)):
            write(addresses[name], value, OURS[engine.tensors[name][1]])

    return run


def fake_backend(monkeypatch, engines: dict[bytes, FakeEngine], capture_fails: bool = False) -> FakeCudart:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSION
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: engines.get(bytes(data)))
    trt.TensorIOMode = FAKE_TRT.TensorIOMode
    trt.ExecutionContextAllocationStrategy = SimpleNamespace(USER_MANAGED=2)
    cudart = FakeCudart(capture_fails)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(cuda, "_cudart", cudart)
    monkeypatch.setattr(FAKE, "cudart", cudart)
    return cudart
