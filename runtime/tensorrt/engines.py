"""`MODEL_DIR/engines/engines.json` (written by `gemma3-build`), read and checked against the export and this machine.

An engine only deserializes in the TensorRT version that built it, and runs only on GPUs of the compute capability
it was built for (its attention kernel is PTX for one architecture: sm_90a runs on 9.0 only). So the runtime
checks both, and the precision and dtypes against the export's manifest, before it touches a GPU, and says in one
line what to rebuild or install. Nothing here imports tensorrt or cuda-python: `installed()` does, lazily.

The engines' IO contract is here too, as plain data: `binding_plan` lists every tensor a one-sequence decoder
binds (name, shape, dtype, the input an in-place output aliases), and `check_engine_io` compares it with what a
deserialized engine reports (through `TrtEngineView`, or any object with the same methods).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gemma3.plugins.attention_aot import arch_for_capability
from gemma3.runtime.manifest import LOCAL, Manifest, ManifestError, _Reader, read_json_object
from gemma3.runtime.tensorrt import cuda
from gemma3.runtime.tensorrt.cuda import ITEMSIZE

log = logging.getLogger(__name__)

ENGINES_DIR = "engines"
ENGINES_FILE = "engines.json"
FORMAT_VERSION = 1  # the engines.json layout this runtime reads
PREFILL, DECODE = "prefill", "decode"  # the decoder engine's optimization profiles, by role
NO_ENGINES = ("{root} holds TensorRT-target graphs but no engines: build them with `gemma3-build {root}` on the GPU "
              "machine")
INSTALL = "pip install tensorrt-cu12{pin} cuda-python --extra-index-url https://pypi.nvidia.com"


class BackendMissing(ManifestError):
    """tensorrt or cuda-python cannot be imported (or no usable NVIDIA GPU): one line saying what to install."""


@dataclass(frozen=True)
class GpuInfo:
    name: str  # for people reading engines.json
    compute_capability: tuple[int, int]
    arch: str  # the PTX target of the attention kernel, e.g. sm_90a


@dataclass(frozen=True)
class EngineSpec:
    """engines.json, typed; file paths absolute."""

    root: Path  # MODEL_DIR/engines
    format_version: int
    tensorrt_version: str
    gpu: GpuInfo
    precision: str
    compute_dtype: str
    cache_dtype: str
    max_batch: int
    max_context: int  # rows of every global cache (allocated once)
    max_chunk: int  # most tokens of one prefill step (profile 0)
    decoder: Path
    profiles: dict[str, int]  # PREFILL / DECODE -> optimization profile index
    vision: Path | None = None  # multimodal builds only
    max_images: int | None = None  # most images per vision engine call
    timing_cache: Path | None = None


@dataclass(frozen=True)
class Installed:
    """What this machine has, to compare with what the engines were built for (injectable for tests)."""

    tensorrt_version: str
    compute_capability: tuple[int, int]
    gpu_name: str = "NVIDIA GPU"


def engines_path(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / ENGINES_DIR / ENGINES_FILE


def has_engines(model_dir: str | os.PathLike) -> bool:
    return engines_path(model_dir).is_file()


def _positive(r: _Reader, d: dict[str, Any], key: str, path: str = "") -> int:
    value = r.get(d, key, path, int)
    if value < 1:
        raise r.fail(f"'{f'{path}.{key}' if path else key}' must be positive, got {value}")
    return value


def _gpu(r: _Reader, d: dict[str, Any]) -> GpuInfo:
    capability = r.get(d, "compute_capability", "gpu", list)
    if len(capability) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in capability):
        raise r.fail(f"'gpu.compute_capability' must be [major, minor], got {capability!r}")
    arch = r.get(d, "arch", "gpu", str)
    try:
        expected = arch_for_capability(capability[0], capability[1])
    except ValueError as e:
        raise r.fail(f"'gpu.compute_capability': {e}") from None
    if arch != expected:
        raise r.fail(f"'gpu.arch' {arch!r} does not match compute capability {capability[0]}.{capability[1]} "
                     f"(the plugin builds {expected} there)")
    return GpuInfo(r.get(d, "name", "gpu", str), (capability[0], capability[1]), arch)


def read_engines(model_dir: str | os.PathLike) -> EngineSpec:
    """Parse and type-check engines.json; `ManifestError` (one line, naming the key) on any problem."""
    path = engines_path(model_dir)
    if not path.is_file():
        raise ManifestError(NO_ENGINES.format(root=Path(model_dir)))
    r, data = read_json_object(path)
    version = r.get(data, "format_version", "", int)
    if version != FORMAT_VERSION:
        raise r.fail(f"format_version {version} is not supported (this runtime reads version {FORMAT_VERSION})")
    root = path.parent
    decoder = r.get(data, "decoder", "", dict)
    profiles_dict = r.get(decoder, "profiles", "decoder", dict)
    profiles = {role: r.get(profiles_dict, role, "decoder.profiles", int) for role in (PREFILL, DECODE)}
    if profiles[PREFILL] == profiles[DECODE] or min(profiles.values()) < 0:
        raise r.fail(f"'decoder.profiles' must name two distinct profile indices >= 0, got {profiles}")
    vision = r.get(data, "vision", "", dict, optional=True)
    timing = r.get(data, "timing_cache", "", str, optional=True)
    spec = EngineSpec(
        root=root,
        format_version=version,
        tensorrt_version=r.get(data, "tensorrt_version", "", str),
        gpu=_gpu(r, r.get(data, "gpu", "", dict)),
        precision=r.get(data, "precision", "", str),
        compute_dtype=r.get(data, "compute_dtype", "", str),
        cache_dtype=r.get(data, "cache_dtype", "", str),
        max_batch=_positive(r, data, "max_batch"),
        max_context=_positive(r, data, "max_context"),
        max_chunk=_positive(r, data, "max_chunk"),
        decoder=root / r.get(decoder, "file", "decoder", str),
        profiles=profiles,
        vision=None if vision is None else root / r.get(vision, "file", "vision", str),
        max_images=None if vision is None or vision.get("max_images") is None else _positive(
            r, vision, "max_images", "vision"),
        timing_cache=None if timing is None else root / timing,
    )
    if spec.max_chunk > spec.max_context:
        raise r.fail(f"'max_chunk' {spec.max_chunk} exceeds 'max_context' {spec.max_context}")
    return spec


def check_engines(spec: EngineSpec, manifest: Manifest, installed: Installed) -> None:
    """The engines fit this export and this machine; otherwise one line saying what to rebuild or install."""
    where = f"{spec.root / ENGINES_FILE}"
    rebuild = f"rebuild with `gemma3-build {manifest.root} --force` on this machine"
    for key, built, exported in (("precision", spec.precision, manifest.precision),
                                 ("compute_dtype", spec.compute_dtype, manifest.compute_dtype),
                                 ("cache_dtype", spec.cache_dtype, manifest.decoder.cache_dtype)):
        if built != exported:
            raise ManifestError(f"{where}: '{key}' is {built!r} but the export's manifest says {exported!r}: "
                                f"the engines were built from another export; {rebuild}")
    if spec.max_context > manifest.max_context:
        raise ManifestError(f"{where}: 'max_context' {spec.max_context} exceeds the export's {manifest.max_context}")
    if spec.max_batch > manifest.max_batch:
        raise ManifestError(f"{where}: 'max_batch' {spec.max_batch} exceeds the export's {manifest.max_batch}")
    if spec.vision is not None and manifest.vision is None:
        raise ManifestError(f"{where}: names a vision engine but the export is text-only")
    if spec.tensorrt_version != installed.tensorrt_version:
        raise ManifestError(f"{where}: the engines were built with TensorRT {spec.tensorrt_version} but TensorRT "
                            f"{installed.tensorrt_version} is installed (an engine loads only in the version that "
                            f"built it): install tensorrt-cu12=={spec.tensorrt_version} or {rebuild}")
    if spec.gpu.compute_capability != installed.compute_capability:
        built, here = (".".join(map(str, c)) for c in (spec.gpu.compute_capability, installed.compute_capability))
        raise ManifestError(f"{where}: the engines were built for {spec.gpu.name} (compute capability {built}, "
                            f"{spec.gpu.arch}) but this GPU, {installed.gpu_name}, is {here}: {rebuild}")
    for path, what in ((spec.decoder, "decoder engine"), (spec.vision, "vision engine")):
        if path is not None and not path.is_file():
            raise ManifestError(f"the {what} {str(path)!r} named by {ENGINES_FILE} is missing: {rebuild}")


def install_hint(spec: EngineSpec | None = None) -> str:
    return INSTALL.format(pin=f"=={spec.tensorrt_version}" if spec is not None else "")


def import_backend(spec: EngineSpec | None = None):
    """(tensorrt, cuda runtime bindings), or `BackendMissing` saying what to install."""
    try:
        import tensorrt as trt

        cudart = cuda.runtime_bindings()
    except ImportError as e:
        raise BackendMissing(f"running TensorRT engines needs the tensorrt and cuda-python packages ({e}): "
                             f"{install_hint(spec)}") from None
    return trt, cudart


def installed(device: int = 0) -> Installed:
    """The installed TensorRT's version and GPU `device`'s compute capability and name (made the current device)."""
    trt, _ = import_backend()
    try:
        cuda.set_device(device)
        capability, name = cuda.device_capability(device), cuda.device_name(device)
    except cuda.CudaError as e:
        raise BackendMissing(f"no usable NVIDIA GPU for TensorRT engines ({e})") from None
    return Installed(trt.__version__, capability, name)


# --- the decoder engine's IO --------------------------------------------------------------------------------------

TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "FP8": "float8e4m3fn", "INT32": "int32",
              "INT64": "int64", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}  # trt.DataType names -> ours
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Binding:
    """One engine tensor as a one-sequence decoder binds it."""

    name: str
    io: str  # "input" or "output"
    shape: Shape  # what is allocated: the largest shape a step sets
    dtype: str
    alias: str | None = None  # an output the plugin updates in place: bound to this input's memory
    per_cache: bool = False  # one buffer per cache (the KV caches) rather than one per decoder
    smallest: Shape | None = None  # the smallest shape a prefill step sets (None: `shape`)
    decode_shape: Shape | None = None  # the shape decode steps set (None: `shape`)

    @property
    def low(self) -> Shape:
        return self.shape if self.smallest is None else self.smallest

    @property
    def decode(self) -> Shape:
        return self.shape if self.decode_shape is None else self.decode_shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def binding_plan(manifest: Manifest, engines: EngineSpec) -> tuple[Binding, ...]:
    """Every tensor the decoder binds for B = 1: inputs, then outputs. Caches at their final size (local W rows,
    global max_context rows); input_ids and image_features allocated for the largest prefill step."""
    spec, model = manifest.decoder, manifest.model
    if spec.workspace is None:
        raise ManifestError(f"{spec.file.name} is not a tensorrt-target decoder (no attention workspace)")
    inputs = [Binding(spec.input_ids, "input", (1, engines.max_chunk), "int64", smallest=(1, 1), decode_shape=(1, 1)),
              Binding(spec.past_len, "input", (1,), spec.past_len_dtype)]
    outputs = [Binding(spec.logits_output, "output", (1, 1, model.vocab_size), "float32")]
    for layer in spec.layers:
        rows = layer.window if layer.kind == LOCAL else engines.max_context
        shape = (1, model.num_kv_heads, rows, model.head_dim)
        for past, present in ((layer.past_key, layer.present_key), (layer.past_value, layer.present_value)):
            inputs.append(Binding(past, "input", shape, spec.cache_dtype, per_cache=True))
            outputs.append(Binding(present, "output", shape, spec.cache_dtype, alias=past, per_cache=True))
    if spec.image_features is not None:  # rows = the step's image soft tokens: none on text and decode steps
        hidden = model.hidden_size
        inputs.append(Binding(spec.image_features, "input", (engines.max_chunk, hidden), manifest.compute_dtype,
                              smallest=(0, hidden), decode_shape=(0, hidden)))
    inputs.append(Binding(spec.workspace.input, "input", (spec.workspace.elements,), spec.workspace.dtype))
    return (*inputs, *outputs)


class EngineView(Protocol):
    """What `check_engine_io` asks of an engine."""

    def names(self) -> list[str]: ...

    def io(self, name: str) -> str: ...

    def dtype(self, name: str) -> str: ...

    def shape(self, name: str) -> Shape: ...  # -1 for dynamic dims

    def profile(self, name: str, index: int) -> tuple[Shape, Shape, Shape]: ...  # (min, opt, max) of an input

    def on_host(self, name: str) -> bool: ...  # a shape tensor TensorRT reads on the host


class TrtEngineView:
    """`EngineView` over a deserialized `tensorrt.ICudaEngine`."""

    def __init__(self, trt, engine) -> None:
        self._trt, self._engine = trt, engine

    def names(self) -> list[str]:
        return [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]

    def io(self, name: str) -> str:
        return "input" if self._engine.get_tensor_mode(name) == self._trt.TensorIOMode.INPUT else "output"

    def dtype(self, name: str) -> str:
        kind = self._engine.get_tensor_dtype(name).name
        return TRT_DTYPES.get(kind, kind)

    def shape(self, name: str) -> Shape:
        return tuple(self._engine.get_tensor_shape(name))

    def profile(self, name: str, index: int) -> tuple[Shape, Shape, Shape]:
        low, opt, high = self._engine.get_tensor_profile_shape(name, index)
        return tuple(low), tuple(opt), tuple(high)

    def on_host(self, name: str) -> bool:
        return bool(self._engine.is_shape_inference_io(name))


def _covers(engine: Shape, low: Shape, high: Shape, shape: Shape) -> bool:
    return len(engine) == len(shape) and all(d in (-1, s) for d, s in zip(engine, shape)) and all(
        lo <= s <= hi for lo, s, hi in zip(low, shape, high))


def check_engine_io(plan: tuple[Binding, ...], engine: EngineView, profiles: dict[str, int], where: str
                    ) -> tuple[Binding, ...]:
    """The bindings the engine has (an aliased output TensorRT folded away needs no binding), after checking names,
    directions, dtypes, and that each profile takes the shapes its steps set; `ManifestError` otherwise."""
    names = set(engine.names())
    planned = {b.name for b in plan}
    unknown = sorted(names - planned)
    if unknown:
        raise ManifestError(f"{where} has tensors the export's manifest does not name: {', '.join(unknown)}")
    missing = sorted(b.name for b in plan if b.name not in names and b.alias is None)
    if missing:
        raise ManifestError(f"{where} lacks the tensors {', '.join(missing)} of the export's manifest")
    bound = tuple(b for b in plan if b.name in names)
    for b in bound:
        if engine.io(b.name) != b.io:
            raise ManifestError(f"{where}: {b.name} is an {engine.io(b.name)} of the engine, not an {b.io}")
        if engine.dtype(b.name) != b.dtype:
            raise ManifestError(f"{where}: {b.name} is {engine.dtype(b.name)} in the engine, the export says {b.dtype}")
        if b.io == "input" and engine.on_host(b.name):
            raise ManifestError(f"{where}: {b.name} is a host shape tensor in the engine; the runtime binds it on the "
                                "GPU (rebuild from this export)")
    for role, index in profiles.items():
        for b in bound:
            if b.io != "input":
                continue
            dims = engine.shape(b.name)
            low, _, high = engine.profile(b.name, index) if -1 in dims else (dims, dims, dims)
            for shape in ((b.low, b.shape) if role == PREFILL else (b.decode,)):
                if not _covers(dims, low, high, shape):
                    raise ManifestError(f"{where}: profile {index} ({role}) takes {b.name} {dims} from {low} to "
                                        f"{high}, but {role} steps set {shape}")
    return bound


_LOGGER: Any = None


def deserialize(trt, path: Path, what: str, runtime=None):
    """(runtime, engine) for an engine file; the plugin is registered first in case TensorRT asks for its creator
    (AOT plugins carry their kernel in the engine, so normally it does not)."""
    global _LOGGER
    if runtime is None:
        _LOGGER = _LOGGER or trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(_LOGGER)
    try:
        from gemma3.plugins import tensorrt_plugin

        tensorrt_plugin.register()
    except Exception as e:  # a TensorRT without tensorrt.plugin, say: the engine may still load
        log.debug("the attention plugin was not registered (%s)", e)
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise ManifestError(f"TensorRT {trt.__version__} cannot load the {what} {path} (its log above says why); "
                            f"rebuild with `gemma3-build {path.parent.parent} --force` on this machine")
    return runtime, engine
