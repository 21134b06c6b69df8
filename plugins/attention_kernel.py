"""The Triton kernel of `gemma3::HybridAttention`: one launch per layer per step, prefill chunks and decode alike.

Contract: `attention_schema.py`. Launch parameters (grid, constexprs, scalars, workspace): `attention_launch.py`.
The same source runs compiled (AOT PTX for TensorRT, the GPU check) or, with TRITON_INTERPRET=1 set before
triton is imported, under Triton's CPU interpreter (the tests). The interpreter patches `triton.language` for the
whole process, so compiling happens in a process of its own (`attention_aot.py`).

ABI (TensorRT's AOT plugin, facts file 1.2): input pointers, then int32 scalars derived from shapes, then output
pointers; attributes and dtypes are compile-time constants. Triton appends two hidden scratch pointers after
those (global / profile scratch); the compiled kernel must not need them (`attention_aot.py` checks).

Work split. Program (t, bk, z) takes query tile t of sequence b's kv head k (the GROUP query heads reading that
kv head, all S new tokens, flattened as row = token * GROUP + head), and key split z of the cached rows. Decode
(one query tile) splits the cache over SPLITS programs for parallelism; a step with several query tiles uses one
split. Keys are the valid cached rows of its split, then (last split) the step's own new keys, in an online
softmax with fp32 statistics.

Why a "last program finishes" epilogue (counters in the workspace):
  - split-K partials need a reduction, and an AOT plugin launches exactly one kernel;
  - the cache write must wait until every program of (b, k) has read the old rows: in a ring a chunk's new key
    overwrites the row of position p - W, which earlier queries of the same chunk still read.
So each program publishes its partial result, then takes a ticket with an atomic add on its (b, k) counter; the
one that draws the last ticket combines the partials, writes the new rows into the (aliased) caches and resets
the counter to 0. No program waits on another, so it is correct whatever the scheduling order.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Running-max start: finite, so a split whose keys are all masked gives exp(-inf - NEG_BIG) = 0, not NaN.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _online_softmax_step(q, keys, vals, visible, m_i, l_i, acc, SCALE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Fold one tile of keys into the running max / sum / accumulator (fp32). Probabilities are rounded to the
    value dtype before the second product, as the reference rounds its softmax to the compute dtype.
    UPCAST_DOT multiplies in fp32 ("ieee"): fp32 inputs, and Triton 3.5's interpreter, whose bf16 / fp16 dot is
    wrong; products of 16-bit floats are exact in fp32, so only the accumulation order differs from tensor cores."""
    if UPCAST_DOT:
        scores = tl.dot(q.to(tl.float32), tl.trans(keys.to(tl.float32)), input_precision="ieee") * SCALE
    else:
        scores = tl.dot(q, tl.trans(keys)) * SCALE
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    p = tl.exp(scores - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    p_rounded = p.to(vals.dtype)
    if UPCAST_DOT:
        pv = tl.dot(p_rounded.to(tl.float32), vals.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p_rounded, vals)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + pv


@triton.jit
def _partial(ws_ptr, n_bk, bk, split, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Where split `split` of (b, k) keeps its partial: after the n_bk counters, BLOCK_M * (HEAD_DIM + 2) floats."""
    return ws_ptr + n_bk + ((bk * SPLITS + split) * BLOCK_M).to(tl.int64) * (HEAD_DIM + 2)


@triton.jit
def hybrid_attention_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, past_len_ptr, group_ids_ptr, ws_ptr,  # inputs
    S, C,  # int32 scalars from shapes: new tokens per sequence, cache rows (capacity or window)
    out_ptr, k_out_ptr, v_out_ptr,  # outputs (the caches alias their inputs)
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr,
    SCALE: tl.constexpr, K_SCALE: tl.constexpr, V_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    tile = tl.program_id(0)
    bk = tl.program_id(1)
    split = tl.program_id(2)
    n_bk = tl.num_programs(1)
    b = bk // KV_HEADS
    kvh = bk % KV_HEADS
    n_tiles = tl.cdiv(S * GROUP, BLOCK_M)
    n_split = tl.where(n_tiles == 1, SPLITS, 1)
    if split < n_split:
        past = tl.load(past_len_ptr + b)
        heads = KV_HEADS * GROUP
        d = tl.arange(0, HEAD_DIM)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this tile
        row_ok = rows < S * GROUP
        tok = rows // GROUP
        head = kvh * GROUP + rows % GROUP
        q_pos = past + tok
        q_group = tl.load(group_ids_ptr + b * S + tok, mask=row_ok, other=-1)
        q_off = ((b * S + tok) * heads + head)[:, None] * HEAD_DIM + d[None, :]
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)

        m_i = tl.full((BLOCK_M,), NEG_BIG, tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)

        # Cached rows: [0, min(past, C)) are valid (global: row = position; ring: the newest p < past at p % W).
        # Splits share the valid rows of this sequence (not the capacity), so a short context still spreads.
        valid = tl.minimum(past, C)
        per_split = tl.cdiv(tl.cdiv(valid, n_split), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, valid)
        cache_base = bk.to(tl.int64) * C * HEAD_DIM
        for start in range(lo, hi, BLOCK_N):
            r = start + tl.arange(0, BLOCK_N)
            r_ok = r < hi
            kv_off = cache_base + r[:, None] * HEAD_DIM + d[None, :]
            keys = tl.load(k_cache_ptr + kv_off, mask=r_ok[:, None], other=0.0)
            vals = tl.load(v_cache_ptr + kv_off, mask=r_ok[:, None], other=0.0)
            if K_SCALE > 0:  # fp8 rows read back as fp8 * scale, in the compute dtype (as the reference)
                keys = (keys.to(tl.float32) * K_SCALE).to(q.dtype)
                vals = (vals.to(tl.float32) * V_SCALE).to(q.dtype)
            if WINDOW > 0:
                k_pos = past - 1 - (past - 1 - r) % WINDOW
            else:
                k_pos = r
            visible = r_ok[None, :] & row_ok[:, None]  # cached keys precede every new query: causal holds
            if WINDOW > 0:
                visible = visible & (q_pos[:, None] - k_pos[None, :] < WINDOW)
            m_i, l_i, acc = _online_softmax_step(q, keys, vals, visible, m_i, l_i, acc, SCALE, UPCAST_DOT)

        # The step's own keys (as computed, not re-read from the cache), in the last split.
        if split == n_split - 1:
            for start in range(0, S, BLOCK_N):
                j = start + tl.arange(0, BLOCK_N)
                j_ok = j < S
                new_off = ((b * S + j) * KV_HEADS + kvh)[:, None] * HEAD_DIM + d[None, :]
                keys = tl.load(k_ptr + new_off, mask=j_ok[:, None], other=0.0)
                vals = tl.load(v_ptr + new_off, mask=j_ok[:, None], other=0.0)
                k_group = tl.load(group_ids_ptr + b * S + j, mask=j_ok, other=-1)
                causal = j[None, :] <= tok[:, None]
                same_image = (q_group[:, None] == k_group[None, :]) & (q_group[:, None] >= 0)
                visible = (causal | same_image) & j_ok[None, :] & row_ok[:, None]
                if WINDOW > 0:
                    visible = visible & (tok[:, None] - j[None, :] < WINDOW)
                m_i, l_i, acc = _online_softmax_step(q, keys, vals, visible, m_i, l_i, acc, SCALE, UPCAST_DOT)

        out_off = ((b * S + tok) * heads + head)[:, None] * HEAD_DIM + d[None, :]
        if n_split == 1:
            l_i = tl.where(l_i > 0, l_i, 1.0)  # padding rows of the tile see no key
            tl.store(out_ptr + out_off, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:  # publish the partial: acc [BLOCK_M, D], then the running max and sum, at (bk, split)
            part = _partial(ws_ptr, n_bk, bk, split, SPLITS, BLOCK_M, HEAD_DIM)
            m_rows = tl.arange(0, BLOCK_M)
            tl.store(part + m_rows[:, None] * HEAD_DIM + d[None, :], acc)
            tl.store(part + BLOCK_M * HEAD_DIM + m_rows, m_i)
            tl.store(part + BLOCK_M * (HEAD_DIM + 1) + m_rows, l_i)

        tl.debug_barrier()  # every thread's stores (and reads of old rows) precede the ticket
        ticket = tl.atomic_add(ws_ptr + bk, 1.0, sem="acq_rel")
        if ticket == n_tiles * n_split - 1:  # the last program of (b, k): finish the step
            if n_split > 1:
                m_rows = tl.arange(0, BLOCK_M)
                m_all = tl.full((BLOCK_M,), NEG_BIG, tl.float32)
                for z in range(0, n_split):  # .cg: read other programs' stores from L2, not a stale L1
                    part = _partial(ws_ptr, n_bk, bk, z, SPLITS, BLOCK_M, HEAD_DIM)
                    m_all = tl.maximum(m_all, tl.load(part + BLOCK_M * HEAD_DIM + m_rows, cache_modifier=".cg"))
                total = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
                norm = tl.zeros((BLOCK_M,), tl.float32)
                for z in range(0, n_split):
                    part = _partial(ws_ptr, n_bk, bk, z, SPLITS, BLOCK_M, HEAD_DIM)
                    weight = tl.exp(tl.load(part + BLOCK_M * HEAD_DIM + m_rows, cache_modifier=".cg") - m_all)
                    norm += weight * tl.load(part + BLOCK_M * (HEAD_DIM + 1) + m_rows, cache_modifier=".cg")
                    acc_z = tl.load(part + m_rows[:, None] * HEAD_DIM + d[None, :], cache_modifier=".cg")
                    total += weight[:, None] * acc_z
                norm = tl.where(norm > 0, norm, 1.0)
                tl.store(out_ptr + out_off, (total / norm[:, None]).to(out_ptr.dtype.element_ty),
                         mask=row_ok[:, None])
            # Write the new rows: a ring keeps only the newest W tokens (distinct rows), a global cache all S.
            first = 0
            if WINDOW > 0:
                first = tl.maximum(S - WINDOW, 0)
            for start in range(first, S, BLOCK_N):
                j = start + tl.arange(0, BLOCK_N)
                j_ok = j < S
                pos = past + j
                row = pos
                if WINDOW > 0:
                    row = pos % WINDOW
                j_ok = j_ok & (row < C)
                new_off = ((b * S + j) * KV_HEADS + kvh)[:, None] * HEAD_DIM + d[None, :]
                dst = cache_base + row[:, None] * HEAD_DIM + d[None, :]
                for which in tl.static_range(2):
                    if which == 0:
                        x = tl.load(k_ptr + new_off, mask=j_ok[:, None], other=0.0)
                        scale = K_SCALE
                        dst_ptr = k_out_ptr
                    else:
                        x = tl.load(v_ptr + new_off, mask=j_ok[:, None], other=0.0)
                        scale = V_SCALE
                        dst_ptr = v_out_ptr
                    if K_SCALE > 0:
                        # saturate(x / scale) rounded to E4M3 (nearest, ties to even) in fp32 first: the value then
                        # casts to fp8 exactly on every path (Triton's interpreter rounds carries wrongly, 3.5.0).
                        y = tl.minimum(tl.maximum(x.to(tl.float32) / scale, -448.0), 448.0)
                        expo = (y.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent of |y|
                        step_expo = tl.maximum(expo - 3, 127 - 9)  # 3 mantissa bits; subnormal step 2^-9
                        step = (step_expo << 23).to(tl.float32, bitcast=True)
                        y = ((y / step + 12582912.0) - 12582912.0) * step  # 1.5 * 2^23: round half to even
                        tl.store(dst_ptr + dst, y.to(dst_ptr.dtype.element_ty), mask=j_ok[:, None])
                    else:
                        tl.store(dst_ptr + dst, x, mask=j_ok[:, None])
            tl.store(ws_ptr + bk, 0.0)  # every ticket is drawn: ready for the next layer / step
