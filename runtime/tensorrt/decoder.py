"""The decoder engine behind the interface the runtime uses (OrtDecoder's): `new_cache`, `step`, `prefill`, `chunks`.

One sequence per cache (B = 1). What lives where:
  - per decoder: the engine; a prefill execution context (profile 0) with its own activation memory; the plugin's
    workspace, zeroed once (the kernel leaves it zeroed); fixed device buffers for input_ids, past_len,
    image_features and logits, staged through pinned host memory;
  - per cache memory: every layer's key / value buffer at its final size (local W rows, global max_context rows),
    so no address ever changes, each present output is bound to its past input's address (the plugin writes in
    place), and one decode context (profile 1) with its own activation memory is bound to it once.
A decode step copies input_ids / past_len into the fixed buffers, then replays a CUDA graph captured from that
context after one plain warm-up run (TensorRT: a graph fixes the context's shapes, addresses and memory, so each
graph gets a context nobody rebinds). If capture fails the decoder logs why and runs plain enqueues. Dropped caches
give their memory, context and graph back to a pool for the next cache.
"""

from __future__ import annotations

import itertools
import logging
import weakref

import numpy as np

from gemma3.runtime.kv_cache import check_room
from gemma3.runtime.manifest import GLOBAL, Manifest, ManifestError
from gemma3.runtime.prefill import prefill_in_steps
from gemma3.runtime.tensorrt import cuda
from gemma3.runtime.tensorrt.engines import (
    DECODE,
    PREFILL,
    Binding,
    EngineSpec,
    TrtEngineView,
    binding_plan,
    check_engine_io,
    check_engines,
    deserialize,
    import_backend,
    installed,
)
from gemma3.runtime.tensorrt.vision import TensorRTVision

log = logging.getLogger(__name__)

IDLE_CACHES = 1  # dropped cache memories kept for reuse (with their decode context and graph)
_SERIALS = itertools.count()


class _CacheMemory:
    """One sequence's KV buffers, plus the decode context bound to exactly these addresses and its CUDA graph."""

    def __init__(self, plan: tuple[Binding, ...]) -> None:
        self.buffers = {b.name: cuda.DeviceBuffer(b.nbytes) for b in plan if b.per_cache and b.alias is None}
        self.nbytes = sum(buffer.nbytes for buffer in self.buffers.values())
        self.context = None  # TensorRT IExecutionContext on the decode profile, created at the first decode
        self.activations: cuda.DeviceBuffer | None = None
        self.graph: cuda.Graph | None = None
        self.warm = False  # one plain decode ran on this context: TensorRT's deferred setup is done

    def free(self) -> None:
        if self.graph is not None:
            self.graph.destroy()
        self.context = self.graph = None  # the context goes before the memory it uses
        for buffer in [*self.buffers.values(), *([self.activations] if self.activations else [])]:
            buffer.free()


class DeviceCache:
    """A sequence's KV cache on the GPU, with KVCache's bookkeeping: `length`, `check_room`, `reserve`, `advance`.
    Its buffers are allocated at their final size, so `reserve` only checks the context length."""

    def __init__(self, memory: _CacheMemory, max_context: int, global_capacity: int | None) -> None:
        self.memory, self.max_context, self.global_capacity = memory, max_context, global_capacity
        self.length = 0  # positions already in the cache: the next step's past_len
        self.version = 0  # buffers are never replaced
        self.serial = next(_SERIALS)

    @property
    def nbytes(self) -> int:
        return self.memory.nbytes

    def check_room(self, new_tokens: int) -> None:
        check_room(self.length, new_tokens, self.max_context)

    def reserve(self, new_tokens: int) -> bool:
        self.check_room(new_tokens)
        return False

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens


class TensorRTDecoder:
    """`engines/decoder.engine` of a tensorrt-target export, stepping one sequence per `DeviceCache`."""

    def __init__(self, manifest: Manifest, engines: EngineSpec, chunk_size: int | None = None,
                 cuda_graphs: bool = True, device: int = 0) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self._trt, _ = import_backend(engines)
        check_engines(engines, manifest, installed(device))
        self.manifest, self.engines, self.spec = manifest, engines, manifest.decoder
        self.threads = 1  # the runtime asks decoders for this; the GPU does the work here
        self.cuda_graphs = cuda_graphs
        self.max_context = engines.max_context
        if self.spec.logits != "last":
            raise ManifestError(f"{self.spec.file.name}: the decoder engine must return the last position's logits")
        tokens = manifest.vision.tokens_per_image if self.sees_images and manifest.vision else 1
        wanted = engines.max_chunk if chunk_size is None else chunk_size
        self.chunk_size = min(max(wanted, tokens), engines.max_chunk)  # an image's tokens fit one step
        self.stream = cuda.Stream()
        self._runtime, self.engine = deserialize(self._trt, engines.decoder, "decoder engine")
        view = TrtEngineView(self._trt, self.engine)
        self.plan = check_engine_io(binding_plan(manifest, engines), view, engines.profiles, engines.decoder.name)
        self._dynamic = {b.name for b in self.plan if b.io == "input" and -1 in view.shape(b.name)}
        self._by_name = {b.name: b for b in self.plan}
        self._fixed = {b.name: cuda.DeviceBuffer(b.nbytes) for b in self.plan if not b.per_cache and not b.alias}
        self._fixed[self.spec.workspace.input].zero(self.stream)  # once: the kernel leaves it zeroed
        self._ids = cuda.PinnedArray((engines.max_chunk,), np.int64)
        self._past = cuda.PinnedArray((1,), np.int32)
        self._logits = cuda.PinnedArray((manifest.model.vocab_size,), np.float32)
        self._prefill, self._prefill_memory = self._context(PREFILL)
        self._prefill_bound: _CacheMemory | None = None
        self._idle: list[_CacheMemory] = []
        self._closed = False
        self._globals = any(layer.kind == GLOBAL for layer in self.spec.layers)
        self.stream.synchronize()
        log.info("loaded %s (TensorRT %s, max_chunk %d, max_context %d, CUDA graphs %s)", engines.decoder.name,
                 self._trt.__version__, engines.max_chunk, engines.max_context, "on" if cuda_graphs else "off")

    @property
    def sees_images(self) -> bool:
        return self.spec.image_features is not None and self.manifest.model.image_token_id is not None

    def vision(self) -> TensorRTVision:
        """The vision engine, on this decoder's runtime and stream."""
        return TensorRTVision(self.manifest, self.engines, self._trt, self._runtime, self.stream)

    # --- caches ------------------------------------------------------------------------------------------------

    def new_cache(self, expected_tokens: int = 0) -> DeviceCache:
        """An empty cache (buffers at their final size: `expected_tokens` changes nothing), zeroed."""
        memory = self._idle.pop() if self._idle else _CacheMemory(self.plan)
        for buffer in memory.buffers.values():
            buffer.zero(self.stream)
        self.stream.synchronize()
        cache = DeviceCache(memory, self.max_context, self.max_context if self._globals else None)
        weakref.finalize(cache, self._release, memory).atexit = False  # no CUDA calls while Python shuts down
        return cache

    def _release(self, memory: _CacheMemory) -> None:
        if not self._closed and len(self._idle) < IDLE_CACHES:
            self._idle.append(memory)
            return
        try:
            memory.free()
        except Exception as e:  # a finalizer must not raise (CUDA may be shutting down): the driver reclaims it
            log.debug("could not free a dropped cache's memory (%s)", e)

    def close(self) -> None:
        """Free the GPU memory now (caches still alive free theirs when dropped)."""
        if self._closed:
            return
        self._closed = True
        self.stream.synchronize()
        for memory in self._idle:
            memory.free()
        self._idle, self._prefill, self._prefill_bound = [], None, None
        for buffer in [*self._fixed.values(), self._prefill_memory]:
            buffer.free()
        for pinned in (self._ids, self._past, self._logits):
            pinned.free()
        self.stream.close()

    # --- contexts and bindings ---------------------------------------------------------------------------------

    def _context(self, role: str):
        """A context on `role`'s profile with its own activation memory (no two contexts share memory)."""
        trt, index = self._trt, self.engines.profiles[role]
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise RuntimeError(f"TensorRT could not create a {role} execution context (its log says why)")
        size = self.engine.get_device_memory_size_for_profile_v2(index)
        memory = cuda.DeviceBuffer(size)
        context.set_device_memory(memory.ptr, size)
        if not context.set_optimization_profile_async(index, self.stream.handle):
            raise RuntimeError(f"TensorRT could not select profile {index} ({role})")
        self.stream.synchronize()  # the profile switch may copy on the stream
        return context, memory

    def _bind(self, context, memory: _CacheMemory, role: str) -> None:
        """Every tensor's address (present outputs at their past inputs'), and the shapes steps do not change."""
        for b in self.plan:
            source = self._by_name[b.alias] if b.alias else b
            ptr = memory.buffers[source.name].ptr if source.per_cache else self._fixed[source.name].ptr
            if not context.set_tensor_address(b.name, ptr):
                raise RuntimeError(f"TensorRT refused the address of {b.name}")
            if b.name in self._dynamic and not context.set_input_shape(b.name, b.decode):
                raise RuntimeError(f"TensorRT refused shape {b.decode} for {b.name} ({role})")
        if role == DECODE:
            missing = context.infer_shapes()
            if missing:
                raise RuntimeError(f"the decode context lacks shapes for {', '.join(missing)}")

    def _execute(self, context, role: str) -> None:
        if not context.execute_async_v3(self.stream.handle):
            raise RuntimeError(f"TensorRT could not run the {role} step (its log says why)")

    def _decode(self, memory: _CacheMemory) -> None:
        if memory.context is None:
            memory.context, memory.activations = self._context(DECODE)
            self._bind(memory.context, memory, DECODE)
        if memory.graph is None and memory.warm and self.cuda_graphs:
            try:
                memory.graph = cuda.Graph.capture(self.stream, lambda: memory.context.execute_async_v3(
                    self.stream.handle))
            except cuda.CudaError as e:
                log.warning("decoding without CUDA graphs: capturing TensorRT's decode step failed (%s)", e)
                self.cuda_graphs = False
        if memory.graph is not None:
            memory.graph.launch(self.stream)
        else:
            self._execute(memory.context, DECODE)
            memory.warm = True

    # --- steps -------------------------------------------------------------------------------------------------

    def step(self, cache: DeviceCache, ids: np.ndarray | list[int], image_features: np.ndarray | None = None,
             borrow: bool = False) -> np.ndarray:
        """Run the engine over `ids` at past_len = cache.length, advance the cache; the logits [vocab] (float32,
        the caller's; with `borrow` the pinned host buffer itself, valid until the next step).
        `image_features` [rows, hidden]: one row per image soft token in `ids`, whole images only."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = ids.size
        if n == 0:
            raise ValueError("a decoder step needs at least one token")
        if n > self.engines.max_chunk:
            raise ValueError(f"a step of {n} tokens exceeds the engine's max_chunk {self.engines.max_chunk}; "
                             "feed prompts through prefill")
        rows = int((ids == self.manifest.model.image_token_id).sum()) if self.sees_images else 0
        if rows and (image_features is None or len(image_features) != rows):
            got = "none" if image_features is None else len(image_features)
            raise ValueError(f"{rows} image soft tokens in this step but {got} image feature rows")
        cache.reserve(n)
        memory, s = cache.memory, self.stream
        self._ids.array[:n] = ids
        self._past.array[0] = cache.length
        self._fixed[self.spec.input_ids].upload(self._ids.array[:n], s)
        self._fixed[self.spec.past_len].upload(self._past.array, s)
        if n == 1 and rows == 0:
            self._decode(memory)
        else:
            self._prefill_step(memory, n, image_features if rows else None)
        self._fixed[self.spec.logits_output].download(self._logits.array, s)
        s.synchronize()
        cache.advance(n)
        return self._logits.array if borrow else self._logits.array.copy()

    def _prefill_step(self, memory: _CacheMemory, n: int, image_features: np.ndarray | None) -> None:
        if self._prefill_bound is not memory:
            self._bind(self._prefill, memory, PREFILL)
            self._prefill_bound = memory
        context = self._prefill
        shapes = {self.spec.input_ids: (1, n)}
        name = self.spec.image_features
        if name is not None:
            b = self._by_name[name]
            rows = 0 if image_features is None else len(image_features)
            if rows:
                host = cuda.to_device_dtype(np.asarray(image_features).reshape(rows, b.shape[1]), b.dtype)
                self._fixed[name].upload(host, self.stream)  # pageable: staged before the call returns
            shapes[name] = (rows, b.shape[1])
        for tensor, shape in shapes.items():
            if not context.set_input_shape(tensor, shape):
                raise RuntimeError(f"TensorRT refused shape {shape} for {tensor} (prefill)")
        self._execute(context, PREFILL)

    def chunks(self, ids: np.ndarray) -> list[tuple[int, int]]:
        """[start, end) steps of at most `chunk_size` tokens, ended early so that no image is split (an image's
        soft tokens attend bidirectionally, and a step cannot grow past the engine's max_chunk)."""
        image = self.manifest.model.image_token_id if self.sees_images else None
        bounds, start = [], 0
        while start < ids.size:
            end = min(start + self.chunk_size, ids.size)
            if image is not None and end < ids.size and ids[end - 1] == image and ids[end] == image:
                first = end - 1
                while first > start and ids[first - 1] == image:
                    first -= 1
                if first == start:  # the step starts with this image and it is longer than a step
                    raise ValueError(f"an image's soft tokens do not fit one step of {self.chunk_size} tokens")
                end = first  # the image opens the next step
            bounds.append((start, end))
            start = end
        return bounds

    def prefill(self, cache: DeviceCache, ids: np.ndarray | list[int], image_features: np.ndarray | None = None
                ) -> np.ndarray:
        """Feed `ids` in steps of at most `chunk_size` tokens; the last step's logits. `image_features`
        [rows, hidden]: the rows of every image soft token in `ids`, in order."""
        return prefill_in_steps(self, cache, ids, image_features)
