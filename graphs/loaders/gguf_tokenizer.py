"""Rebuild a SentencePiece `tokenizer.model` from the vocabulary a GGUF embeds.

llama.cpp stores a SentencePiece (`tokenizer.ggml.model == "llama"`) vocabulary as three parallel arrays:
pieces, scores and token types. That is everything SentencePiece's BPE encoder needs, so we write them back
into a `ModelProto` and the torch-free runtime can tokenize with `sentencepiece` alone.
"""

from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma3.graphs.loaders.gguf_reader import FastGGUFReader

_SPACE = "\u2581"  # SentencePiece's visible space
_Piece = sp_pb2.ModelProto.SentencePiece

# GGUF token types use SentencePiece's numbering (llama.cpp copied the enum): 1 normal, 2 unknown,
# 3 control, 4 user-defined, 5 unused, 6 byte. We still map explicitly so a bad value fails loudly.
_TYPES = {
    1: _Piece.NORMAL,
    2: _Piece.UNKNOWN,
    3: _Piece.CONTROL,
    4: _Piece.USER_DEFINED,
    5: _Piece.UNUSED,
    6: _Piece.BYTE,
}


def _field(reader: gguf.GGUFReader, key: str, path: str | os.PathLike) -> gguf.ReaderField:
    field = reader.get_field(key)
    if field is None:
        raise ValueError(f"{os.fspath(path)}: GGUF lacks the tokenizer field {key!r}")
    return field


def _scalar(reader: gguf.GGUFReader, key: str, path: str | os.PathLike, default: Any = None) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is None:
            raise ValueError(f"{os.fspath(path)}: GGUF lacks the tokenizer field {key!r}")
        return default
    return field.parts[field.data[0]].tolist()[0]


def _array(field: gguf.ReaderField, dtype: Any) -> np.ndarray:
    # Each element is its own one-item view; one concatenate beats 262144 `.tolist()` calls.
    if not field.data:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([field.parts[i] for i in field.data]).astype(dtype, copy=False)


def sentencepiece_model_from_gguf(path: str | os.PathLike) -> bytes:
    """A serialized SentencePiece `ModelProto` equivalent to the tokenizer the GGUF at `path` embeds.

    Raises ValueError if the file has no tokenizer or its vocabulary is not SentencePiece-style
    (`tokenizer.ggml.model` must be "llama", which is how llama.cpp labels SentencePiece vocabularies).
    """
    reader = FastGGUFReader(path)
    model_field = _field(reader, "tokenizer.ggml.model", path)
    kind = bytes(model_field.parts[model_field.data[0]]).decode("utf-8")
    if kind != "llama":
        raise ValueError(
            f"{os.fspath(path)}: tokenizer.ggml.model is {kind!r}; only SentencePiece vocabularies "
            "('llama') can be rebuilt as a tokenizer.model"
        )
    tokens_field = _field(reader, "tokenizer.ggml.tokens", path)
    scores = _array(_field(reader, "tokenizer.ggml.scores", path), np.float32).tolist()
    types = _array(_field(reader, "tokenizer.ggml.token_type", path), np.int64).tolist()
    parts = tokens_field.parts
    pieces = [parts[i].tobytes().decode("utf-8") for i in tokens_field.data]
    if not len(pieces) == len(scores) == len(types):
        raise ValueError(
            f"{os.fspath(path)}: tokenizer.ggml.tokens/scores/token_type lengths differ "
            f"({len(pieces)}/{len(scores)}/{len(types)})"
        )
    unknown = set(types) - _TYPES.keys()
    if unknown:
        raise ValueError(f"{os.fspath(path)}: tokenizer.ggml.token_type has unknown values {sorted(unknown)}")

    ids = {
        name: int(_scalar(reader, f"tokenizer.ggml.{key}", path, default=-1))
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                          ("unk", "unknown_token_id"), ("pad", "padding_token_id"))
    }
    for name, token_id in ids.items():
        if token_id >= len(pieces):
            raise ValueError(f"{os.fspath(path)}: {name} token id {token_id} is outside the vocabulary")
    if ids["unk"] < 0:
        raise ValueError(f"{os.fspath(path)}: GGUF lacks the tokenizer field 'tokenizer.ggml.unknown_token_id'")

    model = sp_pb2.ModelProto()
    add = model.pieces.add
    byte = _Piece.BYTE
    for piece, score, kind_id in zip(pieces, scores, types):
        sp_type = _TYPES[kind_id]
        # llama.cpp writes the whitespace runs Gemma declares as user-defined with real spaces;
        # SentencePiece matches pieces against text whose spaces are already escaped to U+2581.
        if sp_type != byte and " " in piece:
            piece = piece.replace(" ", _SPACE)
        add(piece=piece, score=score, type=sp_type)
    # SentencePiece needs exactly one UNKNOWN piece; llama.cpp marks Gemma's `<unk>` as control.
    model.pieces[ids["unk"]].type = _Piece.UNKNOWN

    trainer = model.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    for name, token_id in ids.items():
        setattr(trainer, f"{name}_id", token_id)
        if token_id >= 0:
            setattr(trainer, f"{name}_piece", pieces[token_id])

    norm = model.normalizer_spec
    norm.name = "identity"  # no precompiled charsmap: Gemma does no NFKC
    # llama.cpp assumes a dummy prefix for SentencePiece vocabularies that do not say otherwise.
    norm.add_dummy_prefix = bool(_scalar(reader, "tokenizer.ggml.add_space_prefix", path, default=True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()
