"""The decoder's image graph (ort target) against transformers' Gemma3ForConditionalGeneration, tiny random configs.

Image chunks run `decoder_images.onnx` (causal=0 GroupQueryAttention with the mask built in the graph); text
chunks and decode steps run `decoder.onnx` on the same caches. Tolerance 1e-4: fp32, reduction order only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma3.exporter.export import local_capacity
from tests.hf_reference import prompt_with_images
from tests.ort_steps import Steps

ATOL = 1e-4


@pytest.fixture(scope="module", params=[4, 16], ids=["4-soft-tokens", "16-soft-tokens-over-window"])
def mm_export(request, tiny_mm_export):
    return tiny_mm_export(request.param)


def _chunks(ids: torch.Tensor, c, split_text: int = 5) -> list[tuple[int, int]]:
    """Chunk boundaries that never split an image: text in pieces of `split_text`, each image (boi .. eoi) whole
    together with the text right after it up to the next piece boundary."""
    row, bounds, start = ids[0].tolist(), [], 0
    while start < len(row):
        end = min(start + split_text, len(row))
        if c.boi_token_id in row[start:end]:
            end = row.index(c.eoi_token_id, start) + 2
        bounds.append((start, min(end, len(row))))
        start = bounds[-1][1]
    return bounds


# (images, text tokens around them): two images after a prefix longer than the local cache (24 rows), so the
# windowed buffers have evicted before the first image; three images back to back (an image and its Pan & Scan
# crops: the crops follow the original with a few text tokens between).
@pytest.mark.parametrize("images, text", [(2, 30), (3, 3)], ids=["two-images-long-prefix", "pan-and-scan-like"])
@torch.no_grad()
def test_image_prompt_logits_and_greedy_match_transformers(mm_export, images, text):
    hf, ours, out = mm_export
    c = ours.config
    ids = prompt_with_images(c, images=images, seed=images, text=text)
    pixels = torch.rand(images, 3, c.vision.image_size, c.vision.image_size, generator=torch.Generator().manual_seed(1))
    pixels = pixels * 2 - 1
    features = ours.image_features(pixels).flatten(0, 1).numpy()  # the vision graph has its own parity test
    reference = hf(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == c.image_token_id).long()).logits[0]
    steps, used, worst = Steps(out, global_capacity=256), 0, 0.0
    for start, end in _chunks(ids, c):
        chunk = ids[:, start:end].numpy()
        n_image = int((chunk == c.image_token_id).sum())
        rows = features[used:used + n_image] if n_image else None
        logits = steps(chunk, rows)[0, -1]
        used += n_image
        worst = max(worst, float(np.abs(logits - reference[end - 1].numpy()).max()))
    print(f"image prompt ({ids.shape[1]} tokens, {images} images): max abs diff {worst:.2e}")
    assert worst < ATOL
    for layer in steps.io["layers"]:  # the windowed caches kept their capacity through the image steps
        if layer["window"]:
            assert steps.cache[layer["past_key"]].shape[2] == local_capacity(layer["window"])

    # greedy continuation: transformers' generate vs our text graph stepping on the same caches
    expected = hf.generate(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == c.image_token_id).long(),
                           max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    token, got = int(np.argmax(logits)), []
    for _ in range(12):
        got.append(token)
        token = int(np.argmax(steps(np.array([[token]]))[0, -1]))
    assert got == expected


@torch.no_grad()
def test_the_image_graph_is_needed(mm_export):
    """The text graph on an image chunk is causal-only: it must differ from the reference, or this test file
    proves nothing about the bidirectional groups."""
    hf, ours, out = mm_export
    c = ours.config
    ids = prompt_with_images(c, images=1, text=3)
    pixels = torch.rand(1, 3, c.vision.image_size, c.vision.image_size) * 2 - 1
    reference = hf(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == c.image_token_id).long()).logits[0]
    causal = hf(input_ids=ids, pixel_values=pixels).logits[0]
    assert float((reference - causal).abs().max()) > 1e-3
