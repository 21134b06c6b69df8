"""Random tiny Gemma 3 models in Hugging Face transformers (the reference), saved as real checkpoints.

The same weights reach our model through our own loader (save_pretrained -> load_checkpoint), so every
parity test also exercises the safetensors path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

from bench.make_checkpoint import hf_config  # the config builders live with the checkpoint writer
from gemma3.graphs.config import Gemma3Config, VisionConfig, tiny


def tiny_multimodal(**overrides) -> Gemma3Config:
    """A tiny image model: 28x28 images of 7x7 patches (16 patches), pooled to `mm_tokens` soft tokens."""
    mm_tokens = overrides.pop("mm_tokens", 4)
    vision = VisionConfig(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, mm_tokens_per_image=mm_tokens)
    ids = {"image_token_id": 510, "boi_token_id": 508, "eoi_token_id": 509}
    return tiny(name="tiny-mm", vision=vision, **{**ids, **overrides})


def random_hf_model(c: Gemma3Config, seed: int = 0):
    """An HF model with every parameter random (HF initialises norms and the projector to zero)."""
    torch.manual_seed(seed)
    cls = Gemma3ForCausalLM if c.vision is None else Gemma3ForConditionalGeneration
    model = cls(hf_config(c)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lm_head" in name:
                continue  # tied to the embedding
            std = 0.1 if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name else 0.05
            p.normal_(0.0, std)
    model.config._attn_implementation = "eager"
    return model


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def prompt_with_images(c: Gemma3Config, images: int, seed: int = 0, text: int = 6) -> torch.Tensor:
    """[bos] text ([boi] soft x T [eoi] text) x images, with random text ids below the special ids."""
    g = torch.Generator().manual_seed(seed)
    ids = [2] + torch.randint(3, 500, (text,), generator=g).tolist()
    for _ in range(images):
        ids += [c.boi_token_id] + [c.image_token_id] * c.vision.mm_tokens_per_image + [c.eoi_token_id]
        ids += torch.randint(3, 500, (text,), generator=g).tolist()
    return torch.tensor([ids])
