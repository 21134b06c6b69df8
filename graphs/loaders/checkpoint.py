"""Open a checkpoint (HF safetensors folder or GGUF file) as a lazy name -> tensor source.

A `Checkpoint` knows its config and reads one tensor at a time under our parameter names (safetensors with
pread, GGUF memory-mapped), so an exporter can stream weights without ever holding the whole model. Pickled
checkpoints are refused: loading them runs arbitrary code.
"""

from __future__ import annotations

import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..config import Gemma3Config, from_gguf_metadata, from_hf_config, preset
from .names import HF_IGNORED, gguf_to_ours, hf_to_ours, is_norm

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file, tensor or field."""


class Checkpoint(ABC):
    config: Gemma3Config
    source: str

    @abstractmethod
    def names(self) -> list[str]:
        """Our parameter names present in the checkpoint."""

    @abstractmethod
    def tensor(self, name: str) -> torch.Tensor:
        """One tensor under our name, as stored (floating point), norms already in our (zero-centred) form."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape under our layout, without reading its data."""

    def row_chunks(self, name: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows as stored) for `rows` rows at a time. Here from the whole tensor; formats that can
        read a slice (safetensors) hold only one chunk, so the largest tensor is never whole in memory."""
        tensor = self.tensor(name)
        for start in range(0, tensor.shape[0], rows):
            yield start, tensor[start:start + rows]


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, folder: Path):
        self.source = str(folder)
        if not (folder / "config.json").exists():
            raise CheckpointError(f"{folder}: no config.json (an HF checkpoint folder needs one)")
        self.config = from_hf_config(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickled:
                raise CheckpointError(_pickle_message(folder / pickled[0]))
            raise CheckpointError(f"{folder}: no *.safetensors files")
        self._handles = {}
        self._where: dict[str, tuple[str, str]] = {}  # ours -> (file, hf name)
        for file in files:
            path = folder / file
            if not path.exists():
                raise CheckpointError(f"{path}: listed in {index.name} but missing")
            try:
                handle = _safe_open(path)
            except Exception as e:  # safetensors raises its own error type for truncated / corrupt headers
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
            self._handles[file] = handle
            for hf_name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                ours = hf_to_ours(hf_name)
                if ours is None:
                    if hf_name in HF_IGNORED:
                        continue
                    raise CheckpointError(f"{path}: unexpected tensor {hf_name!r} (not a Gemma 3 weight)")
                if ours in self._where:
                    raise CheckpointError(f"{path}: tensor {hf_name!r} duplicates {self._where[ours][1]!r}")
                self._where[ours] = (file, hf_name)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        file, hf_name = self._where[name]
        return tuple(self._handles[file].get_slice(hf_name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        file, hf_name = self._where[name]
        try:
            return self._handles[file].get_tensor(hf_name)
        except Exception as e:
            raise CheckpointError(f"{self.source}/{file}: cannot read tensor {hf_name!r} ({e})") from e

    def row_chunks(self, name: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        file, hf_name = self._where[name]
        try:
            tensor = self._handles[file].get_slice(hf_name)
            total = tensor.get_shape()[0]
            for start in range(0, total, rows):
                yield start, tensor[start:min(start + rows, total)]  # safetensors does not clamp a slice
        except Exception as e:
            raise CheckpointError(f"{self.source}/{file}: cannot read tensor {hf_name!r} ({e})") from e


class GGUFCheckpoint(Checkpoint):
    """llama.cpp's format. Quantized tensors are dequantized with the `gguf` package on read."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.source = str(path)
        try:
            self.reader = GGUFReader(str(path))
        except Exception as e:  # truncated files fail inside numpy's memmap / frombuffer
            raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
        self._tensors = {}
        for t in self.reader.tensors:
            ours = gguf_to_ours(t.name)
            if ours is None:
                if t.name in ("output.weight", "rope_freqs.weight"):  # tied copy / precomputed table: unused
                    continue
                raise CheckpointError(f"{path}: unexpected tensor {t.name!r} (not a Gemma 3 text weight)")
            self._tensors[ours] = t
        embed = self._tensors.get("text.embed_tokens.weight")
        if embed is None:
            raise CheckpointError(f"{path}: no token_embd.weight tensor")
        meta = {}
        for key, field in self.reader.fields.items():
            if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model",):
                continue  # big vocabulary arrays: read by the tokenizer builder, not needed here
            try:
                meta[key] = field.contents()
            except Exception:  # exotic field types we do not need
                continue
        try:
            self.config = from_gguf_metadata(meta, vocab_rows=int(embed.shape[1]), name=path.stem)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))  # GGML lists the fastest dim first

    def tensor(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self._tensors[name]
        try:
            data = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{self.source}: cannot read tensor {t.name!r} ({e})") from e
        data = np.ascontiguousarray(data, dtype=np.float32).reshape(self.shape(name))
        if is_norm(name):
            data = data - 1.0  # llama.cpp stores 1 + w
        return torch.from_numpy(data)


def _safe_open(path: Path):
    """A safetensors handle that reads each tensor with pread(2) into memory of its own.

    The default mmap backend hands out tensors over the file's mapping, and the mapping lives as long as the
    handle (ours: the checkpoint's life), so every page read once stayed in the process's RSS (RssFile): reading
    a 4b checkpoint tensor by tensor ended at 8.5 GB RSS, the whole checkpoint. With pread a tensor's memory is
    freed with the tensor. safetensors < 0.8 has no `backend` and keeps the mapping.
    """
    import safetensors
    from safetensors import safe_open

    if tuple(int(x) for x in re.findall(r"\d+", safetensors.__version__)[:2]) >= (0, 8):
        return safe_open(str(path), framework="pt", backend="pread")
    return safe_open(str(path), framework="pt")


def _pickle_message(path: Path) -> str:
    return (
        f"{path}: pickled checkpoints (.bin/.pt/.pth) are refused: unpickling runs arbitrary code. "
        "Convert it to safetensors first (for example with transformers: "
        "model.save_pretrained(dir, safe_serialization=True)) or use a GGUF file."
    )


def open_checkpoint(path: str | os.PathLike, size: str | None = None) -> Checkpoint:
    """An HF folder (config.json + safetensors) or a .gguf file; `size` checks the shape against a preset."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(_pickle_message(path))
    if path.is_file() and path.suffix == ".gguf":
        checkpoint: Checkpoint = GGUFCheckpoint(path)
    elif path.is_dir():
        checkpoint = SafetensorsCheckpoint(path)
    elif path.is_file() and path.suffix == ".safetensors":
        checkpoint = SafetensorsCheckpoint(path.parent)
    else:
        raise CheckpointError(f"{path}: expected an HF checkpoint folder or a .gguf file")
    if size is not None:
        check_size(checkpoint.config, size, checkpoint.source)
    return checkpoint


_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")


def check_size(config: Gemma3Config, size: str, source: str) -> None:
    expected = preset(size)
    for field in _SHAPE_FIELDS:
        have, want = getattr(config, field), getattr(expected, field)
        if have != want:
            raise CheckpointError(f"{source}: {field} is {have}, but --size {size} has {want}")
