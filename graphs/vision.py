"""SigLIP vision tower and the Gemma 3 multimodal projector.

Tower: transformers' `SiglipVisionModel` without the pooling head (Gemma 3 sets vision_use_head=False):
conv patch embedding, learned positions, pre-LN encoder blocks with biased MHA, final post-LayerNorm.
Projector: transformers' `Gemma3MultiModalProjector`: (N, 4096, 1152) -> 64x64 grid -> 4x4 average pool ->
256 tokens -> RMSNorm (1 + w) -> matmul [1152, text_hidden] (no bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .text import RMSNorm


class VisionAttention(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = v.num_heads, v.hidden_size // v.num_heads
        self.q_proj = nn.Linear(v.hidden_size, v.hidden_size)
        self.k_proj = nn.Linear(v.hidden_size, v.hidden_size)
        self.v_proj = nn.Linear(v.hidden_size, v.hidden_size)
        self.o_proj = nn.Linear(v.hidden_size, v.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        heads = (batch, tokens, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(heads).transpose(1, 2)  # (N, H, T, Dh)
        k = self.k_proj(x).view(heads).transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5  # (N, H, T, T), no mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, tokens, width)
        return self.o_proj(out)


class VisionMLP(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.attn = VisionAttention(v)
        self.ln2 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.mlp = VisionMLP(v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class VisionTower(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, v.hidden_size, kernel_size=v.patch_size, stride=v.patch_size)
        self.pos_embed = nn.Embedding(v.patches_per_side**2, v.hidden_size)
        self.layers = nn.ModuleList(VisionLayer(v) for _ in range(v.num_layers))
        self.post_ln = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised pixels -> (N, patches, hidden)."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (N, hidden, 64, 64)
        x = x.flatten(2).transpose(1, 2) + self.pos_embed.weight[None]  # (N, 4096, hidden), row-major patches
        for layer in self.layers:
            x = layer(x)
        return self.post_ln(x)


class Projector(nn.Module):
    def __init__(self, v: VisionConfig, text_hidden: int):
        super().__init__()
        self.side, self.kernel = v.patches_per_side, v.pool_kernel
        self.norm = RMSNorm(v.hidden_size, v.layer_norm_eps)
        self.proj = nn.Parameter(torch.zeros(v.hidden_size, text_hidden))  # stored [vision, text] as in HF

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, 4096, vision_hidden) -> (N, 256, text_hidden)."""
        batch, _, width = patches.shape
        grid = patches.transpose(1, 2).reshape(batch, width, self.side, self.side)  # (N, C, 64, 64)
        pooled = F.avg_pool2d(grid, kernel_size=self.kernel, stride=self.kernel)  # (N, C, 16, 16)
        tokens = pooled.flatten(2).transpose(1, 2)  # (N, 256, C)
        return torch.matmul(self.norm(tokens), self.proj).type_as(patches)
