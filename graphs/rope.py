"""Rotary position embeddings, half-split (`rotate_half`), one table per layer type.

Matches transformers' Gemma3RotaryEmbedding bit for bit in fp32: inv_freq = 1 / base^(arange(0, d, 2) / d),
divided by the linear factor (global layers of 4b/12b/27b only), angles = position * inv_freq in fp32.
"""

from __future__ import annotations

import torch

from .config import Gemma3Config, RopeConfig


def inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (rope.base**exponent) / rope.linear_factor  # (head_dim / 2,)


class RotaryTables(torch.nn.Module):
    """cos/sin for arbitrary positions, per layer type. Buffers are not weights (not saved, not loaded)."""

    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.layer_types = sorted(config.rope)
        for kind, rope in config.rope.items():
            self.register_buffer(f"inv_freq_{kind}", inv_freq(rope, config.head_dim), persistent=False)

    def forward(self, positions: torch.Tensor, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (S,) int64 -> cos, sin (S, head_dim) in `dtype`."""
        freqs = positions.to(torch.float32)[:, None] * getattr(self, f"inv_freq_{kind}")[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, heads, head_dim); cos/sin (S, head_dim)."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return x * cos + rotate_half(x) * sin
