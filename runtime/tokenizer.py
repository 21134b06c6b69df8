"""Gemma's tokenizer for the torch-free runtime: SentencePiece plus the special-token handling around it.

SentencePiece itself matches user-defined pieces (Gemma's runs of newlines, tabs, spaces, `<table>`, ...)
as whole tokens, but never control pieces (`<bos>`, `<start_of_turn>`, `<unused0>`, ...): written in text
those come out as `<`, `start`, `_`, ... So, like transformers with its added tokens, we first cut the
text on the strings of the control, unknown and user-defined pieces (leftmost, longest match first), and
only hand the plain text in between to SentencePiece.

Only the stdlib and `sentencepiece` are imported: this module must load on a box without torch,
transformers or protobuf.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import sentencepiece as spm

_SPACE = "\u2581"
TOKENIZER_FIX = "copy tokenizer.model from the checkpoint or re-export the folder"
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _skip(buf: bytes, pos: int, wire: int) -> int:
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        size, pos = _varint(buf, pos)
        return pos + size
    if wire == 5:
        return pos + 4
    raise ValueError(f"unsupported protobuf wire type {wire} in tokenizer model")


def _piece_types(model: bytes) -> list[int]:
    """Each piece's type, read straight from the serialized ModelProto.

    SentencePiece's Python API has no `is_user_defined`, and its protobuf bindings would pull in
    `google.protobuf`, which the runtime does not ship. The wire format is simple enough to walk:
    ModelProto field 1 is the repeated piece message, whose field 3 is its type (default NORMAL).
    """
    types: list[int] = []
    pos, end = 0, len(model)
    while pos < end:
        key, pos = _varint(model, pos)
        if key != 0x0A:  # not field 1 / length-delimited: trainer spec, normalizer spec, ...
            pos = _skip(model, pos, key & 7)
            continue
        size, pos = _varint(model, pos)
        piece_type, inner, pos = _NORMAL, pos, pos + size
        while inner < pos:
            ikey = model[inner]  # fields 1-15 have one-byte keys; SentencePiece's pieces use 1-3
            if ikey == 0x18 and model[inner + 1] < 0x80:  # field 3 (type), a one-byte varint
                piece_type = model[inner + 1]
                inner += 2
            elif ikey == 0x0A and model[inner + 1] < 0x80:  # field 1 (the piece), shorter than 128 bytes
                inner += 2 + model[inner + 1]
            elif ikey == 0x15:  # field 2 (score), fixed32
                inner += 5
            else:
                ikey, inner = _varint(model, inner)
                if ikey == 0x18:
                    piece_type, inner = _varint(model, inner)
                else:
                    inner = _skip(model, inner, ikey & 7)
        types.append(piece_type)
    return types


class TokenizerError(ValueError):
    """A tokenizer model that cannot be used (corrupt, truncated, not SentencePiece), or text it cannot encode."""


class Tokenizer:
    """Encode/decode with a SentencePiece model, treating special-token strings in text as single tokens."""

    def __init__(self, model_bytes: bytes) -> None:
        if not model_bytes:  # SentencePiece would accept it as "no model" and log C++ errors at every call
            raise TokenizerError("not a usable SentencePiece model (the file is empty)")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
            n = self._sp.get_piece_size()
            self._pieces: list[str] = self._sp.id_to_piece(list(range(n)))
            types = _piece_types(model_bytes)
        except Exception as e:  # SentencePiece raises RuntimeError / UnicodeDecodeError, our walker IndexError
            reason = f"{type(e).__name__}: {e}".splitlines()[0].strip()
            if "ParseFromArray" in reason:  # SentencePiece's whole message is its C++ source line
                reason = "it does not parse: truncated or corrupt"
            raise TokenizerError(f"not a usable SentencePiece model ({reason})") from None
        if len(types) != n:
            raise TokenizerError(f"not a usable SentencePiece model ({len(types)} piece types for {n} pieces)")
        self._ids = {piece: i for i, piece in enumerate(self._pieces)}
        # What transformers calls special: skipped by decode(skip_special_tokens=True).
        self._special = frozenset(i for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN))
        self._byte = frozenset(i for i, t in enumerate(types) if t == _BYTE)
        # Strings matched whole in text: what transformers adds as tokens for a GGUF vocabulary, i.e.
        # control pieces (+ <unk>, which llama.cpp marks control) and user-defined pieces, except the
        # whitespace-only ones (Gemma's runs of 2-31 spaces): transformers respells those and leaves
        # them to BPE merges; SentencePiece still matches them whole after escaping spaces, which is
        # the one place the two differ (runs of more than 31 spaces, see tests/test_tokenizer.py).
        atomic: dict[str, int] = {}
        for i, t in enumerate(types):
            piece = self._pieces[i]
            if t in (_CONTROL, _UNKNOWN):
                atomic.setdefault(piece, i)
            elif t == _USER_DEFINED and piece.strip(_SPACE):
                atomic.setdefault(piece.replace(_SPACE, " "), i)  # matched against raw text
        self._atomic = atomic
        # One alternation, longest first, so `<start_of_turn>` wins over any shorter piece it starts with.
        alternatives = sorted(atomic, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer in `path`; a `TokenizerError` naming the file (and the fix) if it is unusable."""
        with open(path, "rb") as f:
            data = f.read()
        try:
            return cls(data)
        except TokenizerError as e:
            raise TokenizerError(f"{os.fspath(path)}: {e}; {TOKENIZER_FIX}") from None

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> Tokenizer:
        return cls(bytes(model_bytes))

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def token_id(self, piece: str) -> int:
        """The id of a vocabulary piece as SentencePiece spells it (spaces as U+2581)."""
        return self._ids[piece]  # KeyError for unknown pieces, unlike piece_to_id's silent <unk>

    def id_to_piece(self, token_id: int) -> str:
        return self._pieces[token_id]

    def is_special(self, token_id: int) -> bool:
        """Control and unknown pieces: what decode(skip_special_tokens=True) drops."""
        return token_id in self._special

    def is_byte(self, token_id: int) -> bool:
        """A byte-fallback piece (`<0xE4>`): one UTF-8 byte of a character the vocabulary lacks."""
        return token_id in self._byte

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        parts = self._split.split(text) if self._split is not None else [text]
        # re.split with one capture group alternates: plain, atomic, plain, atomic, ..., plain.
        plain = [p for p in parts[0::2] if p]
        try:
            encoded = iter(self._sp.encode(plain)) if plain else iter(())
        except TypeError:  # SentencePiece's complaint about a str it cannot turn into UTF-8
            raise TokenizerError(_not_unicode(text)) from None
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self._atomic[part])
            elif part:
                ids.extend(next(encoded))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in self._special])
        # SentencePiece renders control pieces as "" and <unk> as " ⁇ "; transformers writes their strings.
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._pieces[i])
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


def _not_unicode(text: str) -> str:
    """Why `text` cannot be encoded: a lone surrogate, which is what undecodable input bytes become in Python."""
    bad = next((c for c in text if "\ud800" <= c <= "\udfff"), None)
    if bad is None:
        return "the text cannot be encoded as UTF-8"
    return (f"the text is not valid Unicode: it holds a lone surrogate (U+{ord(bad):04X}), as undecodable "
            "input bytes become; give UTF-8 text")


class StreamDecoder:
    """Incremental detokenizer: push ids as they are generated, get back only the newly completed text.

    Characters outside the vocabulary arrive as byte pieces (`<0xF0>`, `<0x9F>`, ...), one UTF-8 byte
    each; text is held back until the bytes form whole characters. The last emitted chunk is re-decoded
    together with the new tokens and its text cut off (as vLLM does), so spacing SentencePiece derives
    from neighbouring pieces comes out as in a full decode, while each push stays O(1).
    """

    _MAX_UTF8_BYTES = 4  # the longest UTF-8 character: more pending bytes than that are invalid, emit them

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # the last emitted chunk (context), then the tokens not yet emitted
        self._read = 0  # how many of self._ids are context
        self._pending_bytes = 0  # trailing byte pieces not yet emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _take(self) -> str:
        new = self._decode(self._ids)[len(self._decode(self._ids[: self._read])) :]
        self._ids = self._ids[self._read :]
        self._read, self._pending_bytes = len(self._ids), 0
        return new

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        self._ids.append(token_id)
        if self._tok.is_byte(token_id):
            self._pending_bytes += 1
            # An incomplete UTF-8 sequence decodes to a trailing U+FFFD: wait for its remaining bytes.
            if self._pending_bytes < self._MAX_UTF8_BYTES and self._decode(self._ids).endswith("\ufffd"):
                return ""
        return self._take()

    def flush(self) -> str:
        """Whatever is still held back (an unfinished byte sequence decodes to U+FFFD), then reset."""
        text = self._take()
        self._ids, self._read = [], 0
        return text
