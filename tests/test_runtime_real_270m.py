"""The runtime end to end on the real Gemma 3 270M exported by our exporter (fp32), against transformers.

Same weights on both sides (the GGUF's dequantized tensors): greedy generations through the chat template, a
chat session that keeps its cache, and perplexity on a shortened run of the shared protocol.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma3.runtime import evaluate
from gemma3.runtime.api import load
from gemma3.runtime.chat import STOP_IDS, render_chat
from gemma3.runtime.perplexity import eval_ids, eval_windows, perplexity, window_nll

pytestmark = pytest.mark.real270m


@pytest.fixture(scope="module")
def model(ort_270m_fp32):
    return load(ort_270m_fp32)


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, top_k=None, top_p=None)
    produced = out[0, len(ids):].tolist()
    stop = next((i for i, t in enumerate(produced) if t in STOP_IDS), len(produced))
    return produced[:stop]


@torch.no_grad()
@pytest.mark.parametrize("prompt", ["What is the capital of France?", "Write a haiku about the sea."])
def test_greedy_chat_matches_transformers(model, hf_270m_model, prompt):
    result = model.generate(prompt, system="Answer briefly.", temperature=0, max_new_tokens=24)
    ids = model.prompt_ids(prompt, system="Answer briefly.")
    assert result.token_ids == hf_greedy(hf_270m_model, ids, 24)
    print(f"270m chat: {result.text!r} ({result.stats.decode_tokens_per_s:.1f} tok/s decode)")


def test_speculative_lookup_keeps_greedy_output(model):
    """Prompt lookup on a quoting prompt: same tokens as plain greedy, in fewer decoder steps."""
    passage = ("The mitochondrion is the powerhouse of the cell. It produces energy in the form of ATP through "
               "cellular respiration, using oxygen and nutrients.")
    prompt = f"Repeat this passage word for word: {passage}"
    plain = model.generate(prompt, temperature=0, max_new_tokens=40)
    fast = model.generate(prompt, temperature=0, max_new_tokens=40, speculative="lookup")
    assert fast.token_ids == plain.token_ids and fast.finish_reason == plain.finish_reason
    assert fast.stats.accepted_tokens > 0 and fast.stats.decode_steps < plain.stats.decode_steps


@torch.no_grad()
def test_chat_session_reuses_the_cache_faithfully(model, hf_270m_model):
    chat = model.chat(temperature=0, max_new_tokens=16)
    chat.send("Name three colors.")
    second = chat.stream("And three animals?")
    prefix = list(chat.tokens)  # the whole conversation up to the second reply
    reply = second.consume()
    assert reply.stats.prompt_tokens < len(prefix) // 2  # only the new turn was prefilled
    assert reply.token_ids == hf_greedy(hf_270m_model, prefix, 16)
    assert prefix[: len(render_chat(model.tokenizer, [{"role": "user", "content": "Name three colors."}]))] == (
        render_chat(model.tokenizer, [{"role": "user", "content": "Name three colors."}]))


@torch.no_grad()
def test_perplexity_matches_transformers_on_a_short_protocol(ort_270m_fp32, model, hf_270m_model):
    """256 targets in windows of 128 (the full protocol is gemma3-eval's job: 13.41 for this model)."""
    ours = evaluate.evaluate(ort_270m_fp32, targets=256, window=128)
    windows = eval_windows(eval_ids(model.tokenizer.encode, 2, 256), 2, 128, 256)
    total = sum(window_nll(hf_270m_model(torch.tensor([inputs])).logits[0].numpy(), targets)
                for inputs, targets in windows)
    theirs = perplexity(total, 256)
    print(f"270m short-protocol perplexity: runtime {ours.perplexity:.4f}, transformers {theirs:.4f}")
    assert ours.tokens == 256 and np.isclose(ours.perplexity, theirs, rtol=1e-3)
