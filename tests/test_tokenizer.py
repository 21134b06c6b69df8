"""The torch-free tokenizer (a SentencePiece model rebuilt from the real 270M GGUF) against transformers.

transformers' tokenizer converted from the same GGUF is the reference everywhere but one place, which
is documented and pinned in `test_long_space_runs_follow_sentencepiece`: Gemma's vocabulary has
user-defined pieces for runs of 2..31 spaces. SentencePiece (and llama.cpp) match those whole, longest
first, so 33 spaces are 31 + 2. transformers respells them as ordinary BPE tokens and rebuilds merges
from the vocabulary, which splits 33 spaces 16 + 17. SentencePiece is what Gemma was trained with, so we
follow it there; any text without a run of more than 31 spaces must tokenize exactly as transformers.
"""

from __future__ import annotations

import difflib
import re
import subprocess
import sys

import gguf
import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma3.graphs.loaders.gguf_tokenizer import sentencepiece_model_from_gguf
from gemma3.runtime.tokenizer import StreamDecoder, Tokenizer

pytestmark = pytest.mark.real270m

SPECIAL_IDS = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4,
    "<start_of_turn>": 105, "<end_of_turn>": 106, "<start_of_image>": 255999, "<end_of_image>": 256000,
}
LONG_SPACE_RUN = re.compile(" {32,}")  # longer than Gemma's longest whitespace piece (31 spaces)

CORPUS = {
    "prose": "The quick brown fox jumps over the lazy dog. It's 3:45pm, isn't it? \"Quotes\" and (parens)...",
    "code": "def f(x):\n    if x > 0:\n        return x * 2  # double\n    return -x\n\n\nclass A:\n\tpass\n",
    "digits": "12345678901234567890 3.14159 1,000,000 0x1F 2024-01-01 -7e-3 99999999999999999999999",
    "spaces": "a b  c   d    e" + " " * 10 + "f" + " " * 16 + "g" + " " * 31 + "h" + " " * 31,
    "leading_trailing": "  two leading, one trailing ",
    "newlines": "a\nb\n\nc\n\n\n\nd" + "\n" * 31 + "e" + "\n" * 45 + "f\r\ng\r\n\r\n",
    "tabs": "\ta\t\tb" + "\t" * 31 + "c" + "\t" * 40 + "d\t \t  \t",
    "cjk": "你好，世界！日本語のテキストです。한국어 텍스트입니다. 𠀀𪚥",
    "arabic": "مرحبا بالعالم، هذا نص عربي. שלום עולם",
    "emoji": "👋🏽 Hello 🌍🚀 👨‍👩‍👧‍👦 🇫🇷 ✨🀄🧌",
    "mixed": "Привет мир! Γειά σου κόσμε. नमस्ते दुनिया. Hello世界123 ᚠꙮ 𓀀 a\u00a0b\u3000c\u200bd",
    "html": "<table><tr><td>1</td></tr></table><b>bold</b><s>x</s><code>y</code>[multimodal]",
    "chat": (
        "<bos><start_of_turn>user\nHi there, what is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\nIt is 4.<end_of_turn>\n<eos>"
    ),
    "image": "Look: <start_of_image><end_of_image> done<pad><unk><mask><unused0><unused6241>",
    "near_special": "<start_of_turn <end_of_turn>><<bos>> <bo s> <unused99999> <START_OF_TURN>",
    "specials_spaced": "  <start_of_turn>  x  <end_of_turn>  \n<eos>",
    "literal_u2581": "a\u2581b \u2581\u2581 c",
}
HAS_SPECIAL = {"chat", "image", "near_special", "specials_spaced"}
NOT_ROUND_TRIP = {"literal_u2581"}  # SentencePiece (and transformers) decode U+2581 as a space


def _pydoc_text() -> str:
    import pydoc_data.topics

    return "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def _pydoc_chunk(with_long_space_runs: bool, size: int = 20_000) -> str:
    """The first ~20K-character window of the pydoc topics that does (or does not) hold a long space run."""
    text = _pydoc_text()
    for start in range(0, len(text) - size, 1_000):
        chunk = text[start : start + size]
        if bool(LONG_SPACE_RUN.search(chunk)) == with_long_space_runs:
            return chunk
    raise AssertionError("no suitable pydoc_data.topics chunk")


@pytest.fixture(scope="module")
def model_bytes(gguf_270m_path) -> bytes:
    return sentencepiece_model_from_gguf(gguf_270m_path)


@pytest.fixture(scope="module")
def tok(model_bytes) -> Tokenizer:
    return Tokenizer.from_bytes(model_bytes)


def _hf(hf_tok, text: str, bos: bool = False) -> list[int]:
    return hf_tok(text, add_special_tokens=bos)["input_ids"]


# --- the rebuilt SentencePiece model ---------------------------------------------------------------


def test_rebuilt_model_spec(model_bytes):
    model = sp_pb2.ModelProto.FromString(model_bytes)
    assert len(model.pieces) == 262144
    t, n = model.trainer_spec, model.normalizer_spec
    assert (t.model_type, t.byte_fallback, t.split_digits, t.allow_whitespace_only_pieces) == (
        sp_pb2.TrainerSpec.BPE, True, True, True,
    )
    assert (t.pad_id, t.eos_id, t.bos_id, t.unk_id) == (0, 1, 2, 3)
    assert (t.pad_piece, t.eos_piece, t.bos_piece, t.unk_piece) == ("<pad>", "<eos>", "<bos>", "<unk>")
    assert (n.name, n.precompiled_charsmap, n.add_dummy_prefix, n.remove_extra_whitespaces) == (
        "identity", b"", False, False,
    )
    assert n.escape_whitespaces
    Piece = sp_pb2.ModelProto.SentencePiece
    types = [p.type for p in model.pieces]
    counts = {k: types.count(k) for k in set(types)}
    assert counts == {Piece.NORMAL: 255474, Piece.UNKNOWN: 1, Piece.CONTROL: 6248,
                      Piece.USER_DEFINED: 165, Piece.BYTE: 256}
    assert model.pieces[3].type == Piece.UNKNOWN and model.pieces[105].type == Piece.CONTROL
    assert (model.pieces[238].piece, model.pieces[238].type) == ("<0x00>", Piece.BYTE)
    # llama.cpp stores the user-defined whitespace runs with real spaces; SentencePiece needs U+2581.
    assert (model.pieces[138].piece, model.pieces[138].type) == ("\u2581\u2581", Piece.USER_DEFINED)
    assert not any(" " in p.piece for p in model.pieces if p.type != Piece.BYTE)
    assert model.pieces[9259].piece == "Hello" and model.pieces[9259].score != 0


def _write_gguf(path, kv: dict) -> None:
    writer = gguf.GGUFWriter(str(path), "gemma3")
    for key, value in kv.items():
        writer.add_string(key, value) if isinstance(value, str) else writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_rebuild_rejects_files_without_a_sentencepiece_vocab(tmp_path):
    _write_gguf(tmp_path / "none.gguf", {})
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        sentencepiece_model_from_gguf(tmp_path / "none.gguf")
    _write_gguf(tmp_path / "bpe.gguf", {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="'gpt2'"):
        sentencepiece_model_from_gguf(tmp_path / "bpe.gguf")
    _write_gguf(tmp_path / "noscores.gguf", {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="tokenizer.ggml.scores"):
        sentencepiece_model_from_gguf(tmp_path / "noscores.gguf")


# --- encode against transformers --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_encode_matches_transformers(tok, hf_270m_tokenizer, name):
    text = CORPUS[name]
    assert not LONG_SPACE_RUN.search(text)
    assert tok.encode(text) == _hf(hf_270m_tokenizer, text)
    assert tok.encode(text, add_bos=True) == _hf(hf_270m_tokenizer, text, bos=True)


def test_pydoc_chunk_matches_transformers(tok, hf_270m_tokenizer):
    chunk = _pydoc_chunk(with_long_space_runs=False)
    assert "    " in chunk and "\n\n" in chunk  # indentation and blank lines are in there
    ids = tok.encode(chunk)
    assert len(ids) > 3000
    assert ids == _hf(hf_270m_tokenizer, chunk)


def test_pydoc_chunk_with_long_space_runs_differs_only_there(tok, hf_270m_tokenizer):
    chunk = _pydoc_chunk(with_long_space_runs=True)
    ours, theirs = tok.encode(chunk), _hf(hf_270m_tokenizer, chunk)
    diffs = [op for op in difflib.SequenceMatcher(None, ours, theirs, autojunk=False).get_opcodes()
             if op[0] != "equal"]
    assert diffs, "expected the documented long-space-run difference in this chunk"
    for _, i1, i2, j1, j2 in diffs:
        ours_text = tok.decode(ours[i1:i2], skip_special_tokens=False)
        assert ours_text == hf_270m_tokenizer.decode(theirs[j1:j2], skip_special_tokens=False)
        assert LONG_SPACE_RUN.search(ours_text), f"unexpected difference on {ours_text!r}"
    assert tok.decode(ours) == chunk


def test_long_space_runs_follow_sentencepiece(tok, hf_270m_tokenizer):
    run = {n: tok.token_id("\u2581" * n) for n in (2, 16, 17, 31)}
    # Up to 31 spaces both agree: one user-defined piece.
    for n in range(2, 32):
        assert tok.encode(" " * n) == _hf(hf_270m_tokenizer, " " * n) == [tok.token_id("\u2581" * n)]
    # 33 spaces: SentencePiece (and llama.cpp) take the longest piece first, 31 + 2 ...
    assert tok.encode(" " * 33) == [run[31], run[2]] == [167, 138]
    # ... while transformers' merges, rebuilt from the vocabulary order, give 16 + 17.
    assert _hf(hf_270m_tokenizer, " " * 33) == [run[16], run[17]]
    # Longer runs repeat the 31-space piece; a single leftover space joins the next word.
    assert tok.encode(" " * 64) == [run[31], run[31], run[2]]
    assert tok.encode(" " * 63) == [run[31], run[31], tok.token_id("\u2581")]
    assert tok.encode("a" + " " * 32 + "h") == [tok.token_id("a"), run[31], tok.token_id("\u2581h")]


def test_special_strings_are_atomic(tok, hf_270m_tokenizer):
    assert tok.vocab_size == 262144
    with pytest.raises(KeyError):
        tok.token_id("<image_soft_token>")  # 262144 is past the 270M's vocabulary (262144 rows)
    for piece, token_id in SPECIAL_IDS.items():
        assert tok.token_id(piece) == token_id
        assert tok.encode(piece) == [token_id] == _hf(hf_270m_tokenizer, piece)
        assert tok.encode(f"x{piece}y") == [tok.token_id("x"), token_id, tok.token_id("y")]
    ids = tok.encode("<start_of_turn>user\nHi<end_of_turn>")
    assert ids == [105, tok.token_id("user"), tok.token_id("\n"), tok.token_id("Hi"), 106]
    # A user-defined piece that is not special: kept whole and kept by decode.
    assert tok.encode("<table>") == [tok.token_id("<table>")]
    assert tok.decode(tok.encode("a<table>b")) == "a<table>b"


def test_ids_and_lookup(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert tok.token_id("\u2581\u2581") == 138
    assert tok.token_id("<0x0A>") == 248 and tok.is_byte(248) and not tok.is_byte(107)
    with pytest.raises(KeyError):
        tok.token_id("definitely not a piece")
    with pytest.raises(KeyError):
        tok.token_id("  ")  # pieces are spelled the SentencePiece way: U+2581 for spaces


def test_from_file(tmp_path, model_bytes, tok):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model_bytes)
    text = CORPUS["chat"] + CORPUS["code"]
    assert Tokenizer.from_file(path).encode(text) == tok.encode(text)


# --- decode -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_decode_round_trip_and_matches_transformers(tok, hf_270m_tokenizer, name):
    text = CORPUS[name]
    ids = tok.encode(text)
    if name not in NOT_ROUND_TRIP:
        assert tok.decode(ids, skip_special_tokens=False) == text
        if name not in HAS_SPECIAL:
            assert tok.decode(ids) == text
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_270m_tokenizer.decode(ids, skip_special_tokens=skip)


def test_decode_skips_special_tokens(tok):
    ids = tok.encode(CORPUS["chat"])
    assert tok.decode(ids) == "user\nHi there, what is 2+2?\nmodel\nIt is 4.\n"
    assert tok.decode([2, 3, 4, 0]) == ""
    assert tok.decode([3], skip_special_tokens=False) == "<unk>"  # SentencePiece alone would say " ⁇ "


def test_pydoc_round_trip(tok):
    chunk = _pydoc_chunk(with_long_space_runs=True)
    assert tok.decode(tok.encode(chunk)) == chunk


# --- streaming --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["emoji", "cjk", "mixed", "chat", "code"])
def test_stream_decoder_equals_full_decode(tok, name):
    ids = tok.encode(CORPUS[name])
    for skip in (True, False):
        stream = StreamDecoder(tok, skip_special_tokens=skip)
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_partial_utf8(tok):
    ids = tok.encode("a𓀀b")  # U+13000 is not in the vocabulary: four byte pieces
    assert [tok.is_byte(i) for i in ids] == [False, True, True, True, True, False]
    stream = tok.stream()
    assert [stream.push(i) for i in ids] == ["a", "", "", "", "𓀀", "b"]
    assert stream.flush() == ""
    # Cut off mid-character: nothing is emitted until flush, which gives the replacement character(s).
    for i in ids[:3]:
        stream.push(i)
    assert set(stream.flush()) == {"\ufffd"}
    # The stream is reset after flush.
    assert [stream.push(i) for i in tok.encode("ok")] == ["ok"]


def test_stream_decoder_special_tokens(tok):
    ids = tok.encode("<start_of_turn>model\nHi<end_of_turn>")
    assert [tok.stream().push(i) for i in ids[:1]] == [""]
    stream = tok.stream(skip_special_tokens=False)
    assert [stream.push(i) for i in ids] == ["<start_of_turn>", "model", "\n", "Hi", "<end_of_turn>"]


# --- no torch on the runtime path ---------------------------------------------------------------------


def test_runtime_tokenizer_does_not_import_torch(tmp_path, model_bytes):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model_bytes)
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "sys.modules['transformers'] = None\n"
        "from gemma3.runtime.tokenizer import Tokenizer\n"
        f"tok = Tokenizer.from_file({str(path)!r})\n"
        "assert tok.encode('<start_of_turn>user') == [105, 2364], tok.encode('<start_of_turn>user')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'google'))\n"
        "assert loaded == ['torch', 'transformers'], loaded\n"
        "assert sys.modules['torch'] is None and sys.modules['transformers'] is None\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
