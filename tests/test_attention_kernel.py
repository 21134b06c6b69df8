"""The Triton attention kernel under Triton's CPU interpreter, against the reference op (graphs/attention.py).

Tolerances (bench/attention_cases.py TOLERANCE, |err| <= tol * (1 + |ref|), against the reference computed in
fp32 on the same rounded inputs): fp32 1e-5 (only summation order differs); fp16 4e-3 and bf16 2e-2 (the kernel
rounds the probabilities to the compute dtype before the second product, as the reference does, and rounds its
output once: a few units of the dtype's 2^-11 / 2^-8 epsilon). Caches must match the reference bit for bit,
including fp8 rows (the kernel rounds to E4M3 the way torch does). Both tactics run every case: the prefill tiling
(one split) and the decode one (cache split 16 ways, last program combines).
"""

from __future__ import annotations

import random

import pytest

from bench.attention_cases import Case, compare, make_inputs, run_kernel
from gemma3.plugins import attention_launch as launch

W = 8  # a small window keeps interpreter cases fast; the rule does not depend on its size

CASES = [
    # The window boundary: a decode query at position W-1, W, W+1 against a ring of W rows.
    *(Case(f"window-edge-past{p}", (p,), 1, W, window=W) for p in (W - 2, W - 1, W, W + 1)),
    Case("ring-wrap-chunk", (13,), 5, W, window=W),
    Case("chunk-longer-than-window", (6,), 3 * W - 1, W, window=W),
    Case("chunk-longer-than-window-from-empty", (0,), W + 5, W, window=W),
    Case("global-prefill-from-empty", (0,), 20, 32),
    Case("global-prefill-continues", (7,), 9, 32),
    Case("global-decode-full", (31,), 1, 32),
    Case("image-group", (4,), 14, 32, images=((0, 2, 6),)),
    Case("two-images-local", (3,), 16, 16, window=16, images=((0, 1, 4), (0, 8, 5))),
    Case("ragged-decode", (3, 17, 0), 1, 32, heads=4, kv_heads=2),
    Case("ragged-decode-local", (3, 17, 8), 1, W, window=W, heads=2, kv_heads=2),
    Case("ragged-prefill-images", (0, 5), 6, 16, images=((1, 1, 3),)),
    *(Case(f"gqa-{g}", (10,), 3, 16, heads=g * 2, kv_heads=2) for g in (1, 2, 3, 4)),
    Case("head-dim-256", (9,), 2, 16, head_dim=256),
    Case("head-dim-128-local", (11,), 2, W, window=W, head_dim=128, heads=4, kv_heads=2),
    Case("bf16-local", (12,), 4, W, window=W, dtype="bfloat16"),
    Case("bf16-256-gqa4", (5,), 1, 16, head_dim=256, heads=4, dtype="bfloat16"),
    Case("fp16-global", (9,), 3, 16, dtype="float16"),
    Case("fp8-local-bf16", (10,), 3, W, window=W, dtype="bfloat16", fp8=True),
    Case("fp8-global-prefill", (4,), 12, 32, fp8=True),
    Case("fp8-ragged-decode", (2, 9), 1, 16, fp8=True, heads=4, kv_heads=2),
]


def _random_cases(count: int, seed: int = 1234) -> list[Case]:
    """Randomised steps: shapes, positions, window or not, images, dtype; reproducible from the seed."""
    rng = random.Random(seed)
    cases = []
    for n in range(count):
        window = rng.choice((0, 4, 8))
        capacity = window or rng.choice((16, 24))
        batch = rng.randint(1, 3)
        new = rng.choice((1, 1, 2, 5, 11))
        top = 40 if window else capacity - new
        past = tuple(rng.randint(0, top) for _ in range(batch))
        kv = rng.choice((1, 2))
        images = ()
        if new >= 5 and rng.random() < 0.5:
            first = rng.randint(0, new - 3)
            images = ((rng.randrange(batch), first, rng.randint(2, min(new - first, window or new))),)
        cases.append(Case(f"random-{n}", past, new, capacity, window=window, heads=kv * rng.randint(1, 4),
                          kv_heads=kv, head_dim=rng.choice((64, 128)), dtype=rng.choice(("float32", "bfloat16")),
                          fp8=rng.random() < 0.25, images=images, seed=n))
    return cases


@pytest.mark.parametrize("tactic", range(len(launch.TACTICS)))
@pytest.mark.parametrize("case", CASES + _random_cases(12), ids=lambda c: c.name)
def test_kernel_matches_reference(case: Case, tactic: int):
    inputs = make_inputs(case)
    result = compare(case, inputs, run_kernel(case, inputs, tactic=tactic))
    assert result["cache_mismatches"] == 0, result
    assert result["out_excess"] <= 0, result


def test_a_wrong_window_is_caught():
    """The comparison can fail: the reference with window W against a kernel run with window W + 1."""
    case = Case("edge", (W + 1,), 1, W, window=W)
    inputs = make_inputs(case)
    wider = Case("edge-wider", (W + 1,), 1, W + 1, window=W + 1)
    wider_inputs = dict(inputs, k_cache=inputs["k_cache"][:, :, [*range(W), 0]],
                        v_cache=inputs["v_cache"][:, :, [*range(W), 0]])
    out = run_kernel(wider, wider_inputs)[0]
    result = compare(case, inputs, (out, inputs["k_cache"], inputs["v_cache"]))
    assert result["out_excess"] > 0


def test_unsupported_shapes_are_refused_in_one_line():
    attrs = launch.Attributes(num_heads=10, num_kv_heads=2, head_dim=64, scale=0.125, window=0)
    with pytest.raises(ValueError, match="GQA ratio 5"):
        launch.check(attrs, "bfloat16", "bfloat16")
    attrs = launch.Attributes(num_heads=2, num_kv_heads=1, head_dim=72, scale=0.125, window=0)
    with pytest.raises(ValueError, match="head_dim 72"):
        launch.check(attrs, "bfloat16", "bfloat16")
