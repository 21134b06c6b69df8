"""End to end on a tiny random Gemma 3 written by the real exporter: gemma3-export's folder, served by the runtime.

The reference is our PyTorch definition carrying the same random weights (itself checked against transformers in
test_model_parity.py). The vocabulary is Gemma's full 262144 so the real tokenizer and chat template apply.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gemma3.runtime import evaluate
from gemma3.runtime.api import load
from gemma3.runtime.chat import STOP_IDS
from gemma3.runtime.perplexity import eval_ids, eval_windows, perplexity, window_nll


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from gemma3.exporter.export import export
    from gemma3.exporter.recipes import recipe
    from gemma3.graphs import model_from_checkpoint
    from gemma3.graphs.config import tiny
    from gemma3.graphs.loaders.random_weights import RandomCheckpoint
    checkpoint = RandomCheckpoint(tiny(vocab_size=262144, max_position_embeddings=256), seed=4)
    folder = export(checkpoint, tmp_path_factory.mktemp("export") / "tiny", recipe("fp32"))
    return folder, model_from_checkpoint(checkpoint).eval()


@torch.no_grad()
def torch_greedy(reference, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        token = int(reference(torch.tensor([ids + out]))[0, -1].argmax())
        if token in STOP_IDS:
            break
        out.append(token)
    return out


def test_manifest_of_a_real_export_loads(exported):
    folder, reference = exported
    model = load(folder, threads=1)
    m = model.manifest
    assert m.max_context == 256 and m.eval_decoder is not None
    assert [layer.kind for layer in m.decoder.layers] == list(reference.config.layer_types)
    cache = model.decoder.new_cache()
    assert cache.global_capacity == 256  # rounded up to the allocation unit, capped at max_context
    # The exported graph updates the bound buffers in place too.
    model.decoder.prefill(cache, [2, 100, 200, 300])
    pointers = [value.data_ptr() for _, _, value in cache.bindings()]
    first_global = list(reference.config.layer_types).index("global")
    assert not cache.key_array(first_global)[:, :, 4].any()
    model.decoder.step(cache, [400])
    assert [value.data_ptr() for _, _, value in cache.bindings()] == pointers
    assert cache.key_array(first_global)[:, :, 4].any() and cache.length == 5


def test_greedy_generation_matches_torch(exported):
    folder, reference = exported
    model = load(folder, threads=1, chunk_size=5)  # small chunks: the prompt spans several prefill steps
    result = model.generate("Tell me about the sea.", system="Be poetic.", temperature=0, max_new_tokens=12)
    ids = model.prompt_ids("Tell me about the sea.", system="Be poetic.")
    assert result.token_ids == torch_greedy(reference, ids, 12)


def test_chat_session_matches_torch(exported):
    folder, reference = exported
    chat = load(folder, threads=1).chat(temperature=0, max_new_tokens=6)
    chat.send("Hello!")
    stream = chat.stream("And then?")
    prefix = list(chat.tokens)
    assert stream.consume().token_ids == torch_greedy(reference, prefix, 6)


@torch.no_grad()
def test_perplexity_matches_torch(exported):
    folder, reference = exported
    ours = evaluate.evaluate(folder, threads=1, targets=96, window=48, chunk=20)
    tokenizer = load(folder).tokenizer
    windows = eval_windows(eval_ids(tokenizer.encode, 2, 96), 2, 48, 96)
    total = sum(window_nll(reference(torch.tensor([inputs]))[0].numpy(), targets) for inputs, targets in windows)
    assert ours.tokens == 96 and math.isfinite(ours.perplexity)
    assert np.isclose(ours.perplexity, perplexity(total, 96), rtol=1e-4)
