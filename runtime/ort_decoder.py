"""An ONNX Runtime session over an exported decoder graph, stepping over a `KVCache` with IO binding.

One step feeds `input_ids` [1, S] and `past_len` (the cache's length: [1] for graphs with a batch dimension, 0-d
for older ones) and returns logits; runtime/batching.py steps several sequences at once on batch graphs.
Each layer's cache OrtValue is bound as both its past input and its present output, so the graph updates it in
place; the bindings are only refreshed when the cache replaces a buffer (global growth). Prompts are fed in chunks of at
most `chunk_size` tokens, which bounds activation memory and gives the same final logits as one big step.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import onnxruntime as ort

from gemma3.runtime.kv_cache import KVCache, round_capacity
from gemma3.runtime.manifest import (
    MANIFEST_FILE,
    DecoderSpec,
    Manifest,
    ManifestError,
    require_file,
    weights_file,
)
from gemma3.runtime.memory import PagesReleased
from gemma3.runtime.prefill import prefill_in_steps

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 256  # prefill tokens per step
_ORT_TYPES = {"float32": "float", "float16": "float16"}  # cache_dtype -> ONNX Runtime's tensor(...) names
ORT_VERBOSE, ORT_QUIET = 2, 4  # ORT log severities: warnings and up, fatal only


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def session_options(threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or available_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's own logger writes a failed run to stderr over several lines, besides the exception we turn into one
    # line: keep it quiet unless logging is verbose (-v), where its warnings and errors help.
    opts.log_severity_level = ORT_VERBOSE if log.isEnabledFor(logging.INFO) else ORT_QUIET
    return opts


def check_arg(graph: str, arg: ort.NodeArg, shape: list[int | None], kind: str | None) -> None:
    """A graph input/output against the shape (None: any) and element type the runtime will bind to it."""
    fixed = [d if isinstance(d, int) else None for d in arg.shape]
    clash = len(fixed) != len(shape) or any(g is not None and w is not None and g != w for g, w in zip(fixed, shape))
    if clash or (kind is not None and arg.type != f"tensor({kind})"):
        want = "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
        raise ManifestError(f"{graph}: '{arg.name}' is {arg.type} {list(arg.shape)} but {MANIFEST_FILE} implies "
                            f"{kind or 'a tensor'} {want}: the manifest does not describe this graph "
                            "(re-export the folder)")


def run_error(graph: object, e: Exception) -> ManifestError:
    """ONNX Runtime's exception (InvalidArgument, RuntimeException, Fail, ...) as one line of ours."""
    reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    return ManifestError(f"ONNX Runtime failed running {graph}: {reason} (does {MANIFEST_FILE} describe this graph? "
                         "re-export the folder)")


class OrtDecoder:
    """One decoder graph (the manifest's `decoder` or `eval_decoder`) on the CPU execution provider."""

    def __init__(
        self,
        manifest: Manifest,
        spec: DecoderSpec | None = None,
        threads: int | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.manifest = manifest
        # a multimodal export's one graph for text and image steps: one session, one prepacked copy of the weights
        self.spec = spec or manifest.multimodal_decoder or manifest.decoder
        self.chunk_size = chunk_size
        self.threads = threads or available_cores()
        path = require_file(self.spec.file, "decoder graph")
        try:
            # every decoder graph reads the decoder's weights file; its pages once prepacked are not kept resident
            with PagesReleased([weights_file(manifest.decoder.file)]):
                self.session = ort.InferenceSession(
                    str(path), sess_options=session_options(self.threads), providers=["CPUExecutionProvider"]
                )
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise ManifestError(f"ONNX Runtime cannot load {path}: {e}".splitlines()[0]) from None
        self._check_io(self.session, self.spec, manifest)
        self._binding = self.session.io_binding()
        self._bound: tuple[int, int] | None = None  # (serial of the cache, its version) currently bound
        self._image_graph: OrtDecoder | None = None  # steps holding image soft tokens, loaded on first use
        vocab = manifest.model.vocab_size
        # text steps of a graph that takes image rows feed none (its If takes the text branch)
        self._no_rows = np.zeros((0, manifest.model.hidden_size or 0), np.float32) if self.spec.image_features else None
        # "last" graphs always return [1, 1, vocab]: one preallocated output, reused by every step.
        self._logits = np.zeros((1, 1, vocab), np.float32) if self.spec.logits == "last" else None
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self._logits) if self._logits is not None else None
        log.info("loaded %s (%d threads, logits: %s)", path.name, self.threads, self.spec.logits)

    @staticmethod
    def _check_io(session: ort.InferenceSession, spec: DecoderSpec, manifest: Manifest) -> None:
        args = {i.name: i for i in [*session.get_inputs(), *session.get_outputs()]}
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        want_in = {spec.input_ids, spec.past_len} | ({spec.image_features} if spec.image_features else set())
        want_in |= {spec.logits_count} if spec.logits_count else set()
        want_out = {spec.logits_output}
        for layer in spec.layers:
            want_in |= {layer.past_key, layer.past_value}
            want_out |= {layer.present_key, layer.present_value}
        missing = sorted(want_in - inputs) + sorted(want_out - outputs)
        if missing:
            raise ManifestError(f"{spec.file.name} lacks the inputs/outputs {', '.join(missing)} of its manifest")
        # The shapes the runtime will bind, against the graph's fixed dims: a manifest that does not describe
        # its graphs fails here, in one line, not inside ONNX Runtime at the first step.
        m = manifest.model
        wanted: dict[str, tuple[list[int | None], str]] = {spec.logits_output: ([1, None, m.vocab_size], "float")}
        if spec.image_features is not None:
            wanted[spec.image_features] = ([None, m.hidden_size], "float")  # one row per image soft token
        cache_type = _ORT_TYPES.get(spec.cache_dtype)
        for layer in spec.layers:
            rows = layer.capacity if layer.kind == "local" else None
            for name in (layer.past_key, layer.past_value, layer.present_key, layer.present_value):
                wanted[name] = ([1, m.num_kv_heads, rows, m.head_dim], cache_type)
        if spec.logits_count is not None:
            wanted[spec.logits_count] = ([], "int64")
        wanted[spec.past_len] = ([None] if spec.batch else [], "int64")
        for name, (shape, kind) in wanted.items():
            check_arg(spec.file.name, args[name], shape, kind)

    def new_cache(self, expected_tokens: int = 0) -> KVCache:
        """An empty cache whose global layers start with room for `expected_tokens` (rounded up)."""
        m = self.manifest
        return KVCache(
            self.spec,
            m.model.num_kv_heads,
            m.model.head_dim,
            m.max_context,
            initial_capacity=round_capacity(expected_tokens, m.max_context),
        )

    def _bind_cache(self, cache: KVCache) -> None:
        if self._bound == (cache.serial, cache.version):
            return
        for past, present, value in cache.bindings():
            self._binding.bind_ortvalue_input(past, value)
            self._binding.bind_ortvalue_output(present, value)
        self._bound = (cache.serial, cache.version)

    def release_cache(self) -> None:
        """Unbind the last cache, so that its buffers can be freed (the batch engine drops its own when idle)."""
        self._binding.clear_binding_inputs()
        self._binding.clear_binding_outputs()
        self._bound = None
        if self._image_graph is not None:
            self._image_graph.release_cache()

    @property
    def sees_images(self) -> bool:
        return self.manifest.image_decoder is not None and self.manifest.model.image_token_id is not None

    def _image_decoder(self) -> OrtDecoder:
        if not self.sees_images:
            raise ValueError(f"the {self.manifest.model.name} export is text-only: it takes no images")
        if self._image_graph is None:
            self._image_graph = OrtDecoder(self.manifest, self.manifest.image_decoder, self.threads, self.chunk_size)
        return self._image_graph

    @property
    def multi_logits(self) -> bool:
        """Whether one step can return the logits of its last n positions (exports with `logits_count`)."""
        return self.spec.logits_count is not None

    def step(self, cache: KVCache, ids: np.ndarray | list[int], image_features: np.ndarray | None = None,
             borrow: bool = False, logits: int = 1) -> np.ndarray:
        """Run the graph over `ids` at past_len = cache.length, advance the cache, return the logits.

        The logits are [vocab] for the last position ("last" graphs) or [S, vocab] ("all" graphs), float32,
        owned by the caller; with `borrow` a "last" graph's row is the decoder's own buffer instead, valid until
        the next step (the generation loop samples it at once: no 1 MiB copy per token).
        `logits` n > 1 (graphs with `logits_count`): the last n positions' logits [n, vocab], owned by the caller.
        `image_features` [rows, hidden]: one row per image soft token in `ids`, in order; such a step runs the
        image graph (bidirectional image groups) on the same cache, and must hold whole images only.
        """
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(1, -1))
        n = ids.shape[1]
        if n == 0:
            raise ValueError("a decoder step needs at least one token")
        if logits != 1 and not (self.multi_logits and 1 <= logits <= n):
            raise ValueError(f"{self.spec.file.name} cannot return {logits} positions' logits of a {n}-token step"
                             + ("" if self.multi_logits else " (an export without logits_count: re-export it)"))
        image_rows = int((ids == self.manifest.model.image_token_id).sum()) if self.sees_images else 0
        if image_rows and self.spec.image_features is None:
            if image_features is None or len(image_features) != image_rows:
                got = "none" if image_features is None else len(image_features)
                raise ValueError(f"{image_rows} image soft tokens in this step but {got} image feature rows")
            return self._image_decoder().step(cache, ids, image_features, borrow)
        cache.reserve(n)
        self._bind_cache(cache)
        b = self._binding
        b.bind_cpu_input(self.spec.input_ids, ids)
        b.bind_cpu_input(self.spec.past_len, np.array([cache.length] if self.spec.batch else cache.length, np.int64))
        if self.spec.image_features is not None:
            features = self._no_rows if image_features is None else image_features
            b.bind_cpu_input(self.spec.image_features, np.ascontiguousarray(features, dtype=np.float32))
        if self.spec.logits_count is not None:
            b.bind_cpu_input(self.spec.logits_count, np.array(logits, dtype=np.int64))
        rows = logits if self._logits is not None else n
        if self._logits is not None and rows == 1:
            out, value = self._logits, self._logits_value
        else:  # "all" graphs, or several positions: a fresh [1, rows, vocab] buffer the caller keeps
            out = np.empty((1, rows, self.manifest.model.vocab_size), np.float32)
            value = ort.OrtValue.ortvalue_from_numpy(out)
        b.bind_ortvalue_output(self.spec.logits_output, value)
        try:
            self.session.run_with_iobinding(b)
        except Exception as e:  # ORT's own exception types: one line of ours, naming the graph
            raise run_error(f"{self.spec.file} at position {cache.length}", e) from None
        cache.advance(n)
        if out is not self._logits:
            return out[0]
        return out[0, -1] if borrow else out[0, -1].copy()

    def chunks(self, ids: np.ndarray, size: int | None = None) -> list[tuple[int, int]]:
        """[start, end) steps of at most `size` (default `chunk_size`) tokens, stretched so no image is split."""
        image = self.manifest.model.image_token_id if self.sees_images else None
        size = size or self.chunk_size
        bounds, start = [], 0
        while start < ids.size:
            end = min(start + size, ids.size)
            while image is not None and 0 < end < ids.size and ids[end - 1] == image and ids[end] == image:
                end += 1  # an image's soft tokens stay in one step: their attention is bidirectional
            bounds.append((start, end))
            start = end
        return bounds

    def prefill(self, cache: KVCache, ids: np.ndarray | list[int], image_features: np.ndarray | None = None
                ) -> np.ndarray:
        """Feed `ids` in chunks of at most `chunk_size` (longer only to keep an image whole); the logits of the
        last chunk's step. `image_features` [rows, hidden]: the rows of every image soft token in `ids`."""
        return prefill_in_steps(self, cache, ids, image_features)
