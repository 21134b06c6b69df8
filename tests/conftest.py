"""Shared fixtures: the real 270M (GGUF from PyPI) and transformers' view of it, loaded once per session."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

# The attention kernel's tests run under Triton's CPU interpreter, which must be chosen before triton is imported
# (it patches triton.language for the whole process: AOT compiles run in a subprocess, tests/test_attention_ptx.py).
os.environ.setdefault("TRITON_INTERPRET", "1")


@contextlib.contextmanager
def fast_gguf_reads() -> Iterator[None]:
    """transformers reads GGUF files with the `gguf` package's reader, whose memmap slicing makes opening the 270M
    take ~15 s (graphs/loaders/gguf_reader.py): inside this block it slices a plain view of the same mapping, the
    same bytes (tests/test_loaders.py checks the two readers agree), so transformers' own conversion and
    dequantization still run as its users get them, in 18 s instead of 49 s for tokenizer and model."""
    import gguf

    from gemma3.graphs.loaders.gguf_reader import FastGGUFReader

    stock = gguf.GGUFReader._get
    gguf.GGUFReader._get = FastGGUFReader._get
    try:
        yield
    finally:
        gguf.GGUFReader._get = stock


@pytest.fixture(scope="session")
def gguf_270m_path():
    from gemma3.graphs.loaders.embedded import embedded_270m_gguf

    return embedded_270m_gguf()


@pytest.fixture(scope="session")
def hf_270m_tokenizer(gguf_270m_path):
    """transformers' tokenizer converted from the same GGUF (about 6 s)."""
    from transformers import AutoTokenizer

    with fast_gguf_reads():
        return AutoTokenizer.from_pretrained(str(gguf_270m_path.parent), gguf_file=gguf_270m_path.name)


@pytest.fixture(scope="session")
def hf_270m_model(gguf_270m_path):
    """transformers' Gemma3ForCausalLM on the GGUF's dequantized weights, fp32, eager attention (about 12 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    with fast_gguf_reads():
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_270m_path.parent),
            gguf_file=gguf_270m_path.name,
            dtype=torch.float32,
            attn_implementation="eager",
        )
    return model.eval()


@pytest.fixture(scope="session")
def our_270m_model(gguf_270m_path):
    """Our definition loaded from the same GGUF by our own loader."""
    from gemma3.graphs import load_checkpoint

    return load_checkpoint(gguf_270m_path)


@pytest.fixture(scope="session")
def ort_270m_fp32(gguf_270m_path, tmp_path_factory):
    """The real 270M exported to ONNX (fp32, ort target) by our exporter, once per session (~1 min)."""
    from gemma3.exporter.export import export
    from gemma3.exporter.recipes import recipe
    from gemma3.graphs import open_checkpoint

    return export(open_checkpoint(gguf_270m_path, size="270m"), tmp_path_factory.mktemp("ort270m") / "fp32",
                  recipe("fp32"), eval_graph=False)


@pytest.fixture(scope="session")
def tiny_mm_export(tmp_path_factory):
    """`export(mm_tokens)` -> (HF model, our checkpoint, fp32 ort export folder) of `tiny_multimodal(mm_tokens=...)`
    with random HF weights (seed 3), made once per session: the image graph tests and the batching engine's
    image tests share it (an export takes ~25 s)."""
    from gemma3.exporter.export import export
    from gemma3.exporter.recipes import recipe
    from gemma3.graphs import load_checkpoint, open_checkpoint
    from tests.hf_reference import random_hf_model, save_hf, tiny_multimodal

    made: dict[int, tuple] = {}

    def make(mm_tokens: int) -> tuple:
        if mm_tokens not in made:
            hf = random_hf_model(tiny_multimodal(mm_tokens=mm_tokens), seed=3)
            folder = save_hf(hf, tmp_path_factory.mktemp(f"mm{mm_tokens}"))
            (folder / "tokenizer.model").write_bytes(b"placeholder: graph tests do not tokenize")
            out = export(open_checkpoint(folder), tmp_path_factory.mktemp("out") / "fp32", recipe("fp32"),
                         eval_graph=False)
            made[mm_tokens] = (hf, load_checkpoint(folder), out)
        return made[mm_tokens]

    return make


@pytest.fixture(scope="session")
def tiny_fp32_export(tmp_path_factory):
    """A tiny random Gemma 3 (window 8 in 24 local rows, 96 positions) exported fp32 for the ort target, once per
    session: the speculative decoding and batching engine tests share it (~15 s an export)."""
    from gemma3.exporter.export import export
    from gemma3.exporter.recipes import recipe
    from gemma3.graphs.config import tiny
    from gemma3.graphs.loaders.random_weights import RandomCheckpoint

    checkpoint = RandomCheckpoint(tiny(max_position_embeddings=96), seed=4)
    return export(checkpoint, tmp_path_factory.mktemp("tiny_export") / "tiny", recipe("fp32"), eval_graph=False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(transformers model, its safetensors folder) of `tiny()` with random weights (seed 11): the ort and tensorrt
    graph tests export it and compare against the model."""
    from gemma3.graphs.config import tiny
    from tests.hf_reference import random_hf_model, save_hf

    hf = random_hf_model(tiny(), seed=11)
    folder = save_hf(hf, tmp_path_factory.mktemp("ckpt"))
    # HF folders ship tokenizer.model; these graph tests never tokenize, so a placeholder file stands in
    (folder / "tokenizer.model").write_bytes(b"placeholder: graph tests do not tokenize")
    return hf, folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random decoder with Gemma's real tokenizer (256 tokens of context), shared by the server's tests."""
    from gemma3.runtime.api import load
    from tests.test_runtime_tinymodel import write_tiny_model

    folder = tmp_path_factory.mktemp("serve_tiny")
    write_tiny_model(folder, vocab=262144, max_context=256, seed=5, with_tokenizer=True)
    return load(folder, threads=1)
