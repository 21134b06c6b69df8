"""`gemma3::hybrid_attention`: the torch custom op whose eager body is the reference implementation.

The contract (inputs, outputs, attributes, mask rule, cache layouts) is defined once in
`gemma3.plugins.attention_schema`; read it there. Export translates this op per target; here it runs eagerly.
"""

from __future__ import annotations

import torch

from gemma3.plugins import attention_schema as schema

_QUALNAME = f"{schema.OP_NAMESPACE}::{schema.OP_NAME}"


def key_positions(past_len: torch.Tensor, capacity: int, window: int) -> torch.Tensor:
    """Absolute position held by each cache row before this step; -1 marks an empty row.

    past_len (B,) -> (B, capacity) (a 0-d past_len gives (capacity,)). Global cache: row r holds position r.
    Local ring of `window` rows: row r holds the newest position p < past_len with p % window == r.
    """
    past = past_len.to(torch.int64)[..., None]
    rows = torch.arange(capacity, dtype=torch.int64)
    if window == 0:
        return torch.where(rows < past, rows, -1)
    newest = past - 1 - torch.remainder(past - 1 - rows, window)
    return torch.where(newest >= 0, newest, -1)


def visibility(
    q_pos: torch.Tensor, k_pos: torch.Tensor, q_group: torch.Tensor, k_group: torch.Tensor, window: int
) -> torch.Tensor:
    """Boolean mask (B, S, K): key visible to query. -1 key positions are empty rows and never visible.

    q_pos (B, S), k_pos (B, K), q_group (B, S), k_group (B, K): the rule of the schema, in one place.
    """
    q_pos, k_pos = q_pos[:, :, None], k_pos[:, None, :]
    causal = k_pos <= q_pos
    same_image = (q_group[:, :, None] == k_group[:, None, :]) & (q_group[:, :, None] >= 0)
    visible = (causal | same_image) & (k_pos >= 0)
    if window > 0:
        visible = visible & (q_pos - k_pos < window)
    return visible


def _write_cache(cache: torch.Tensor, new: torch.Tensor, q_pos: torch.Tensor, window: int,
                 scale: float = 0.0) -> torch.Tensor:
    """cache (B, KVH, C, D) with new (B, KVH, S, D) at positions q_pos (B, S) written at their rows (ring rows
    for local layers). A scatter per batch row: every sequence writes at its own position. scale > 0: the cache is
    fp8 and the new rows are stored as saturate(new / scale)."""
    if window > 0:  # only the newest `window` positions survive in the ring (and their rows are distinct)
        new, q_pos = new[:, :, -window:], q_pos[:, -window:]
    rows = torch.remainder(q_pos, window) if window > 0 else q_pos  # (B, kept)
    index = rows[:, None, :, None].expand(new.shape)
    if scale > 0:  # scatter the fp8 bytes (torch has no fp8 scatter)
        stored = (new.float() / scale).clamp(-schema.FP8_MAX, schema.FP8_MAX).to(cache.dtype)
        return cache.view(torch.uint8).scatter(2, index, stored.view(torch.uint8)).view(cache.dtype)
    return cache.scatter(2, index, new)


def _read_cache(cache: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The cached rows as values in the compute dtype (fp8 rows times their scale)."""
    return (cache.float() * scale).to(dtype) if scale > 0 else cache


def hybrid_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    past_len: torch.Tensor,
    group_ids: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
    window: int,
    k_scale: float = 0.0,
    v_scale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, new_tokens, _ = q.shape
    capacity = k_cache.shape[2]
    q = q.view(batch, new_tokens, num_heads, head_dim).transpose(1, 2)  # (B, H, S, D)
    k = k.view(batch, new_tokens, num_kv_heads, head_dim).transpose(1, 2)  # (B, KVH, S, D)
    v = v.view(batch, new_tokens, num_kv_heads, head_dim).transpose(1, 2)

    # Attend over [cache rows as they were] + [new tokens]; the new tokens are not yet in the cache, so a
    # chunk longer than the window still sees every key its queries need.
    past = past_len.to(torch.int64)  # (B,) int32 by contract; int64 for index arithmetic
    q_pos = past[:, None] + torch.arange(new_tokens, dtype=torch.int64)  # (B, S)
    k_pos = torch.cat((key_positions(past, capacity, window), q_pos), dim=1)  # (B, C + S)
    cached_group = torch.full((batch, capacity), -1, dtype=group_ids.dtype)  # images never straddle steps
    k_group = torch.cat((cached_group, group_ids), dim=1)  # (B, C + S)
    mask = visibility(q_pos, k_pos, group_ids, k_group, window)  # (B, S, C + S)

    keys = torch.cat((_read_cache(k_cache, k_scale, k.dtype), k), dim=2)  # (B, KVH, C + S, D)
    values = torch.cat((_read_cache(v_cache, v_scale, v.dtype), v), dim=2)
    group = num_heads // num_kv_heads
    keys = keys.repeat_interleave(group, dim=1)  # (B, H, C + S, D)
    values = values.repeat_interleave(group, dim=1)

    scores = torch.matmul(q, keys.transpose(2, 3)) * scale  # (B, H, S, C + S)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, values)  # (B, H, S, D)
    out = out.transpose(1, 2).reshape(batch, new_tokens, num_heads * head_dim)

    return (out, _write_cache(k_cache, k, q_pos, window, k_scale),
            _write_cache(v_cache, v, q_pos, window, v_scale))


@torch.library.custom_op(_QUALNAME, mutates_args=(), schema=schema.torch_schema())
def hybrid_attention(q, k, v, k_cache, v_cache, past_len, group_ids, num_heads, num_kv_heads, head_dim, scale,
                     window, k_scale, v_scale):
    return hybrid_attention_reference(q, k, v, k_cache, v_cache, past_len, group_ids, num_heads, num_kv_heads,
                                      head_dim, scale, window, k_scale, v_scale)


@hybrid_attention.register_fake
def _(q, k, v, k_cache, v_cache, past_len, group_ids, num_heads, num_kv_heads, head_dim, scale, window, k_scale,
      v_scale):
    return q.new_empty(q.shape), torch.empty_like(k_cache), torch.empty_like(v_cache)
