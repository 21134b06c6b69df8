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
INDEX_FILE = "model.safetensors.index.json"
MAX_NAMES = 5  # names listed per kind of mismatch; the rest are counted
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)-of-(?P<total>\d+)\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file, tensor or field."""


class Checkpoint(ABC):
    config: Gemma3Config
    source: str
    unknown: tuple[str, ...] = ()  # tensors in the files that are no Gemma 3 weight, as stored (reported by check)

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
        try:
            self.config = from_hf_config(folder)
        except ValueError as e:  # the message names config.json and the field
            raise CheckpointError(str(e)) from None
        index = folder / INDEX_FILE
        if index.exists():
            files = _index_files(index)
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            _check_shards(folder, files)
        if not files:
            pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickled:
                raise CheckpointError(_pickle_message(folder / pickled[0]))
            raise CheckpointError(f"{folder}: no *.safetensors files")
        self._handles = {}
        self._where: dict[str, tuple[str, str]] = {}  # ours -> (file, hf name)
        unknown = []
        for file in files:
            path = folder / file
            if not path.exists():
                raise CheckpointError(f"{path}: listed in {index.name} but missing")
            try:
                handle = _safe_open(path)
            except Exception as e:  # safetensors raises its own error type for truncated / corrupt headers
                raise CheckpointError(f"{path}: not a readable safetensors file ({reason(e)}); "
                                      "download or convert it again") from e
            self._handles[file] = handle
            for hf_name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                ours = hf_to_ours(hf_name)
                if ours is None:
                    if hf_name not in HF_IGNORED:
                        unknown.append(hf_name)
                    continue
                if ours in self._where:
                    raise CheckpointError(f"{path}: tensor {hf_name!r} duplicates {self._where[ours][1]!r}")
                self._where[ours] = (file, hf_name)
        self.unknown = tuple(unknown)

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
            raise CheckpointError(f"{self.source}/{file}: cannot read tensor {hf_name!r} ({reason(e)})") from e

    def row_chunks(self, name: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        file, hf_name = self._where[name]
        try:
            tensor = self._handles[file].get_slice(hf_name)
            total = tensor.get_shape()[0]
            for start in range(0, total, rows):
                yield start, tensor[start:min(start + rows, total)]  # safetensors does not clamp a slice
        except Exception as e:
            raise CheckpointError(f"{self.source}/{file}: cannot read tensor {hf_name!r} ({reason(e)})") from e


class GGUFCheckpoint(Checkpoint):
    """llama.cpp's format. Quantized tensors are dequantized with the `gguf` package on read."""

    def __init__(self, path: Path):
        from gemma3.graphs.loaders.gguf_reader import FastGGUFReader

        self.source = str(path)
        try:
            self.reader = FastGGUFReader(str(path))
        except Exception as e:  # truncated files fail inside numpy's memmap / frombuffer
            raise CheckpointError(f"{path}: not a readable GGUF file ({reason(e)}); download it again") from e
        self._tensors, unknown = {}, []
        for t in self.reader.tensors:
            ours = gguf_to_ours(t.name)
            if ours is None:
                if t.name not in ("output.weight", "rope_freqs.weight"):  # tied copy / precomputed table: unused
                    unknown.append(t.name)
                continue
            self._tensors[ours] = t
        self.unknown = tuple(unknown)
        embed = self._tensors.get("text.embed_tokens.weight")
        if embed is None:
            raise CheckpointError(f"{path}: no token_embd.weight tensor")
        if len(embed.shape) != 2:
            raise CheckpointError(f"{path}: token_embd.weight has {len(embed.shape)} dimensions, expected 2")
        meta = {}
        for key, field in self.reader.fields.items():
            if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model",):
                continue  # big vocabulary arrays: read by the tokenizer builder, not needed here
            try:
                meta[key] = field.contents()
            except Exception as e:
                if key.startswith("gemma3.") or key.startswith("general.architecture"):  # needed: say so now
                    raise CheckpointError(f"{path}: GGUF metadata {key} cannot be parsed ({reason(e)}); "
                                          "the file is damaged, download it again") from e
                continue  # a field we never read
        try:
            self.config = from_gguf_metadata(meta, vocab_rows=int(embed.shape[1]), name=path.stem)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: {reason(e)}") from e

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
            raise CheckpointError(f"{self.source}: cannot read tensor {t.name!r} ({reason(e)})") from e
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
    check_tensors(checkpoint)
    return checkpoint


_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")


def check_size(config: Gemma3Config, size: str, source: str) -> None:
    expected = preset(size)
    for field in _SHAPE_FIELDS:
        have, want = getattr(config, field), getattr(expected, field)
        if have != want:
            raise CheckpointError(f"{source}: {field} is {have}, but --size {size} has {want}")


def expected_shapes(config: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """Every parameter the config's model has, with its shape (built on the meta device: no memory)."""
    from ..model import Gemma3

    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in Gemma3(config).named_parameters()}


def check_tensors(checkpoint: Checkpoint) -> None:
    """Raise one CheckpointError listing every missing, misshapen and unexpected tensor (names and shapes only:
    nothing is read), so an export fails before it writes anything, not in the middle of the weights."""
    expected = expected_shapes(checkpoint.config)
    present = checkpoint.names()
    missing = sorted(set(expected) - set(present), key=list(expected).index)  # in model order
    misshapen = []
    for name in present:
        shape = tuple(checkpoint.shape(name)) if name in expected else None
        if shape is not None and shape != expected[name]:
            misshapen.append(f"{name} has shape {shape}, expected {expected[name]}")
    unexpected = [*checkpoint.unknown, *(name for name in present if name not in expected)]
    if not (missing or misshapen or unexpected):
        return
    parts = [f"{len(found)} {kind} ({some(found)})" for kind, found in
             (("missing", missing), ("misshapen", misshapen), ("unexpected", unexpected)) if found]
    c = checkpoint.config
    raise CheckpointError(f"{checkpoint.source}: the tensors do not match the config ({c.num_layers} layers, hidden "
                          f"{c.hidden_size}, {'with' if c.vision else 'no'} vision tower): {'; '.join(parts)}. "
                          "Is every file of the checkpoint there, and is its config the one it was saved with?")


def some(names: list[str], limit: int = MAX_NAMES) -> str:
    """The first `limit` names, then how many more: one bounded line however broken the checkpoint is."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def reason(e: BaseException, limit: int = 200) -> str:
    """A library's exception as one short line (some carry newlines or whole headers)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _index_files(index: Path) -> list[str]:
    """The shard files an index names; every one must be there."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: not readable as JSON ({reason(e)}); restore it from the checkpoint's "
                              "source") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index}: no 'weight_map' object (tensor name -> shard file); restore the index from "
                              "the checkpoint's source, or delete it to read every *.safetensors file in the folder")
    files = sorted(set(weight_map.values()))
    absent = [f for f in files if not (index.parent / f).is_file()]
    if absent:
        raise CheckpointError(f"{index.parent}: {len(absent)} of the {len(files)} shards listed in {index.name} "
                              f"are absent ({some(absent)}); download them again")
    return files


def _check_shards(folder: Path, files: list[str]) -> None:
    """Without an index, shards named NAME-0000i-of-0000n tell how many there should be."""
    expected = set()
    for file in files:
        shard = _SHARD.match(file)
        if shard:
            width, total = len(shard["index"]), int(shard["total"])
            expected |= {f"{shard['stem']}-{i:0{width}d}-of-{shard['total']}.safetensors" for i in range(1, total + 1)}
    absent = sorted(expected - set(files))
    if absent:
        raise CheckpointError(f"{folder}: {len(absent)} of the {len(expected)} shards are absent ({some(absent)}) "
                              f"and there is no {INDEX_FILE}; download them again")
