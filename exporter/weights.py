"""Weights: decide how each parameter is stored, then stream it from the checkpoint into external data.

Planning happens on the graph alone (shapes are known from the config), so every initializer gets its final
offset in `<graph>.data` before any weight is read. Writing then reads one checkpoint tensor at a time,
transforms it (transpose or quantize) and writes it at its offset: peak memory stays near the largest tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from gemma3.graphs.loaders.checkpoint import Checkpoint

from .progress import Progress
from .quantize import FP8_MAX
from .quantizers import ROWS_PER_CHUNK, Quantized, quantize
from .recipes import Scheme

ALIGN = 4096  # page-aligned offsets let ONNX Runtime memory-map the weights instead of copying them
WRITE_WORKERS = 2  # threads quantizing and writing tensors (the machines this must run on have 2 cores)
ROW_CHUNK_BYTES = 256 << 20  # fp32 rows converted at a time for row-wise entries (the float table)


@dataclass
class Stored:
    """One initializer in the data file: `make(source tensor) -> array` computes its bytes."""

    name: str
    source: str | tuple[str, ...]  # our parameter name(s) in the checkpoint; several are stacked along rows
    dtype: np.dtype
    shape: tuple[int, ...]
    make: Callable[[np.ndarray], np.ndarray]
    offset: int = -1
    alias_of: str | None = None  # same bytes as another entry, seen under another shape
    onnx_type: ir.DataType | None = None  # when the bytes are packed: INT4 (two per byte, `dtype` uint8)
    rowwise: bool = False  # make(w[a:b]) == make(w)[a:b]: written a chunk of rows at a time

    @property
    def ir_type(self) -> ir.DataType:
        return self.onnx_type or _ir_dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        count = int(np.prod(self.shape, dtype=np.int64))
        if self.onnx_type in (ir.DataType.INT4, ir.DataType.UINT4):
            return -(-count // 2)
        return count * np.dtype(self.dtype).itemsize


@dataclass
class WeightPlan:
    location: str  # data file name, next to the graph
    entries: dict[str, Stored] = field(default_factory=dict)
    # per weight (our parameter name): mean square of its matmul's input per channel, from calibrate.py
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    # per weight: the Gram matrix of its matmul's input; asymmetric 4-bit weights with one get error feedback
    gram: dict[str, np.ndarray] = field(default_factory=dict)
    # per fused group's first source: absmax of its matmul's input (fp8 activation scales), from calibrate.py
    absmax: dict[str, float] = field(default_factory=dict)
    _quantized: dict[tuple, Quantized] = field(default_factory=dict)

    def add(self, graph: ir.Graph, entry: Stored) -> ir.Value:
        """Register the initializer in the graph (data filled in by `layout`)."""
        if entry.name in self.entries:
            raise ValueError(f"initializer {entry.name} planned twice")
        self.entries[entry.name] = entry
        value = ir.Value(name=entry.name, shape=ir.Shape(entry.shape), type=ir.TensorType(entry.ir_type))
        value.const_value = ir.ExternalTensor(
            self.location, 0, entry.nbytes, entry.ir_type, shape=ir.Shape(entry.shape), name=entry.name
        )
        graph.register_initializer(value)
        return value

    def quantized(self, source: str | tuple[str, ...], scheme: Scheme, tensor: np.ndarray,
                  scale_dtype: str | None = None) -> Quantized:
        """Quantize once per tensor and scheme even when several initializers (data, scales, zero points) need it."""
        key = (source, scheme, scale_dtype)
        if key not in self._quantized:
            first = source if isinstance(source, str) else source[0]  # fused projections share their input
            gram = self.gram.get(first) if scheme.damp is not None else None
            self._quantized[key] = quantize(tensor, scheme, self.importance.get(first), gram, scale_dtype)
        return self._quantized[key]  # dropped when the source is written (`_write_source`)

    def input_scale(self, first: str) -> float:
        """fp8 activations: the per-tensor scale of a matmul's input, absmax / 448 over the calibration text."""
        if first not in self.absmax:
            raise ValueError(f"no calibrated input range for {first}: fp8 activations need calibration")
        return max(self.absmax[first], 1e-12) / FP8_MAX

    def layout(self, graph: ir.Graph, base_dir: str | os.PathLike) -> int:
        """Assign page-aligned offsets in checkpoint-read order; returns the data file size."""
        offset, placed = 0, {}
        for entry in self.entries.values():
            if entry.alias_of is not None:
                continue
            entry.offset = offset
            placed[entry.name] = offset
            offset += -(-entry.nbytes // ALIGN) * ALIGN
        for entry in self.entries.values():
            if entry.alias_of is not None:
                entry.offset = placed[entry.alias_of]
            value = graph.initializers[entry.name]
            value.const_value = ir.ExternalTensor(
                self.location, entry.offset, entry.nbytes, entry.ir_type, shape=ir.Shape(entry.shape),
                name=entry.name, base_dir=base_dir,
            )
        return offset

    def write(self, checkpoint: Checkpoint, path: Path, size: int, what: str = "writing weights",
              workers: int = WRITE_WORKERS) -> None:
        """Stream every planned tensor into `path`: the largest checkpoint tensor alone first, then the rest on
        `workers` threads (numpy and torch release the GIL in their loops, so both cores quantize). At most
        `workers` source tensors (fp32) are in memory at a time, and row-wise entries (the float tied table, the
        largest tensor of every size) are converted a chunk of rows at a time from the tensor as stored."""
        by_source: dict[str | tuple[str, ...], list[Stored]] = {}
        for entry in self.entries.values():
            if entry.alias_of is None:
                by_source.setdefault(entry.source, []).append(entry)
        shapes = {source: _source_shape(checkpoint, source) for source in by_source}
        order = sorted(by_source, key=lambda s: -int(np.prod(shapes[s], dtype=np.int64)))
        progress = Progress(what, sum(e.nbytes for entries in by_source.values() for e in entries))
        with open(path, "wb") as f:
            f.truncate(size)  # sparse: the disk fills while writing, at some pwrite below
        fd = os.open(path, os.O_WRONLY)
        try:
            def one(source):
                self._write_source(checkpoint, fd, source, by_source[source], progress)

            if order:
                one(order[0])
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                futures = [pool.submit(one, source) for source in order[1:]]
                try:
                    for future in futures:
                        future.result()  # re-raises the first failure
                except BaseException:
                    for future in futures:  # stop there: a full disk fails every tensor left
                        future.cancel()
                    raise
        except OSError as e:
            if e.errno is not None and e.filename is None:  # pwrite's errors (ENOSPC) name no file: name ours
                raise OSError(e.errno, e.strerror, str(path)) from e
            raise
        finally:
            os.close(fd)
        progress.close()
        self._quantized.clear()

    def _write_source(self, checkpoint: Checkpoint, fd: int, source, entries: list[Stored],
                      progress: Progress) -> None:
        if isinstance(source, str) and all(e.rowwise for e in entries):
            shape = checkpoint.shape(source)  # read (and converted to fp32) a chunk of rows at a time
            step = ROW_CHUNK_BYTES // max(1, 4 * int(np.prod(shape[1:], dtype=np.int64)))
            # whole multiples of the quantizer's own row chunks: the same BLAS calls as a whole-tensor quantization
            step = max(1, step // ROWS_PER_CHUNK) * ROWS_PER_CHUNK
            for start, rows in checkpoint.row_chunks(source, step):
                chunk = rows.float().numpy()
                for entry in entries:
                    data = _made(entry, chunk, (len(chunk), *entry.shape[1:]))
                    _pwrite(fd, _bytes(data), entry.offset + start * (entry.nbytes // entry.shape[0]))
                    progress.update(data.nbytes)
                self._forget(source)  # a quantized chunk is only this chunk's
            return
        if isinstance(source, str):
            tensor = checkpoint.tensor(source).float().numpy()
        else:  # fused projections: their rows stacked in order
            tensor = np.concatenate([checkpoint.tensor(part).float().numpy() for part in source], axis=0)
        for entry in entries:
            data = _made(entry, tensor, (entry.nbytes,) if entry.onnx_type is not None else entry.shape)
            _pwrite(fd, _bytes(data), entry.offset)
            progress.update(entry.nbytes)
        self._forget(source)

    def _forget(self, source) -> None:
        for key in [k for k in self._quantized if k[0] == source]:
            self._quantized.pop(key, None)


def _made(entry: Stored, tensor: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    data = np.asarray(entry.make(tensor), dtype=entry.dtype)
    data = np.ascontiguousarray(data) if data.ndim else data  # scalars stay 0-d
    if data.shape != tuple(expected):
        raise AssertionError(f"{entry.name}: made {data.shape}, planned {tuple(expected)}")
    return data


def _bytes(data: np.ndarray) -> memoryview:
    """The array's bytes without a copy (tobytes() would double the largest tensor's memory)."""
    return memoryview(data.reshape(-1).view(np.uint8))


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    """pwrite until done: Linux writes at most 2 GiB - 4 KiB per call."""
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _source_shape(checkpoint: Checkpoint, source) -> tuple[int, ...]:
    if isinstance(source, str):
        return tuple(checkpoint.shape(source))
    shapes = [tuple(checkpoint.shape(part)) for part in source]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def _ir_dtype(dtype: np.dtype) -> ir.DataType:
    return ir.DataType.from_numpy(np.dtype(dtype))
