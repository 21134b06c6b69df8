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


@pytest.fixture(scope="module")
def trt_270m_fp32(gguf_270m_path, tmp_path_factory):
    """The real 270M as tensorrt-target graphs in fp32 compute (the exactness reference of that target)."""
    from gemma3.exporter.export import export
    from gemma3.exporter.recipes import recipe
    from gemma3.graphs import open_checkpoint

    return export(open_checkpoint(gguf_270m_path, size="270m"), tmp_path_factory.mktemp("trt270m") / "fp32",
                  recipe("fp32", "tensorrt"), max_context=1024, eval_graph=False)


@torch.no_grad()
def test_tensorrt_graph_beyond_the_window_and_greedy(trt_270m_fp32, hf_270m_model, hf_270m_tokenizer):
    """The tensorrt graph itself (HybridAttention nodes lowered to the reference op, run on the CPU): 700 tokens in
    3 chunks past the 512 window and 40 decode steps, then 24 greedy tokens, against transformers."""
    from gemma3.exporter.tensorrt_on_cpu import CpuSteps

    text = pydoc_data.topics.topics["assert"] + pydoc_data.topics.topics["assignment"]
    ids = _ids(hf_270m_tokenizer, text)[:, :700]
    reference = hf_270m_model(ids).logits[0].numpy()
    steps, pos, worst = CpuSteps(trt_270m_fp32), 0, 0.0
    for n in [256, 256, 148] + [1] * 40:
        logits = steps(ids[:, pos:pos + n].numpy())
        worst = max(worst, float(np.abs(logits[0, -1] - reference[pos + n - 1]).max()))
        pos += n
    print(f"270m tensorrt fp32 graph vs transformers over 700 tokens: max abs diff {worst:.2e}")
    assert worst < 1e-3
    prompt = _ids(hf_270m_tokenizer, "Once upon a time, in a small village by the sea,")
    expected = hf_270m_model.generate(prompt, max_new_tokens=24, do_sample=False, top_k=None, top_p=None)
    steps, produced = CpuSteps(trt_270m_fp32), []
    logits = steps(prompt.numpy())
    while len(produced) < 24:
        produced.append(int(logits[0, -1].argmax()))
        logits = steps(np.array([[produced[-1]]]))
    assert produced == expected[0, prompt.shape[1]:].tolist()
