"""Our PyTorch definition against transformers' Gemma 3 on random tiny configs, same weights in both.

Tolerance: fp32, max abs logit difference <= 1e-4 on logits of magnitude ~1-10. Both sides compute the same
math in fp32; they differ only in reduction order (matmul blocking, -inf masking vs additive min-float masks,
repeat_interleave vs expand), which moves results by a few fp32 ulps per op (~1e-6 relative) and accumulates to
~1e-5 over a few layers. A real semantic error (a wrong window, RoPE base, norm offset, mask) moves logits by
>= 1e-2, three orders of magnitude above the bound.
"""

from __future__ import annotations

import pytest
import torch

from gemma3.graphs import load_checkpoint
from gemma3.graphs.config import GLOBAL, LOCAL, RopeConfig, tiny
from tests.hf_reference import prompt_with_images, random_hf_model, save_hf, tiny_multimodal

ATOL = 1e-4

TEXT_VARIANTS = {
    # 7 layers: local x5, global, local (ends on a local layer like 27b); GQA 4/2; head_dim 32 != 64 / 4;
    # linear x8 RoPE scaling on global layers only; window 8 (sequences below are longer)
    "gqa-linear-rope": tiny(),
    # 27b-style: query_pre_attn_scalar = hidden / heads (16), not head_dim (32)
    "27b-scalar": tiny(query_pre_attn_scalar=16),
    # MQA like 270m / 1b, unscaled RoPE, and 13 layers (two global layers)
    "mqa": tiny(num_kv_heads=1, num_layers=13, rope={LOCAL: RopeConfig(1e4), GLOBAL: RopeConfig(1e6)}),
}


def _pair(config, tmp_path_factory, seed=0):
    hf = random_hf_model(config, seed)
    folder = save_hf(hf, tmp_path_factory.mktemp(config.name))
    return hf, load_checkpoint(folder)


@pytest.fixture(scope="module", params=list(TEXT_VARIANTS))
def text_pair(request, tmp_path_factory):
    return _pair(TEXT_VARIANTS[request.param], tmp_path_factory)


def _random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 2
    return ids


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def test_full_forward_matches_hf(text_pair):
    hf, ours = text_pair
    ids = _random_ids(2, 40)  # 40 > window 8: local layers must slide
    diff = _max_diff(hf(ids).logits, ours(ids))
    print(f"text full forward max abs diff {diff:.2e}")
    assert diff < ATOL


@torch.no_grad()
def test_incremental_decode_equals_full_forward(text_pair):
    """Prefill chunks of several sizes (one longer than the window), then single tokens, over the cache."""
    hf, ours = text_pair
    ids = _random_ids(1, 44, seed=1)
    reference = hf(ids).logits
    cache = ours.new_cache(1, capacity=64)
    window = ours.config.sliding_window
    chunks, pos = [5, 11, 3] + [1] * 10 + [15], 0
    assert sum(chunks) == ids.shape[1] and max(chunks) > window
    for n in chunks:
        logits, cache = ours.step(ids[:, pos:pos + n], torch.tensor(pos), cache)
        assert _max_diff(logits, reference[:, pos:pos + n]) < ATOL, f"chunk at {pos} (+{n})"
        pos += n
    for i, (k, v) in enumerate(cache):  # the local caches never hold more than their window
        expected = window if ours.config.layer_types[i] == LOCAL else 64
        assert k.shape[2] == v.shape[2] == expected


@torch.no_grad()
def test_local_cache_evicts_exactly():
    """A ring row holds position p % W; after 3W tokens only the newest W positions remain."""
    from gemma3.graphs.attention import key_positions

    rows = key_positions(torch.tensor(25), capacity=8, window=8)
    assert sorted(rows.tolist()) == list(range(17, 25))
    assert all(r % 8 == i for i, r in enumerate(rows.tolist()))
    assert key_positions(torch.tensor(3), capacity=8, window=8).tolist() == [0, 1, 2, -1, -1, -1, -1, -1]


@pytest.fixture(scope="module", params=[4, 16])
def mm_pair(request, tmp_path_factory):
    """mm_tokens 4 (2x2 pool) and 16 (no pool, an image longer than the window 8: HF ANDs the window)."""
    return _pair(tiny_multimodal(mm_tokens=request.param), tmp_path_factory, seed=3)


@torch.no_grad()
def test_multimodal_two_images_match_hf(mm_pair):
    hf, ours = mm_pair
    c = ours.config
    ids = prompt_with_images(c, images=2)
    pixels = torch.rand(2, 3, c.vision.image_size, c.vision.image_size) * 2 - 1
    reference = hf(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == c.image_token_id).long()).logits
    diff = _max_diff(reference, ours(ids, pixels))
    print(f"multimodal max abs diff {diff:.2e} (mm_tokens {c.vision.mm_tokens_per_image})")
    assert diff < ATOL
    # the bidirectional groups matter: a causal-only run differs from the reference
    causal = hf(input_ids=ids, pixel_values=pixels).logits
    assert _max_diff(reference, causal) > 1e-3

    # image features equal HF's projector output
    hf_features = hf.model.get_image_features(pixels).pooler_output
    assert _max_diff(hf_features, ours.image_features(pixels)) < ATOL

    # chunked prefill that never splits an image, then decode, equals the full forward
    features = ours.image_features(pixels).flatten(0, 1)
    boundaries = [0, 4] + [int(i) for i in (ids[0] == c.eoi_token_id).nonzero().flatten() + 1] + [ids.shape[1]]
    cache, used = ours.new_cache(1, capacity=ids.shape[1]), 0
    for start, end in zip(boundaries, boundaries[1:]):
        chunk = ids[:, start:end]
        n_img = int((chunk == c.image_token_id).sum())
        logits, cache = ours.step(chunk, torch.tensor(start), cache, features[used:used + n_img])
        used += n_img
        assert _max_diff(logits, reference[:, start:end]) < ATOL, f"chunk {start}:{end}"


def test_text_only_model_refuses_images(text_pair):
    _, ours = text_pair
    with pytest.raises(ValueError, match="text-only"):
        ours.image_features(torch.zeros(1, 3, 896, 896))
