"""The real Gemma 3 270M exported to ONNX (fp32) against transformers on the same GGUF weights.

Tolerance 1e-3 absolute on logits of magnitude ~20-70, as in test_real_270m.py: identical weights, fp32, only the
reduction order differs (ONNX Runtime's GroupQueryAttention and MLAS GEMMs vs PyTorch's).
"""

from __future__ import annotations

import pydoc_data.topics

import numpy as np
import pytest
import torch

from tests.ort_steps import Steps

pytestmark = pytest.mark.real270m


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([[2] + tokenizer(text, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def test_prefill_and_decode_beyond_the_window(ort_270m_fp32, hf_270m_model, hf_270m_tokenizer):
    text = pydoc_data.topics.topics["assert"] + pydoc_data.topics.topics["assignment"]
    ids = _ids(hf_270m_tokenizer, text)[:, :700]
    reference = hf_270m_model(ids).logits[0].numpy()
    steps, pos, worst = Steps(ort_270m_fp32, global_capacity=1024), 0, 0.0
    for n in [256, 256, 88] + [1] * 100:  # chunked prefill past the 512 window, then decode to 700
        logits = steps(ids[:, pos:pos + n].numpy())
        worst = max(worst, float(np.abs(logits[0, -1] - reference[pos + n - 1]).max()))
        pos += n
    print(f"270m ORT fp32 vs transformers over 700 tokens (3 chunks + 100 decode steps): max abs diff {worst:.2e}")
    assert worst < 1e-3


@torch.no_grad()
@pytest.mark.parametrize("prompt", ["Once upon a time, in a small village by the sea,", "def quicksort(arr):\n"])
def test_greedy_32_tokens_identical(ort_270m_fp32, hf_270m_model, hf_270m_tokenizer, prompt):
    ids = _ids(hf_270m_tokenizer, prompt)
    expected = hf_270m_model.generate(ids, max_new_tokens=32, do_sample=False, top_k=None, top_p=None)
    expected = expected[0, ids.shape[1]:].tolist()
    steps, produced = Steps(ort_270m_fp32, global_capacity=128), []
    logits = steps(ids.numpy())
    while len(produced) < len(expected):
        token = int(logits[0, -1].argmax())
        produced.append(token)
        logits = steps(np.array([[token]]))
    print("270m ORT greedy:", repr(hf_270m_tokenizer.decode(produced)))
    assert produced == expected
