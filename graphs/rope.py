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
        """positions (S,) or (B, S) int64 -> cos, sin (1 or B, S, head_dim / 2) in `dtype` (one half: both halves
        share it). Per-sequence positions are the batched (tensorrt) contract: each row at its own offset."""
        inv = getattr(self, f"inv_freq_{kind}")
        if positions.dim() == 2:
            freqs = positions.to(torch.float32)[:, :, None] * inv  # (B, S, head_dim / 2)
            return freqs.cos().to(dtype), freqs.sin().to(dtype)
        freqs = positions.to(torch.float32)[:, None] * inv[None, :]
        return freqs.cos().to(dtype)[None], freqs.sin().to(dtype)[None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, heads, head_dim) -> (B, S, heads * head_dim), rotated in halves (transformers' rotate_half).

    ONNX's RotaryEmbedding (opset 23): one node per q / k at export instead of slices, negations and concats;
    eagerly it computes x1 * cos - x2 * sin, x2 * cos + x1 * sin, the same products as rotate_half.
    """
    batch = x.shape[0]
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)  # the op wants one table per batch row
    return torch.onnx.ops.rotary_embedding(x.flatten(2), cos, sin, num_heads=x.shape[2])
