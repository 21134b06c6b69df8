"""Calibration statistics: the layer-streaming pass equals hooks on the whole loaded model."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gemma3.exporter.calibrate import calibration_text, input_statistics
from gemma3.exporter.recipes import EMBED
from gemma3.graphs import load_checkpoint, open_checkpoint
from gemma3.graphs.config import tiny
from gemma3.runtime.perplexity import eval_text
from tests.hf_reference import random_hf_model, save_hf


@torch.no_grad()
def test_streamed_importance_equals_whole_model_hooks(tmp_path):
    folder = save_hf(random_hf_model(tiny(), seed=5), tmp_path)
    ids = torch.randint(0, tiny().vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))  # > window 8
    statistics = input_statistics(open_checkpoint(folder), ids[0].tolist())
    streamed = statistics.importance

    model, expected = load_checkpoint(folder), {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(
                lambda _m, inputs, key=f"{name}.weight": expected.__setitem__(key, inputs[0][0].square().mean(0)))
    head_inputs = []
    model.text.final_norm.register_forward_hook(lambda _m, _i, out: head_inputs.append(out[0].double()))
    model(ids)
    expected[EMBED] = head_inputs[0].square().mean(0)
    assert set(streamed) == set(expected) and len(expected) == 7 * tiny().num_layers + 1
    for key, value in expected.items():
        np.testing.assert_allclose(streamed[key], value.float().numpy(), rtol=1e-4, err_msg=key)
    gram = (head_inputs[0].T @ head_inputs[0] / ids.shape[1]).numpy()
    assert set(statistics.gram) == {EMBED}
    np.testing.assert_allclose(statistics.gram[EMBED], gram, rtol=1e-4, atol=1e-6 * np.abs(gram).max())
    np.testing.assert_allclose(np.diag(statistics.gram[EMBED]), streamed[EMBED], rtol=1e-4)


def test_calibration_text_is_not_the_evaluation_text():
    text, scored = calibration_text(), eval_text()
    assert len(text) > 20_000
    assert not any(paragraph in scored for paragraph in text.split("\n\n") if len(paragraph) > 80)
