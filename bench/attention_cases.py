"""Attention kernel cases, shared by the CPU tests (Triton's interpreter) and the GPU check (`bench/gpu.py`).

A case is one HybridAttention step: shapes, attributes, per-sequence past lengths, image spans among the new
tokens. `make_inputs` draws its tensors; `run_kernel` launches the Triton kernel on them through torch (on CPU
under the interpreter, or on a GPU); `run_reference` runs the reference op (`gemma3.graphs.attention`).
The caches are passed to the kernel as input and output at once: in place, as TensorRT aliases them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gemma3.graphs.attention import hybrid_attention_reference
from gemma3.plugins import attention_launch as launch


def _interpreter_scalars_as_ints() -> None:
    """Triton 3.5's interpreter keeps scalars as 1-element arrays and turns them into loop bounds with int(),
    which numpy >= 2.4 refuses for arrays of ndim > 0; read the one element instead."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_gemma3_scalar_fix", False):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor):
        patch_tensor(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])

    interpreter._patch_lang_tensor = patched
    interpreter._gemma3_scalar_fix = True


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    name: str
    past_lens: tuple[int, ...]  # one per sequence: B = len(past_lens)
    new_tokens: int
    capacity: int  # cache rows: the context (global) or the window (local)
    window: int = 0
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 64
    dtype: str = "float32"
    fp8: bool = False
    images: tuple[tuple[int, int, int], ...] = field(default=())  # (sequence, first new token, length)
    seed: int = 0

    def __post_init__(self):
        if self.window and self.capacity != self.window:
            raise ValueError(f"{self.name}: a local layer's ring has exactly `window` rows")

    @property
    def attrs(self) -> launch.Attributes:
        scale = 0.4 if self.fp8 else 0.0  # fp8 caches: values up to ~4 sigma use most of E4M3's range
        return launch.Attributes(self.heads, self.kv_heads, self.head_dim, self.head_dim ** -0.5, self.window,
                                 scale, scale)


def make_inputs(case: Case, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(case.seed)
    dtype = TORCH_DTYPES[case.dtype]
    batch, s, d = len(case.past_lens), case.new_tokens, case.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    cache_shape = (batch, case.kv_heads, case.capacity, d)
    if case.fp8:
        k_cache = (torch.randn(*cache_shape, generator=g) * 3).to(torch.float8_e4m3fn)
        v_cache = (torch.randn(*cache_shape, generator=g) * 3).to(torch.float8_e4m3fn)
    else:
        k_cache, v_cache = randn(*cache_shape), randn(*cache_shape)
    group_ids = torch.full((batch, s), -1, dtype=torch.int32)
    for image, (seq, first, length) in enumerate(case.images):
        group_ids[seq, first:first + length] = image
    tensors = {
        "q": randn(batch, s, case.heads * d), "k": randn(batch, s, case.kv_heads * d),
        "v": randn(batch, s, case.kv_heads * d), "k_cache": k_cache, "v_cache": v_cache,
        "past_len": torch.tensor(case.past_lens, dtype=torch.int32), "group_ids": group_ids,
    }
    return {name: t.to(device) for name, t in tensors.items()}


def run_reference(case: Case, inputs: dict[str, torch.Tensor], upcast: bool = False):
    """The reference op on CPU; `upcast` computes attention in fp32 on the same (rounded) inputs."""
    t = {n: x.cpu() for n, x in inputs.items()}
    if upcast:
        t.update(q=t["q"].float(), k=t["k"].float(), v=t["v"].float())
        if not case.fp8:
            t.update(k_cache=t["k_cache"].float(), v_cache=t["v_cache"].float())
    a = case.attrs
    return hybrid_attention_reference(t["q"], t["k"], t["v"], t["k_cache"], t["v_cache"], t["past_len"],
                                      t["group_ids"], a.num_heads, a.num_kv_heads, a.head_dim, a.scale, a.window,
                                      a.k_scale, a.v_scale)


def run_kernel(case: Case, inputs: dict[str, torch.Tensor], tactic: int | None = None):
    """Launch the Triton kernel with the shared launch functions; returns (out, k_cache, v_cache).
    On CPU tensors this needs TRITON_INTERPRET=1 in the environment before triton is first imported."""
    from gemma3.plugins.attention_kernel import hybrid_attention_kernel

    if inputs["q"].device.type == "cpu":
        _interpreter_scalars_as_ints()

    a = case.attrs
    launch.check(a, case.dtype, "float8e4m3fn" if case.fp8 else case.dtype)
    chosen = launch.TACTICS[launch.pick_tactic(case.new_tokens, a) if tactic is None else tactic]
    batch = len(case.past_lens)
    device = inputs["q"].device
    k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()  # in place, as TensorRT aliases
    out = torch.empty_like(inputs["q"])
    ws = torch.zeros(launch.workspace_elements(batch, a.num_kv_heads, a.head_dim), dtype=torch.float32,
                     device=device)
    grid = launch.grid(case.new_tokens, batch, a, chosen)
    hybrid_attention_kernel[grid](
        inputs["q"], inputs["k"], inputs["v"], k_cache, v_cache, inputs["past_len"], inputs["group_ids"], ws,
        *launch.scalar_args(case.new_tokens, case.capacity),
        out, k_cache, v_cache,
        **launch.constexprs(a, case.dtype, chosen), num_warps=chosen.num_warps, num_stages=chosen.num_stages)
    if bool((ws[: batch * a.num_kv_heads] != 0).any()):
        raise AssertionError("the kernel left a ticket counter non-zero")
    return out, k_cache, v_cache


TOLERANCE = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 2e-2}  # abs = rel; see tests/test_attention_kernel.py


def compare(case: Case, inputs: dict[str, torch.Tensor], got) -> dict[str, float]:
    """Max errors against the reference: output vs the fp32 reference (tolerance by dtype), caches exactly."""
    ref_out = run_reference(case, inputs, upcast=True)[0]
    _, ref_k, ref_v = run_reference(case, inputs)
    out, k_cache, v_cache = (x.cpu() for x in got)
    err = (out.float() - ref_out).abs()
    bound = TOLERANCE[case.dtype] * (1 + ref_out.abs())
    return {
        "out_excess": float((err - bound).max()),  # <= 0 passes
        "out_max_err": float(err.max()),
        "cache_mismatches": int((k_cache.view(torch.uint8) != ref_k.view(torch.uint8)).sum()
                                + (v_cache.view(torch.uint8) != ref_v.view(torch.uint8)).sum()),
    }
