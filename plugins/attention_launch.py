"""How the attention kernel is launched: plain functions of shapes, attributes and a tactic.

The TensorRT registration (`tensorrt_plugin.py`, with TensorRT's symbolic shape expressions), the cuda-python
launcher of the GPU check (`cuda_launcher.py`, with ints) and the CPU tests (Triton's interpreter, with ints)
all call these, so what TensorRT would launch is what the checks launch. No torch, no tensorrt, no triton here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gemma3.plugins import attention_schema as schema


@dataclass(frozen=True)
class Tactic:
    """One compiled variant. block_m query rows x block_n keys per tile; splits > 1 splits a decode step's cache."""

    block_m: int
    block_n: int
    splits: int
    num_warps: int
    num_stages: int = 2


# Tactic 0 serves prefill chunks (many query tiles, one split), tactic 1 decode (one query tile: S * GROUP <= 16,
# the cache split 16 ways so a batch-1 step still fills the GPU). Either is correct for any step.
TACTICS: tuple[Tactic, ...] = (Tactic(64, 64, 1, 4), Tactic(16, 64, 16, 4))
MAX_SPLITS = max(t.splits for t in TACTICS)
MAX_SPLIT_ROWS = max(t.block_m * t.splits for t in TACTICS if t.splits > 1)

DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float8e4m3fn": "fp8e4nv"}  # Triton names


@dataclass(frozen=True)
class Attributes:
    """The node's attributes (schema.ATTRIBUTES), typed."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    window: int
    k_scale: float = 0.0
    v_scale: float = 0.0

    @classmethod
    def from_node(cls, attrs: dict[str, Any]) -> Attributes:
        names = [a.name for a in schema.ATTRIBUTES]
        missing = [n for n in names if n not in attrs]
        if missing:
            raise ValueError(f"HybridAttention node lacks attributes {missing}")
        return cls(**{n: attrs[n] for n in names})

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


def check(attrs: Attributes, dtype: str, cache_dtype: str) -> None:
    """What the kernel supports, in one place: raise a one-line reason for anything else."""
    if attrs.num_heads % attrs.num_kv_heads:
        raise ValueError(f"num_heads {attrs.num_heads} is not a multiple of num_kv_heads {attrs.num_kv_heads}")
    if not 1 <= attrs.group <= 4:
        raise ValueError(f"GQA ratio {attrs.group}: the kernel supports 1-4 query heads per kv head")
    if attrs.head_dim not in (64, 128, 256):
        raise ValueError(f"head_dim {attrs.head_dim}: the kernel supports 64, 128 and 256")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"compute dtype {dtype}: the kernel takes float32, float16 or bfloat16")
    fp8 = attrs.k_scale > 0
    if fp8 != (attrs.v_scale > 0):
        raise ValueError("k_scale and v_scale must both be 0 (compute-dtype caches) or both > 0 (fp8 caches)")
    if cache_dtype != ("float8e4m3fn" if fp8 else dtype):
        raise ValueError(f"cache dtype {cache_dtype} does not match k_scale {attrs.k_scale} and dtype {dtype}")


def constexprs(attrs: Attributes, dtype: str, tactic: Tactic) -> dict[str, Any]:
    """The kernel's compile-time constants: attributes, the compute dtype's dot precision, the tactic's tiles."""
    return {
        "KV_HEADS": attrs.num_kv_heads, "GROUP": attrs.group, "HEAD_DIM": attrs.head_dim, "WINDOW": attrs.window,
        "SCALE": float(attrs.scale), "K_SCALE": float(attrs.k_scale), "V_SCALE": float(attrs.v_scale),
        "BLOCK_M": tactic.block_m, "BLOCK_N": tactic.block_n, "SPLITS": tactic.splits,
        "UPCAST_DOT": dtype == "float32" or interpreting(),
    }


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): the kernel multiplies 16-bit tiles in fp32 there."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def signature(dtype: str, cache_dtype: str) -> dict[str, str]:
    """Triton's signature of the runtime parameters, in ABI order (pointers in, int32 scalars, pointers out)."""
    t, c = DTYPES[dtype], DTYPES[cache_dtype]
    return {
        "q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "k_cache_ptr": f"*{c}", "v_cache_ptr": f"*{c}",
        "past_len_ptr": "*i32", "group_ids_ptr": "*i32", "ws_ptr": "*fp32",
        "S": "i32", "C": "i32",
        "out_ptr": f"*{t}", "k_out_ptr": f"*{c}", "v_out_ptr": f"*{c}",
    }


N_INPUTS, N_SCALARS, N_OUTPUTS = 8, 2, 3  # the ABI's three groups, checked against the PTX entry


def _cdiv(a, b):
    return -(-a // b)


def scalar_args(new_tokens, capacity) -> tuple:
    """The int32 scalars, from shapes only: S = q.shape[1], C = k_cache.shape[2] (ints or TensorRT ShapeExprs)."""
    return (new_tokens, capacity)


def grid(new_tokens, batch, attrs: Attributes, tactic: Tactic, cdiv: Callable = _cdiv) -> tuple:
    """(query tiles, batch * kv heads, splits). `cdiv` is TensorRT's `trtp.cdiv` when given ShapeExprs."""
    return (cdiv(new_tokens * attrs.group, tactic.block_m), batch * attrs.num_kv_heads, tactic.splits)


def block(tactic: Tactic) -> int:
    return tactic.num_warps * 32


def workspace_elements(max_batch: int, num_kv_heads: int, head_dim: int) -> int:
    """fp32 elements of the attention workspace: a ticket counter per (sequence, kv head), then the split-K
    partials (acc, max, sum per query row per split). Allocated zeroed once by the runtime, shared by all layers
    (they run one after another on a stream); the kernel leaves the counters at 0."""
    pairs = max_batch * num_kv_heads
    return pairs + pairs * MAX_SPLIT_ROWS * (head_dim + 2)


def pick_tactic(new_tokens: int, attrs: Attributes) -> int:
    """The launcher's choice without TensorRT's timing: decode-sized steps split the cache."""
    return 1 if new_tokens * attrs.group <= TACTICS[1].block_m else 0
