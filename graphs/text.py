"""The Gemma 3 text decoder, read top to bottom: norm, MLP, attention, layer, decoder.

Follows transformers' `modeling_gemma3.py` (the reference the tests compare against) and the technical report.
No data-dependent Python control flow in any forward: everything traces with dynamic sequence lengths.
Parameter names (`layers.{i}.attn.q_proj.weight`, ...) are ours; loaders map checkpoint names onto them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import hybrid_attention
from .config import Gemma3Config
from .rope import RotaryTables, apply_rope

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (keys, values), each (B, kv_heads, C, head_dim)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32; w is stored zero-centred as in HF checkpoints."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class MLP(nn.Module):
    def __init__(self, c: Gemma3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, c: Gemma3Config, layer: int):
        super().__init__()
        self.kind = c.layer_types[layer]  # selects the RoPE table
        self.window = c.window(layer)
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.scale = c.query_pre_attn_scalar**-0.5  # report: 27b uses hidden / heads = 168, not head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)  # one weight shared by all heads
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        # fp8 KV cache (attention_schema.py): per-layer scales the exporter calibrates; 0 = compute-dtype cache
        self.k_scale = self.v_scale = 0.0

    def forward(self, x, rope, past_len, group_ids, cache):
        batch, new_tokens, _ = x.shape
        cos, sin = rope
        q = self.q_proj(x).view(batch, new_tokens, self.num_heads, self.head_dim)  # (B, S, H, D)
        k = self.k_proj(x).view(batch, new_tokens, self.num_kv_heads, self.head_dim)  # (B, S, KVH, D)
        v = self.v_proj(x)  # (B, S, KVH * D): v is not normalised
        q = apply_rope(self.q_norm(q), cos, sin)  # QK-norm before RoPE; (B, S, H * D)
        k = apply_rope(self.k_norm(k), cos, sin)
        past = past_len.reshape(-1).expand(batch).to(torch.int32)  # the op's contract: [B] int32
        out, k_cache, v_cache = hybrid_attention(
            q, k, v, cache[0], cache[1], past, group_ids.to(torch.int32),
            self.num_heads, self.num_kv_heads, self.head_dim, self.scale, self.window, self.k_scale, self.v_scale,
        )
        return self.o_proj(out), (k_cache, v_cache)


class DecoderLayer(nn.Module):
    def __init__(self, c: Gemma3Config, layer: int):
        super().__init__()
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c, layer)
        self.post_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_ffw_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)
        self.post_ffw_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, rope, past_len, group_ids, cache):
        attn_out, cache = self.attn(self.input_norm(x), rope, past_len, group_ids, cache)
        x = x + self.post_attn_norm(attn_out)
        x = x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))
        return x, cache


def image_groups(input_ids: torch.Tensor, image_token_id: int | None) -> torch.Tensor:
    """(B, S) group id per token: -1 for text, k for the k-th run of image soft tokens in the row."""
    if image_token_id is None:
        return torch.full_like(input_ids, -1)
    is_image = input_ids == image_token_id
    previous = F.pad(is_image, (1, 0), value=False)[:, :-1]
    starts = is_image & ~previous
    return torch.where(is_image, torch.cumsum(starts.to(torch.int64), dim=1) - 1, -1)


class TextDecoder(nn.Module):
    def __init__(self, c: Gemma3Config):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)  # tied: also the lm_head
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_layers))
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rope = RotaryTables(c)
        # HF: sqrt(hidden) as an fp32 scalar rounded to the weight dtype (bf16: 640 -> 25.25) before multiplying.
        # Kept as Python floats per dtype so tracing sees a constant, not a tensor.
        root = torch.tensor(c.hidden_size**0.5, dtype=torch.float32, device="cpu")
        self.embed_scale = {dt: root.to(dt).item() for dt in (torch.float32, torch.float16, torch.bfloat16)}

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled token embeddings; image soft-token rows replaced (unscaled) by `image_features` (N, hidden),
        taken in order of appearance, row-major over the batch (as transformers' masked_scatter)."""
        scale = self.embed_scale[self.embed_tokens.weight.dtype]
        image_token = self.config.image_token_id
        lookup = input_ids
        if image_token is not None and image_token >= self.config.vocab_size:
            lookup = torch.where(input_ids == image_token, 0, input_ids)  # no row for it: HF reads row 0 instead
        x = self.embed_tokens(lookup) * scale  # (B, S, hidden)
        if image_features is None or image_token is None:
            return x
        is_image = (input_ids == image_token).reshape(-1)  # (B * S,)
        # row 0 is a zero pad so that a step without image tokens (0 feature rows) still gathers in range
        rows = torch.cat((image_features.new_zeros(1, image_features.shape[-1]), image_features)).to(x.dtype)
        index = torch.where(is_image, torch.cumsum(is_image.to(torch.int64), 0), 0)
        gathered = rows[index].reshape(x.shape)
        return torch.where(is_image.reshape(*input_ids.shape, 1), gathered, x)

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype = torch.float32) -> KVCache:
        """Empty caches: global layers hold `capacity` positions, local layers exactly their window."""
        c = self.config
        shapes = [(batch, c.num_kv_heads, c.window(i) or capacity, c.head_dim) for i in range(c.num_layers)]
        return [(torch.zeros(s, dtype=dtype), torch.zeros(s, dtype=dtype)) for s in shapes]

    def step(
        self, x: torch.Tensor, past_len: torch.Tensor, group_ids: torch.Tensor, cache: KVCache
    ) -> tuple[torch.Tensor, KVCache]:
        """Embedded new tokens (B, S, hidden) after `past_len` cached ones -> final-normed hidden, new cache.

        past_len: 0-d (every row at the same offset: the ort graphs) or (B,) (per sequence: the tensorrt graphs)."""
        if past_len.dim() == 0:
            positions = past_len + torch.arange(x.shape[1], dtype=torch.int64)  # (S,)
        else:
            positions = past_len.to(torch.int64)[:, None] + torch.arange(x.shape[1], dtype=torch.int64)  # (B, S)
        tables = {kind: self.rope(positions, kind, x.dtype) for kind in self.rope.layer_types}
        new_cache: KVCache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer(x, tables[layer.attn.kind], past_len, group_ids, layer_cache)
            new_cache.append(layer_cache)
        return self.final_norm(x), new_cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embed_tokens.weight)  # tied lm_head; Gemma 3 has no final soft-capping
