"""Flash attention: ``softmax(q @ k^T * scale + mask) @ v`` without ever storing the [Tq, Tk] scores (optionally
soft-capped: ``softmax(c * tanh(q @ k^T * scale / c) + mask) @ v``).

Layout is that of ``torch.nn.functional.scaled_dot_product_attention``: q [B, H, Tq, D], k and v
[B, H_kv, Tk, D], any strides (views of a fused qkv projection are read in place, without copies).
Grouped-query attention (H_kv < H, H_kv dividing H): query head h reads key/value head h // (H / H_kv)
in the kernels themselves (no repeat_interleave copy), and dK/dV sum over each group's query heads.

Forward (FA2): one program per (batch*head, block of BLOCK_M query rows) streams the key blocks with an
online softmax; the output is normalised once at the end and only the per-row log-sum-exp is saved.
Through Triton's interpreter (CPU), which pays per program rather than per element, short sequences are
packed instead: one program takes the whole sequences of several (batch, head) pairs side by side in one
tile, masked so that a pair's queries see only its own keys (``_tile_rows``).
Backward recomputes the probabilities from that log-sum-exp: one kernel per query block accumulates dQ
over the key blocks and writes ``delta = rowsum(dO * O)`` for its rows on the way, then one kernel per key
block accumulates dK/dV over the query blocks. Neither needs atomics, so every launch is a pure write
(which also keeps ``triton.autotune`` safe to re-run them).

Semantics:
* ``is_causal`` is aligned bottom-right when Tq != Tk: query i sees keys j <= i + Tk - Tq (the KV-cache
  convention); with Tq > Tk the first Tq - Tk query rows see nothing.
* ``softcap`` > 0 (logit soft-capping, Gemma-2's ``attn_logit_softcapping``): the scaled scores become
  ``softcap * tanh(scores / softcap)`` before any mask is applied, in transformers' eager Gemma-2 order. A
  compile-time switch (HAS_SOFTCAP) of every kernel: the kernels keep scores in log2 units (exp2), so with it
  they scale by scale / softcap, take the tanh of the natural-scale score and multiply by softcap * log2(e);
  the backward kernels recompute tanh and multiply dS by its derivative 1 - tanh^2. Without it (0, the
  default) the code is the plain path's.
* ``window`` (with ``is_causal`` only): a sliding window, query i attends keys ``a - window < j <= a`` with
  ``a = i + Tk - Tq`` its causally aligned position (transformers' ``sliding_window``: ``kv_idx > q_idx -
  sliding_window``). A compile-time switch (HAS_WINDOW) with the size a runtime int: the forward and dQ kernels
  start their key loop at the first block the window reaches (blocks crossing its far edge masked, the rest of
  the loop as without it), the dK/dV kernel ends its query loop at the last block that still sees its keys.
* ``attn_mask`` broadcastable to [B, H, Tq, Tk]: float is added to the scaled (and soft-capped) scores, bool
  means True = attend (as in SDPA). ``key_padding_mask`` [B, Tk] bool: True = padding, ignored. Masks get no gradient.
* A query row with no key left to attend to outputs 0 and gets zero gradients (SDPA gives NaN there).
* Dropout on the probabilities: element (b, h, i, j) is kept exactly when ``triformer.dropout`` with the
  same seed keeps element ``((b*H + h)*Tq + i)*Tk + j`` of a flat tensor (its counter-based Philox stream,
  see there), and kept probabilities are scaled by 1 / (1 - p); the backward regenerates the same bits.
  ``attention_dropout_mask`` materialises that mask for small shapes; ``attention_reference`` reproduces
  it from the seed, or applies a given ``dropout_mask``.
* Head dims that are not a power of two (40, 80, 96, ...) run in a tile padded to the next power of two.
* fp32 inputs compute their dots in IEEE fp32 unless ``torch.set_float32_matmul_precision`` allows TF32.
* Outputs and gradients are [B, H, T, D] views of [B, T, H, D] memory, so the usual
  ``out.transpose(1, 2).reshape(B, T, H * D)`` costs no copy.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from triformer import _runtime  # noqa: F401  (decides compile vs interpreter before kernels are defined)
from triformer._double_backward import needs_graph, reference_grads
from triformer._runtime import INTERPRET, check_device, check_float
from triformer._shared import dropout_keep, dropout_keep_reference, philox, seed_tensor, uniform

__all__ = ["AttentionFunction", "Attention", "attention", "attention_reference", "attention_dropout_mask",
           "PackedAttentionFunction", "attention_packed", "attention_packed_reference", "split_qkv"]

LOG2E = tl.constexpr(1.4426950408889634)  # the kernels use exp2: scores are kept in log2 units
MAX_HEAD_DIM = 256  # FlashAttention-2's limit too; at 256 dK/dV already fits only 32 keys a block (configs below)


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _dropout_tile(seed, dropout_p, rng_base, Tk, offs_m, start_n, BLOCK_N: tl.constexpr, QUADS: tl.constexpr,
                  SEQ_N: tl.constexpr):
    """Keep mask [len(offs_m), BLOCK_N] of query rows offs_m and keys start_n + arange(BLOCK_N): element
    (i, j) is element rng_base + i*Tk + j of triformer.dropout's stream. That stream takes the 4 words of
    one Philox call for 4 consecutive indices; with Tk % 4 == 0 (QUADS) a quad never straddles two rows,
    so one call serves 4 keys here too, a quarter of the RNG work (which dominates attention with dropout).
    In a packed tile (SEQ_N, see _tile_rows) the key index restarts at every SEQ_N columns, and rng_base
    is per row."""
    row = rng_base + offs_m.to(tl.int64) * Tk
    if QUADS:
        row_quad = (row // 4)[:, None]
        quads = start_n // 4 + tl.arange(0, BLOCK_N // 4)
        if SEQ_N:
            quads = quads % (SEQ_N // 4)
        quad = row_quad + quads[None, :]
        r0, r1, r2, r3 = philox(seed, quad)
        u = tl.join(tl.join(uniform(r0, r1, r2, r3, 0), uniform(r0, r1, r2, r3, 2)),
                    tl.join(uniform(r0, r1, r2, r3, 1), uniform(r0, r1, r2, r3, 3)))  # [.., a, b] = word 2a+b
        keep = tl.reshape(u, [offs_m.shape[0], BLOCK_N]) >= dropout_p
    else:
        row_start = row[:, None]
        cols = start_n + tl.arange(0, BLOCK_N)
        if SEQ_N:
            cols = cols % SEQ_N
        keep = dropout_keep(seed, row_start + cols[None, :], dropout_p)
    return keep


@triton.jit
def _program_block(n_blocks, REVERSE: tl.constexpr):
    """Split the 1-D program id into (sequence block, batch*head). Consecutive programs share a head, so
    the operand they all stream (its K/V or Q/dO) stays in L2; REVERSE starts the costliest causal
    query blocks first, which shortens the tail of the launch."""
    pid = tl.program_id(0)
    blk = pid % n_blocks
    if REVERSE:
        blk = n_blocks - 1 - blk
    return blk, pid // n_blocks


@triton.jit
def _packed_pairs(BLOCK: tl.constexpr, SEQ: tl.constexpr):
    """batch*head of each row of a packed tile: BLOCK // SEQ consecutive pairs, SEQ rows each."""
    return tl.program_id(0) * (BLOCK // SEQ) + tl.arange(0, BLOCK) // SEQ


@triton.jit
def _batch_head(bh, H, PACKED: tl.constexpr):
    """(batch, head) of the pair index bh, in int64; columns [BLOCK, 1] when the pairs are packed per row."""
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if PACKED:
        b = b[:, None]
        h = h[:, None]
    return b, h


@triton.jit
def _block_rows(T, n_pairs, BLOCK: tl.constexpr, SEQ: tl.constexpr):
    """Sequence rows of a tile relative to its block's start: arange(BLOCK), or in a packed tile each pair's
    0..SEQ-1, with the rows of pairs past the last one moved to T, where every load and store masks them."""
    if SEQ == 0:
        rows = tl.arange(0, BLOCK)
    else:
        rows = tl.where(_packed_pairs(BLOCK, SEQ) < n_pairs, tl.arange(0, BLOCK) % SEQ, T)
    return rows


@triton.jit
def _tile_rows(T, n_pairs, H, BLOCK: tl.constexpr, SEQ: tl.constexpr, REVERSE: tl.constexpr):
    """This program's tile along a sequence axis of length T: (first row, rows [BLOCK], batch*head, batch,
    head).

    SEQ == 0 (GPU): one block of one (batch, head) pair per program, as _program_block splits it; the pair
    is a scalar. SEQ > 0 (the interpreter, which pays per program and per operation, not per element):
    the whole sequences, padded to SEQ >= T rows, of BLOCK // SEQ consecutive pairs side by side in one
    tile (see _block_rows); the pair is then per row."""
    if SEQ == 0:
        blk, bh = _program_block(tl.cdiv(T, BLOCK), REVERSE)
        b, h = _batch_head(bh, H, False)
        start = blk * BLOCK
        rows = start + _block_rows(T, n_pairs, BLOCK, SEQ)
    else:
        bh = _packed_pairs(BLOCK, SEQ)
        b, h = _batch_head(bh, H, True)
        start = 0
        rows = _block_rows(T, n_pairs, BLOCK, SEQ)
    return start, rows, bh, b, h


@triton.jit
def _partner_pairs(H, bh, b, h, BLOCK: tl.constexpr, SEQ: tl.constexpr):
    """(batch*head, batch, head) of the operand a program streams (keys for a query tile, queries for a key
    tile, BLOCK rows at a time): the program's own pair on a GPU, the packed pairs' rows along that axis."""
    if SEQ == 0:
        bh_o = bh
        b_o = b
        h_o = h
    else:
        bh_o = _packed_pairs(BLOCK, SEQ)
        b_o, h_o = _batch_head(bh_o, H, True)
    return bh_o, b_o, h_o


@triton.jit
def _own_pair(j, row_pair, col_pair, Tk, PACKED: tl.constexpr):
    """Key index tile j, moved out of range (to Tk, so masked) where a packed tile's row and column belong
    to different (batch, head) pairs."""
    if PACKED:
        j = tl.where(row_pair[:, None] == col_pair[None, :], j, Tk)
    return j


@triton.jit
def _key_range(m0, Tq, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, PACKED: tl.constexpr):
    """Key range of query rows [m0, m0 + BLOCK_M): blocks in [n_mid, n_full) need no mask at all, those in
    [n_full, n_end) cross the causal diagonal or the ragged end of the keys, and with a sliding window those in
    [n_lo, n_mid) cross its far edge (masked too); blocks before n_lo lie wholly outside every row's window and
    are never loaded. Without a window n_lo = n_mid = 0. A packed tile holds all the keys of its pairs in one
    block, masked, which is also what keeps the pairs apart."""
    n_lo = 0
    n_mid = 0
    if PACKED:
        n_end = Tk
        n_full = 0
    elif IS_CAUSAL:
        off = Tk - Tq
        n_end = tl.minimum(Tk, m0 + BLOCK_M + off)
        n_full = tl.minimum(tl.maximum(m0 + off + 1, 0), Tk) // BLOCK_N * BLOCK_N
        if HAS_WINDOW:
            # row i (aligned to i + off) sees keys j > i + off - window: the first row reaches furthest back,
            # the last row's edge bounds the blocks every row sees whole
            n_lo = tl.maximum(m0 + off - window + 1, 0) // BLOCK_N * BLOCK_N
            n_mid = tl.cdiv(tl.maximum(m0 + BLOCK_M + off - window, 0), BLOCK_N) * BLOCK_N
            n_mid = tl.minimum(tl.maximum(n_mid, n_lo), n_full)
    else:
        n_end = Tk
        n_full = Tk // BLOCK_N * BLOCK_N
    return n_lo, n_mid, n_full, n_end


@triton.jit
def _query_range(n0, Tq, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, PACKED: tl.constexpr):
    """Query range that sees keys [n0, n0 + BLOCK_N): blocks in [m_lo, m_full) cross the causal diagonal,
    [m_full, m_mid) need no mask, [m_mid, m_end) is the ragged last query block (a packed tile's only one) and,
    with a sliding window, the blocks crossing its far edge; queries from m_end on see none of these keys
    (m_end = Tq without a window)."""
    m_end = Tq
    if PACKED:
        m_lo = 0
        m_full = 0
        m_mid = 0
    else:
        if IS_CAUSAL:
            off = Tk - Tq
            m_lo = tl.maximum(n0 - off, 0) // BLOCK_M * BLOCK_M
            m_full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M
            m_full = tl.minimum(m_full, tl.cdiv(Tq, BLOCK_M) * BLOCK_M)
        else:
            m_lo = 0
            m_full = 0
        m_mid = tl.maximum(m_full, Tq // BLOCK_M * BLOCK_M)
        if HAS_WINDOW:
            # query i (aligned to i + off) sees key j while i + off - window < j: every key of the block while
            # i <= n0 + window - 1 - off, the block's last key until i = n0 + BLOCK_N + window - 2 - off
            m_win = tl.maximum(n0 + window - off, 0) // BLOCK_M * BLOCK_M
            m_mid = tl.maximum(m_full, tl.minimum(m_mid, m_win))
            m_end = tl.minimum(Tq, tl.maximum(n0 + BLOCK_N + window - 1 - off, 0))
    return m_lo, m_full, m_mid, m_end


@triton.jit
def _load_rows(base, rows, stride, n_rows, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A [len(rows), BLOCK_D] tile; ``base`` already points at the (batch, head) and holds the column
    offsets. Unmasked loads where the caller knows the rows are in range keep the hot loop lean."""
    ptrs = base + rows[:, None].to(tl.int64) * stride
    if CHECK_ROWS:
        tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & d_ok[None, :], other=0.0)
    elif EVEN_D:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return tile


@triton.jit
def _store_rows(base, rows, stride, n_rows, d_ok, tile):
    ptrs = base + rows[:, None].to(tl.int64) * stride
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & d_ok[None, :])


@triton.jit
def _tanh(x):
    """tanh in fp32 to within a few units in the last place, from exp2 alone (the interpreter runs no libdevice
    function): Cephes' tanhf, an odd polynomial where |x| <= 0.625 (there (1 - e) / (1 + e), e = exp(-2|x|),
    would lose the small values' relative accuracy to cancellation), that formula above (e underflows to 0
    for large |x|, giving 1; exp(+2|x|) would overflow instead)."""
    a = tl.abs(x)
    e = tl.math.exp2(a * -2.8853900817779268)  # exp(-2|x|): -2 * log2(e)
    big = (1.0 - e) / (1.0 + e)
    z = tl.minimum(a, 0.625)  # the polynomial only where it is used: no overflow in the discarded lane
    z2 = z * z
    small = ((((-5.70498872745e-3 * z2 + 2.06390887954e-2) * z2 - 5.37397155531e-2) * z2 + 1.33314422036e-1) * z2
             - 3.33332819422e-1) * z2 * z + z
    t = tl.where(a > 0.625, big, small)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _log2_scores(qk, i, j, Tq, Tk, qk_scale, softcap, window, mask_base, smm, smn, kpm_base, spn,
                 MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                 HAS_KPM: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Scaled, masked scores in log2 units for query rows i and key columns j (broadcastable index tiles,
    so the dK/dV kernel can work on the transposed tile). Masked entries become -inf.

    HAS_SOFTCAP: the natural-scale scores are soft-capped before any mask, cap * tanh(qk * scale / cap) (Gemma-2's
    order); the launchers then pass qk_scale = scale / cap and softcap = cap * log2(e), so the log2 units come in
    after the tanh. Also returns d(capped score) / d(qk * scale) = 1 - tanh^2, which the backward kernels multiply
    dS by (1 without soft-capping; the forward drops it).

    HAS_WINDOW (always with IS_CAUSAL): the masked blocks also drop keys at or beyond ``window`` before the row's
    aligned position, j <= i + (Tk - Tq) - window."""
    if HAS_SOFTCAP:
        t = _tanh(qk * qk_scale)
        s = t * softcap
        dcap = 1.0 - t * t
    else:
        s = qk * qk_scale
        dcap = 1.0
    if MASK_KIND != 0:
        m = tl.load(mask_base + i.to(tl.int64) * smm + j.to(tl.int64) * smn, mask=(i < Tq) & (j < Tk), other=0)
        if MASK_KIND == 1:
            s += m.to(tl.float32) * LOG2E
        else:
            s = tl.where(m != 0, s, float("-inf"))
    if HAS_KPM:
        pad = tl.load(kpm_base + j.to(tl.int64) * spn, mask=j < Tk, other=0)
        s = tl.where(pad != 0, float("-inf"), s)
    if MASKED:
        ok = j < Tk
        if IS_CAUSAL:
            ok = ok & (j <= i + (Tk - Tq))
        if HAS_WINDOW:
            ok = ok & (j > i + (Tk - Tq) - window)
        s = tl.where(ok, s, float("-inf"))
    return s, dcap


@triton.jit(do_not_specialize=["n_pairs"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, MASK, KPM,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    smb, smh, smm, smn, spb, spn,
    H, n_pairs, Tq, Tk, qk_scale, softcap, SEED, dropout_p, drop_scale, TQ_BUCKET, TK_BUCKET, kv_group, window,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    QUADS: tl.constexpr, DOT_PREC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEQ_M: tl.constexpr, SEQ_N: tl.constexpr,
):
    # fp32 math: Inductor passes Python floats as fp64
    qk_scale, softcap = tl.cast(qk_scale, tl.float32), tl.cast(softcap, tl.float32)
    dropout_p, drop_scale = tl.cast(dropout_p, tl.float32), tl.cast(drop_scale, tl.float32)
    # A [BLOCK_M, BLOCK_D] query tile stays in registers while [BLOCK_N, BLOCK_D] key/value tiles stream
    # past it: first the blocks every row sees whole (no mask work), then the masked ones.
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    PACKED: tl.constexpr = SEQ_M != 0
    N_PHASES: tl.constexpr = 3 if HAS_WINDOW else 2
    m0, offs_m, bh, b, h = _tile_rows(Tq, n_pairs, H, BLOCK_M, SEQ_M, True)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(Q + b * sqb + h * sqh + offs_d[None, :] * sqd, offs_m, sqm, Tq, d_ok, True, EVEN_D)
    bh_n, b_n, h_n = _partner_pairs(H, bh, b, h, BLOCK_N, SEQ_N)
    h_kv = h_n // kv_group  # grouped-query attention: kv_group query heads share one key/value head
    k_base = K + b_n * skb + h_kv * skh + offs_d[None, :] * skd
    v_base = V + b_n * svb + h_kv * svh + offs_d[None, :] * svd
    mask_base = MASK + b * smb + h * smh
    kpm_base = KPM + b * spb
    rng_base = bh.to(tl.int64) * Tq * Tk
    seed = tl.load(SEED) if HAS_DROPOUT else 0  # read on the device: a compiled graph draws it each step

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    n_lo, n_mid, n_full, n_end = _key_range(m0, Tq, Tk, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW, PACKED)
    for phase in tl.static_range(N_PHASES):  # a third phase only with a window: its far edge, masked
        if phase == 0:
            lo = n_mid
            hi = n_full
        elif phase == 1:
            lo = n_full
            hi = n_end
        else:
            lo = n_lo
            hi = n_mid
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + _block_rows(Tk, n_pairs, BLOCK_N, SEQ_N)
            k = _load_rows(k_base, offs_n, skn, Tk, d_ok, phase != 0, EVEN_D)
            s, _ = _log2_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), offs_m[:, None],
                                _own_pair(offs_n[None, :], bh, bh_n, Tk, PACKED),
                                Tq, Tk, qk_scale, softcap, window, mask_base, smm, smn, kpm_base, spn,
                                phase != 0, IS_CAUSAL, MASK_KIND, HAS_KPM, HAS_SOFTCAP, HAS_WINDOW)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with every key so far masked keeps max -inf; shifting by 0 avoids -inf - -inf = NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_DROPOUT:  # the normaliser sums the undropped probabilities; only P @ V sees dropout
                keep = _dropout_tile(seed, dropout_p, rng_base, Tk, offs_m, start_n, BLOCK_N, QUADS, SEQ_N)
                p = tl.where(keep, p * drop_scale, 0.0)
            v = _load_rows(v_base, offs_n, svn, Tk, d_ok, phase != 0, EVEN_D)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
            m_i = m_new

    seen = l_i > 0.0  # rows with nothing to attend to give 0, and lse = +inf makes their P = 0 in backward
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    _store_rows(O + b * sob + h * soh + offs_d[None, :] * sod, offs_m, som, Tq, d_ok, out)
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)


@triton.jit(do_not_specialize=["n_pairs"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DKV, MASK, KPM,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    sgb, sgh, sgn, sgd, dk_offset, dv_offset, smb, smh, smm, smn, spb, spn,
    H, n_pairs, Tq, Tk, qk_scale, softcap, scale, SEED, dropout_p, drop_scale, TQ_BUCKET, TK_BUCKET, kv_group, window,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    QUADS: tl.constexpr, DOT_PREC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEQ_M: tl.constexpr, SEQ_N: tl.constexpr,
):
    # fp32 math: Inductor passes Python floats as fp64
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    dropout_p, drop_scale = tl.cast(dropout_p, tl.float32), tl.cast(drop_scale, tl.float32)
    # A [BLOCK_N, BLOCK_D] key/value tile and its dK/dV accumulators stay in registers while the query
    # blocks that see it stream past. Everything is computed transposed ([keys, queries]) so that
    # dV += P^T dO and dK += dS^T Q need no register transposes. Key rows past Tk compute garbage that
    # is never stored; query rows past Tq load lse = +inf, so their P is 0.
    # With grouped-query attention (kv_group = H / H_kv query heads per key/value head) a program owns keys of
    # one key/value pair (n_pairs = B * H_kv of them) and accumulates dK/dV over the kv_group query heads that
    # read it, one after the other: no atomics, and dK/dV come out [B, H_kv, Tk, D].
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    PACKED: tl.constexpr = SEQ_N != 0
    h_kv_heads = H // kv_group
    n_pairs = n_pairs // kv_group  # the launch passes B * H (query pairs); this kernel's pairs are B * H_kv
    n0, offs_n, bh, b, h = _tile_rows(Tk, n_pairs, h_kv_heads, BLOCK_N, SEQ_N, False)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = _load_rows(K + b * skb + h * skh + offs_d[None, :] * skd, offs_n, skn, Tk, d_ok, True, EVEN_D)
    v = _load_rows(V + b * svb + h * svh + offs_d[None, :] * svd, offs_n, svn, Tk, d_ok, True, EVEN_D)
    bh_m, b_m, h_m = _partner_pairs(h_kv_heads, bh, b, h, BLOCK_M, SEQ_M)
    kpm_base = KPM + b * spb
    seed = tl.load(SEED) if HAS_DROPOUT else 0  # read on the device: a compiled graph draws it each step

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    m_lo, m_full, m_mid, m_end = _query_range(n0, Tq, Tk, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW, PACKED)
    if kv_group == 1:  # a constant on the GPU (Triton specialises arguments equal to 1): no group loop at all
        q_base = Q + b_m * sqb + h_m * sqh + offs_d[None, :] * sqd
        do_base = DO + b_m * sdb + h_m * sdh + offs_d[None, :] * sdd
        lse_base = LSE + bh_m.to(tl.int64) * Tq
        delta_base = DELTA + bh_m.to(tl.int64) * Tq
        mask_base = MASK + b * smb + h * smh
        rng_base = bh_m.to(tl.int64) * Tq * Tk
        for phase in tl.static_range(3):
            if phase == 0:
                lo = m_lo
                hi = m_full
            elif phase == 1:
                lo = m_full
                hi = m_mid
            else:
                lo = m_mid
                hi = m_end
            for start_m in range(lo, hi, BLOCK_M):
                offs_m = start_m + _block_rows(Tq, n_pairs, BLOCK_M, SEQ_M)
                q = _load_rows(q_base, offs_m, sqm, Tq, d_ok, phase != 1, EVEN_D)
                do = _load_rows(do_base, offs_m, sdm, Tq, d_ok, phase != 1, EVEN_D)
                lse = tl.load(lse_base + offs_m, mask=offs_m < Tq, other=float("inf"))
                delta = tl.load(delta_base + offs_m, mask=offs_m < Tq, other=0.0)
                s_t, dcap_t = _log2_scores(tl.dot(k, tl.trans(q), input_precision=DOT_PREC), offs_m[None, :],
                                           _own_pair(offs_n[:, None], bh, bh_m, Tk, PACKED),
                                           Tq, Tk, qk_scale, softcap, window, mask_base, smm, smn, kpm_base, spn,
                                           phase != 1, IS_CAUSAL, MASK_KIND, HAS_KPM, HAS_SOFTCAP, HAS_WINDOW)
                p_t = tl.math.exp2(s_t - lse[None, :])
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                if HAS_DROPOUT:
                    keep = tl.trans(_dropout_tile(seed, dropout_p, rng_base, Tk, offs_m, n0, BLOCK_N, QUADS,
                                                  SEQ_N))
                    dv = tl.dot(tl.where(keep, p_t * drop_scale, 0.0).to(do.dtype), do, dv,
                                input_precision=DOT_PREC)
                    dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
                else:
                    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
                ds_t = p_t * (dp_t - delta[None, :])
                if HAS_SOFTCAP:
                    ds_t = ds_t * dcap_t
                dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    else:
        # grouped: one flat loop per phase over (group member g, query block), the same loop nest as above, so
        # the software pipeliner keeps its shape (a loop over g around the block loops spilled in 12 of 14 sm_90
        # configs, this in 6: benchmarks/results/sm90/attention_sm90_gqa.md). The body is the one above, per g.
        for phase in tl.static_range(3):
            if phase == 0:
                lo = m_lo
                hi = m_full
            elif phase == 1:
                lo = m_full
                hi = m_mid
            else:
                lo = m_mid
                hi = m_end
            n_blocks = tl.cdiv(hi - lo, BLOCK_M)
            for it in range(0, n_blocks * kv_group):
                g = it // n_blocks
                start_m = lo + (it - g * n_blocks) * BLOCK_M
                hq_m = h_m * kv_group + g  # the query head (and batch*head pair) of the rows streaming past
                bhq_m = (bh_m // h_kv_heads) * H + (bh_m % h_kv_heads) * kv_group + g
                offs_m = start_m + _block_rows(Tq, n_pairs, BLOCK_M, SEQ_M)
                q = _load_rows(Q + b_m * sqb + hq_m * sqh + offs_d[None, :] * sqd, offs_m, sqm, Tq, d_ok,
                               phase != 1, EVEN_D)
                do = _load_rows(DO + b_m * sdb + hq_m * sdh + offs_d[None, :] * sdd, offs_m, sdm, Tq, d_ok,
                                phase != 1, EVEN_D)
                lse = tl.load(LSE + bhq_m.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
                delta = tl.load(DELTA + bhq_m.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
                s_t, dcap_t = _log2_scores(tl.dot(k, tl.trans(q), input_precision=DOT_PREC), offs_m[None, :],
                                           _own_pair(offs_n[:, None], bh, bh_m, Tk, PACKED),
                                           Tq, Tk, qk_scale, softcap, window, MASK + b * smb + (h * kv_group + g) * smh,
                                           smm, smn, kpm_base, spn, phase != 1, IS_CAUSAL, MASK_KIND, HAS_KPM,
                                           HAS_SOFTCAP, HAS_WINDOW)
                p_t = tl.math.exp2(s_t - lse[None, :])
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                if HAS_DROPOUT:
                    keep = tl.trans(_dropout_tile(seed, dropout_p, bhq_m.to(tl.int64) * Tq * Tk, Tk, offs_m, n0,
                                                  BLOCK_N, QUADS, SEQ_N))
                    dv = tl.dot(tl.where(keep, p_t * drop_scale, 0.0).to(do.dtype), do, dv,
                                input_precision=DOT_PREC)
                    dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
                else:
                    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
                ds_t = p_t * (dp_t - delta[None, :])
                if HAS_SOFTCAP:
                    ds_t = ds_t * dcap_t
                dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)

    # dK and dV live in one buffer (DKV, at element offsets dk_offset and dv_offset, see _launch_bwd)
    _store_rows(DKV + dk_offset + b * sgb + h * sgh + offs_d[None, :] * sgd, offs_n, sgn, Tk, d_ok, dk * scale)
    _store_rows(DKV + dv_offset + b * sgb + h * sgh + offs_d[None, :] * sgd, offs_n, sgn, Tk, d_ok, dv)


@triton.jit(do_not_specialize=["n_pairs"])
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, MASK, KPM,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, sdb, sdh, sdm, sdd,
    sgb, sgh, sgm, sgd, dq_offset, smb, smh, smm, smn, spb, spn,
    H, n_pairs, Tq, Tk, qk_scale, softcap, scale, SEED, dropout_p, drop_scale, TQ_BUCKET, TK_BUCKET, kv_group, window,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    QUADS: tl.constexpr, DOT_PREC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEQ_M: tl.constexpr, SEQ_N: tl.constexpr,
):
    # fp32 math: Inductor passes Python floats as fp64
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    dropout_p, drop_scale = tl.cast(dropout_p, tl.float32), tl.cast(drop_scale, tl.float32)
    # The forward's blocking: Q, dO and the dQ accumulator stay in registers, key/value tiles stream.
    # Launched before dK/dV: it also writes delta_i = rowsum(dO * O) = sum_j P_ij dP_ij (with dropout too),
    # the softmax-backward shift term both kernels need, from the dO rows it holds anyway.
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    PACKED: tl.constexpr = SEQ_M != 0
    N_PHASES: tl.constexpr = 3 if HAS_WINDOW else 2
    m0, offs_m, bh, b, h = _tile_rows(Tq, n_pairs, H, BLOCK_M, SEQ_M, True)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(Q + b * sqb + h * sqh + offs_d[None, :] * sqd, offs_m, sqm, Tq, d_ok, True, EVEN_D)
    do = _load_rows(DO + b * sdb + h * sdh + offs_d[None, :] * sdd, offs_m, sdm, Tq, d_ok, True, EVEN_D)
    o = _load_rows(O + b * sob + h * soh + offs_d[None, :] * sod, offs_m, som, Tq, d_ok, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
    bh_n, b_n, h_n = _partner_pairs(H, bh, b, h, BLOCK_N, SEQ_N)
    h_kv = h_n // kv_group  # grouped-query attention: kv_group query heads share one key/value head
    k_base = K + b_n * skb + h_kv * skh + offs_d[None, :] * skd
    v_base = V + b_n * svb + h_kv * svh + offs_d[None, :] * svd
    mask_base = MASK + b * smb + h * smh
    kpm_base = KPM + b * spb
    rng_base = bh.to(tl.int64) * Tq * Tk
    seed = tl.load(SEED) if HAS_DROPOUT else 0  # read on the device: a compiled graph draws it each step

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_lo, n_mid, n_full, n_end = _key_range(m0, Tq, Tk, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW, PACKED)
    for phase in tl.static_range(N_PHASES):  # a third phase only with a window: its far edge, masked
        if phase == 0:
            lo = n_mid
            hi = n_full
        elif phase == 1:
            lo = n_full
            hi = n_end
        else:
            lo = n_lo
            hi = n_mid
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + _block_rows(Tk, n_pairs, BLOCK_N, SEQ_N)
            k = _load_rows(k_base, offs_n, skn, Tk, d_ok, phase != 0, EVEN_D)
            v = _load_rows(v_base, offs_n, svn, Tk, d_ok, phase != 0, EVEN_D)
            s, dcap = _log2_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), offs_m[:, None],
                                   _own_pair(offs_n[None, :], bh, bh_n, Tk, PACKED),
                                   Tq, Tk, qk_scale, softcap, window, mask_base, smm, smn, kpm_base, spn,
                                   phase != 0, IS_CAUSAL, MASK_KIND, HAS_KPM, HAS_SOFTCAP, HAS_WINDOW)
            p = tl.math.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            if HAS_DROPOUT:
                keep = _dropout_tile(seed, dropout_p, rng_base, Tk, offs_m, start_n, BLOCK_N, QUADS, SEQ_N)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:  # through the cap: d(qk * scale) = dS * (1 - tanh^2)
                ds = ds * dcap
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)

    _store_rows(DQ + dq_offset + b * sgb + h * sgh + offs_d[None, :] * sgd, offs_m, sgm, Tq, d_ok, dq * scale)


@triton.jit
def _dropout_mask_kernel(OUT, SEED, Tq, Tk, dropout_p, QUADS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    dropout_p = tl.cast(dropout_p, tl.float32)  # fp32 math: Inductor passes Python floats as fp64
    # The mask's flat index is the RNG counter: the whole contract between the attention kernels and dropout.
    mb, bh = _program_block(tl.cdiv(Tq, BLOCK_M), False)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rng_base = bh.to(tl.int64) * Tq * Tk
    seed = tl.load(SEED)
    for start_n in range(0, Tk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_tile(seed, dropout_p, rng_base, Tk, offs_m, start_n, BLOCK_N, QUADS, 0)
        tl.store(OUT + rng_base + offs_m[:, None].to(tl.int64) * Tk + offs_n[None, :], keep.to(tl.uint8),
                 mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk))


# ----------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------

# H100 configs (BLOCK_M, BLOCK_N, num_warps, num_stages), per kernel and per BLOCK_D (64 covers the head dims
# up to 64): autotuning candidates for the hot path, then under "fallback" one config per BLOCK_D up to that
# width for everything else. Forward and dQ hold BLOCK_M query rows and stream BLOCK_N keys;
# dK/dV holds BLOCK_N keys plus two fp32 accumulators and streams BLOCK_M queries, so it wants BLOCK_N large
# and BLOCK_M small. Compiled for sm_90 (bf16, causal; `python benchmarks/attention_sm90.py`, no GPU needed),
# every config listed spills nothing without dropout; with dropout's RNG 11 of 30 spill 8-208 bytes a thread
# and the autotuner's timings decide whether that costs. Soft-capping (HAS_SOFTCAP, `--softcap`) adds
# the tanh to every kernel: one dK/dV config spills without dropout (D 128, 64 x 64: 40 bytes), 8 of 22 with
# it (benchmarks/results/sm90/attention_sm90_softcap.md). A sliding window (HAS_WINDOW, `--window`) adds a
# third key loop to fwd and dQ: without dropout two fwd configs (D 128) spill 8 bytes and one dK/dV config
# (D 128, 64 x 64) 56 (benchmarks/results/sm90/attention_sm90_window.md).
# D 256 (Gemma): two [BLOCK_N, 256] fp32 accumulators fill dK/dV's registers, so its keys come 32 at a time
# (64 spill 300+ bytes at any warp count); 32-row tiles are below wgmma's 64 rows a warpgroup and run on
# mma.sync; soft-capped or windowed, only dropout variants spill (48-112 bytes) and one windowed dQ config (32).
# The D 256 fallbacks are the largest tiles whose fp32 variant (masks, dropout, soft-cap) still fits shared
# memory, one pipeline stage.
_FWD_CONFIGS = {64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
                128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 4), (64, 64, 4, 3)],
                256: [(64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
                "fallback": {128: (64, 64, 4, 3), 256: (32, 32, 4, 1)}}
_DKDV_CONFIGS = {64: [(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 4)],
                 128: [(32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 4)],
                 256: [(32, 32, 8, 2), (64, 32, 8, 2), (16, 32, 8, 2)],
                 "fallback": {128: (32, 128, 8, 3), 256: (16, 32, 8, 1)}}
_DQ_CONFIGS = {64: [(128, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
               128: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
               256: [(128, 32, 8, 2), (64, 32, 8, 2)],
               "fallback": {128: (128, 32, 8, 3), 256: (32, 32, 8, 1)}}
# The interpreter pays per program and per operation, hardly per element: few programs with big tiles.
# Sequences up to _INTERPRET_TILE long go in whole, as many (batch, head) pairs side by side as fit (a ViT
# on 8x8 digits, 5 tokens, would launch one program per image otherwise); longer ones stream
# INTERPRET_BLOCK x INTERPRET_BLOCK blocks, 128 so that a CPU GPT's 128-token blocks take one program per head
# (numpy's BLAS runs on one thread inside interpreted kernels, triformer._runtime, so a larger dot costs no
# thread hand-offs). tests/test_attention.py lowers it to 64 so that its sequences of 67-150 cross blocks.
_INTERPRET_TILE = 32
INTERPRET_BLOCK = 128
_TUNE_KEY = ["HEAD_DIM", "IS_CAUSAL", "MASK_KIND", "HAS_KPM", "HAS_DROPOUT", "HAS_SOFTCAP", "HAS_WINDOW",
             "TQ_BUCKET", "TK_BUCKET"]


def _autotuned(table):
    """On a GPU, autotune the hot path (fp16/bf16, power-of-two head dim, no attention or padding mask,
    dropout or not) over its candidates for its BLOCK_D; every other variant takes the fallback config of its
    width, so the many variants a test suite compiles cost one compile each instead of one per candidate."""
    hot_tables = {width: configs for width, configs in table.items() if width != "fallback"}
    fallbacks = table["fallback"]

    def prune(configs, named_args, **kwargs):
        block_d = kwargs["BLOCK_D"]
        hot = (named_args["Q"].dtype != torch.float32 and kwargs["HEAD_DIM"] == block_d
               and kwargs["MASK_KIND"] == 0 and not kwargs["HAS_KPM"])
        wanted = (hot_tables[max(64, block_d)] if hot
                  else [fallbacks[min(width for width in fallbacks if width >= block_d)]])
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    def wrap(kernel):
        if INTERPRET:
            return kernel
        every = [*(c for configs in hot_tables.values() for c in configs), *fallbacks.values()]
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                   for m, n, w, s in dict.fromkeys(every)]
        return triton.autotune(configs=configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune})(kernel)
    return wrap


_attn_fwd = _autotuned(_FWD_CONFIGS)(_attn_fwd_kernel)
_attn_bwd_dkdv = _autotuned(_DKDV_CONFIGS)(_attn_bwd_dkdv_kernel)
_attn_bwd_dq = _autotuned(_DQ_CONFIGS)(_attn_bwd_dq_kernel)


# Host-side arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are ConstexprFunction objects
# (Triton 3.6 and 3.9), a few microseconds per call, and a forward+backward made eleven such calls.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length()


# The config Triton's autotuner chose for each tuning key. Its run() rebuilds the key from every argument on
# each launch, host time of the order of the kernels' own at GPT-2 sizes (benchmarks/host_overhead.py); once a
# key is tuned, its config is launched directly.
_TUNED: dict = {}


def _tune_key(kernel, tensors: tuple, consts: dict) -> tuple:
    """What Triton's autotuner keys a launch on (the _TUNE_KEY values, then the dtype of every tensor
    argument), per kernel. It covers all that the prune reads: Q's dtype, HEAD_DIM (hence BLOCK_D),
    MASK_KIND and HAS_KPM."""
    return (kernel, *[consts[name] for name in _TUNE_KEY], *[t.dtype for t in tensors])


def _tiles(Tq: int, Tk: int, n_pairs: int) -> dict:
    """The kernels' tile arguments: none on a GPU (autotuning picks BLOCK_M/BLOCK_N, SEQ 0 = one pair per
    program); on the interpreter, packed whole sequences (SEQ_M/SEQ_N rows per pair, see _tile_rows) when
    they fit, else INTERPRET_BLOCK-square blocks."""
    if not INTERPRET:
        return dict(SEQ_M=0, SEQ_N=0)
    Tq, Tk, n_pairs = _runtime.plan_sizes(Tq, Tk, n_pairs)
    seq_m, seq_n = _pow2(Tq), _pow2(Tk)
    if max(seq_m, seq_n) > _INTERPRET_TILE:
        return dict(BLOCK_M=INTERPRET_BLOCK, BLOCK_N=INTERPRET_BLOCK, SEQ_M=0, SEQ_N=0)
    pairs = min(_INTERPRET_TILE // max(seq_m, seq_n), _pow2(n_pairs))
    return dict(BLOCK_M=pairs * seq_m, BLOCK_N=pairs * seq_n, SEQ_M=seq_m, SEQ_N=seq_n)


def _launch(kernel, seq_len: int, block: str, n_pairs: int, tiles: dict, tensors: tuple, *scalars,
            **consts) -> None:
    """Launch over (blocks of ``seq_len`` along ``block``) x batch*heads programs, 1-D so the batch*heads
    count is not limited to the 65535 of a second grid axis; packed tiles take BLOCK_M // SEQ_M whole pairs
    per program. ``tensors`` must hold every tensor argument (they lead each kernel's signature): their
    dtypes are part of the tuning key."""
    args = (*tensors, *scalars)
    if tiles["SEQ_M"]:
        grid = (_cdiv(n_pairs, tiles["BLOCK_M"] // tiles["SEQ_M"]),)
    elif not isinstance(kernel, triton.runtime.Autotuner):  # the interpreter, or a kernel given its tile
        grid = (_cdiv(seq_len, tiles[block]) * n_pairs,)
    elif _runtime.traced_launches():  # torch.compile: Inductor benchmarks the candidates itself
        grid = lambda meta: (_cdiv(seq_len, meta[block]) * n_pairs,)  # noqa: E731
    else:
        _runtime.check_mode()  # (these two launches bypass _runtime.launch)
        key = _tune_key(kernel, tensors, consts)
        tuned = _TUNED.get(key)
        if tuned is None:  # a new key: Triton prunes and benchmarks, then launches its pick
            kernel[lambda meta: (_cdiv(seq_len, meta[block]) * n_pairs,)](*args, **tiles, **consts)
            config = kernel.best_config
            _TUNED[key] = (config.kwargs[block], config.all_kwargs())
        else:  # what Autotuner.run does with a cached config (ours have no pre_hook), minus rebuilding its key
            kernel.fn[(_cdiv(seq_len, tuned[0]) * n_pairs,)](*args, **tiles, **consts, **tuned[1])
        return
    _runtime.launch(kernel, grid)(*args, **tiles, **consts)


def _empty(shape, like: torch.Tensor, dtype: Optional[torch.dtype] = None, strides=None) -> torch.Tensor:
    """Every buffer the ops fill comes from here, so a test can poison them all."""
    if strides is None:
        return like.new_empty(shape, dtype=dtype or like.dtype)
    return like.new_empty_strided(shape, strides, dtype=dtype or like.dtype)


def _bthd_empty(B: int, H: int, T: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] with the strides of [B, T, H, D] memory: heads interleave per token, as the next
    projection wants (allocated with those strides: one call instead of new_empty + transpose)."""
    return _empty((B, H, T, D), like, strides=(T * H * D, D, H * D, 1))


def _mask_operand(attn_mask: Optional[torch.Tensor], B: int, H: int, Tq: int, Tk: int, placeholder: torch.Tensor):
    """(kind, tensor, 4 strides) of the attention mask broadcast to [B, H, Tq, Tk] with zero strides. Bool masks
    go in as they are (Triton loads a bool pointer as bytes): a ``view(torch.uint8)`` would be free in eager, but
    Inductor cannot lower a bool bitcast (torch 2.11), and every compiled HF model passes a bool mask.
    Absent operands pass a placeholder the kernel never reads."""
    if attn_mask is None:
        return 0, placeholder, (0, 0, 0, 0)
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)).expand(B, H, Tq, Tk)
    if m.dtype == torch.bool:
        return 2, m, m.stride()
    return 1, m, m.stride()


def _score_scales(scale: float, softcap: float) -> tuple[float, float]:
    """The kernels' (qk_scale, softcap) scalars: scale * log2(e) and an unused 0 without soft-capping; with it
    scale / cap and cap * log2(e), so that tanh sees the natural-scale scores (see _log2_scores)."""
    if softcap > 0:
        return scale / softcap, softcap * LOG2E.value
    return scale * LOG2E.value, 0.0


def _kernel_operands(q, k, attn_mask, key_padding_mask, seed, dropout_p, is_causal, softcap, window):
    """Mask operands and their strides, RNG scalars, and the keyword arguments shared by the kernels: their
    compile-time switches and the sequence-length buckets, so that all of _TUNE_KEY is among them. ``window``
    None passes 0, which the kernels compiled without HAS_WINDOW never read."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    mask_kind, mask, mask_strides = _mask_operand(attn_mask, B, H, Tq, Tk, q)
    kpm = q if key_padding_mask is None else key_padding_mask
    kpm_strides = (0, 0) if key_padding_mask is None else key_padding_mask.stride()
    rng = (seed if dropout_p > 0 else q, dropout_p, 1.0 / (1.0 - dropout_p))  # q: a placeholder never read
    Tq, Tk, D = _runtime.plan_sizes(Tq, Tk, D)  # the constexprs below
    dot_prec = "ieee" if q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"
    consts = dict(IS_CAUSAL=is_causal, MASK_KIND=mask_kind, HAS_KPM=key_padding_mask is not None,
                  HAS_DROPOUT=dropout_p > 0, HAS_SOFTCAP=softcap > 0, HAS_WINDOW=window is not None, QUADS=Tk % 4 == 0,
                  DOT_PREC=dot_prec, HEAD_DIM=D, BLOCK_D=max(16, _pow2(D)), TQ_BUCKET=_pow2(Tq), TK_BUCKET=_pow2(Tk),
                  kv_group=H // k.shape[1], window=0 if window is None else window)
    return mask, kpm, (*mask_strides, *kpm_strides), rng, consts


# ----------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------

@_runtime.kernel_op("triformer::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                   key_padding_mask: Optional[torch.Tensor], seed: Optional[torch.Tensor], is_causal: bool,
                   dropout_p: float, scale: float, softcap: float = 0.0,
                   window: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out = _bthd_empty(B, H, Tq, D, q)
    lse = _empty((B, H, Tq), q, torch.float32)
    mask, kpm, mask_strides, rng, consts = _kernel_operands(q, k, attn_mask, key_padding_mask, seed, dropout_p,
                                                            is_causal, softcap, window)
    _launch(_attn_fwd, Tq, "BLOCK_M", B * H, _tiles(Tq, Tk, B * H), (q, k, v, out, lse, mask, kpm),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides,
            H, B * H, Tq, Tk, *_score_scales(scale, softcap), *rng, **consts)
    return out, lse


def _offset_in(view: torch.Tensor, base: torch.Tensor) -> int:
    """Elements from ``base``'s first element to ``view``'s (a view of it)."""
    return view.storage_offset() - base.storage_offset()


def _launch_bwd(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, seed, is_causal, dropout_p, scale,
                softcap, window, dq, dq_base, dk, dv, dkv_base) -> None:
    """The backward's two kernels, writing dq (a view of ``dq_base``) and dk, dv (views of ``dkv_base``, with the
    same strides). The kernels take the bases and the views' offsets in them: traced by torch.compile, a kernel
    that writes a view of a buffer becomes a functional kernel on a copy of the view and a copy back into the
    buffer (a ``slice_scatter``, one pass over the whole buffer per view), where writes into the buffer itself
    need neither."""
    Tq, Tk = q.shape[2], k.shape[2]
    B, H, H_kv = q.shape[0], q.shape[1], k.shape[1]
    delta = _empty(lse.shape, lse)
    mask, kpm, mask_strides, rng, consts = _kernel_operands(q, k, attn_mask, key_padding_mask, seed, dropout_p,
                                                            is_causal, softcap, window)
    tiles = _tiles(Tq, Tk, B * H)
    shared = (*q.stride(), *k.stride(), *v.stride())
    scalars = (H, B * H, Tq, Tk, *_score_scales(scale, softcap), scale, *rng)
    _launch(_attn_bwd_dq, Tq, "BLOCK_M", B * H, tiles, (q, k, v, out, grad_out, lse, delta, dq_base, mask, kpm),
            *shared, *out.stride(), *grad_out.stride(), *dq.stride(), _offset_in(dq, dq_base), *mask_strides,
            *scalars, **consts)
    _launch(_attn_bwd_dkdv, Tk, "BLOCK_N", B * H_kv, tiles, (q, k, v, grad_out, lse, delta, dkv_base, mask, kpm),
            *shared, *grad_out.stride(), *dk.stride(), _offset_in(dk, dkv_base), _offset_in(dv, dkv_base),
            *mask_strides, *scalars, **consts)


@_runtime.kernel_op("triformer::attention_bwd", mutates_args=())
def _attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                   seed: Optional[torch.Tensor], is_causal: bool, dropout_p: float, scale: float,
                   softcap: float = 0.0,
                   window: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dkv): dkv [2, B, H_kv, Tk, D] is dk then dv (``_split_dkv``), one buffer for the one kernel that
    writes both (see _launch_bwd), each half laid out as _bthd_empty lays out dq."""
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    dq = _bthd_empty(B, H, Tq, D, q)
    dkv = _empty((2, B, H_kv, Tk, D), k, strides=(B * Tk * H_kv * D, Tk * H_kv * D, D, H_kv * D, 1))
    _launch_bwd(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, seed, is_causal, dropout_p, scale,
                softcap, window, dq, dq, *_split_dkv(dkv), dkv)
    return dq, dkv


def _split_dkv(dkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dk and dv [B, H_kv, Tk, D] of attention_bwd's dkv [2, B, H_kv, Tk, D]."""
    return dkv.unbind(0)


def split_qkv(qkv: torch.Tensor, n_head: int, n_kv_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, n_head, T, D], k and v [B, n_kv_head, T, D]: views of a fused projection's output
    ``qkv`` [B, T, (n_head + 2 * n_kv_head) * D] (per token: the query heads, then the key heads, then the value
    heads)."""
    B, T, width = qkv.shape
    heads = n_head + 2 * n_kv_head
    return qkv.view(B, T, heads, width // heads).transpose(1, 2).split([n_head, n_kv_head, n_kv_head], dim=1)


# The packed backward writes dq, dk and dv into one buffer shaped like qkv, which is the gradient of the fused
# projection's output as it stands: from separate dq, dk and dv autograd would concatenate them into that
# buffer, one more pass over it.
@_runtime.kernel_op("triformer::attention_bwd_packed", mutates_args=())
def _attention_bwd_packed(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          seed: Optional[torch.Tensor], n_head: int, n_kv_head: int, is_causal: bool,
                          dropout_p: float, scale: float, softcap: float = 0.0,
                          window: Optional[int] = None) -> torch.Tensor:
    dqkv = _empty(qkv.shape, qkv)
    dq, dk, dv = split_qkv(dqkv, n_head, n_kv_head)
    _launch_bwd(grad_out, *split_qkv(qkv, n_head, n_kv_head), out, lse, None, None, seed, is_causal, dropout_p,
                scale, softcap, window, dq, dqkv, dk, dv, dqkv)
    return dqkv


# ----------------------------------------------------------------------------------------------------
# Autograd and public API
# ----------------------------------------------------------------------------------------------------

class AttentionFunction(torch.autograd.Function):
    """Autograd over the custom ops. Takes already-validated arguments: ``scale`` a float, ``seed`` a 0-dim
    int64 CPU tensor (or None when ``dropout_p`` is 0), ``softcap`` a float >= 0 (0 = off, the default, so the
    nine-argument calls of earlier versions still work), ``window`` None or an int >= 1 with ``is_causal``; use
    ``attention`` instead."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal, dropout_p, scale, attn_mask, key_padding_mask, seed, softcap=0.0,
                window=None):
        out, lse = _attention_fwd(q, k, v, attn_mask, key_padding_mask, seed, is_causal, dropout_p, scale, softcap,
                                  window)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, key_padding_mask, seed)
        ctx.is_causal, ctx.dropout_p, ctx.scale, ctx.softcap, ctx.window = is_causal, dropout_p, scale, softcap, window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, attn_mask, key_padding_mask, seed = ctx.saved_tensors
        if needs_graph(grad_out, q, k, v):
            # create_graph=True: through attention_reference with the same arguments (the same seed regenerates the
            # kernel's dropout mask); it builds the [B, H, Tq, Tk] scores. See triformer._double_backward.
            dq, dk, dv = reference_grads(
                lambda q_, k_, v_: attention_reference(q_, k_, v_, ctx.is_causal, ctx.dropout_p, ctx.scale, attn_mask,
                                                       key_padding_mask, seed, ctx.softcap, window=ctx.window),
                (q, k, v), (grad_out,), ctx.needs_input_grad[:3])
            return dq, dk, dv, None, None, None, None, None, None, None, None
        dq, dkv = _attention_bwd(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, seed,
                                 ctx.is_causal, ctx.dropout_p, ctx.scale, ctx.softcap, ctx.window)
        dk, dv = _split_dkv(dkv)
        # (trailing Nones past the arguments given, when softcap or window was left out, are dropped by autograd)
        return dq, dk, dv, None, None, None, None, None, None, None, None


class PackedAttentionFunction(torch.autograd.Function):
    """Autograd of ``attention_packed``: the fused projection's output in, its gradient out as one tensor.
    Takes already-validated arguments; use ``attention_packed`` instead."""

    @staticmethod
    def forward(ctx, qkv, n_head, n_kv_head, is_causal, dropout_p, scale, seed, softcap=0.0, window=None):
        q, k, v = split_qkv(qkv, n_head, n_kv_head)
        out, lse = _attention_fwd(q, k, v, None, None, seed, is_causal, dropout_p, scale, softcap, window)
        ctx.save_for_backward(qkv, out, lse, seed)
        ctx.heads, ctx.is_causal, ctx.dropout_p, ctx.scale = (n_head, n_kv_head), is_causal, dropout_p, scale
        ctx.softcap, ctx.window = softcap, window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, out, lse, seed = ctx.saved_tensors
        if needs_graph(grad_out, qkv):  # create_graph=True: through the reference (triformer._double_backward)
            (dqkv,) = reference_grads(
                lambda qkv_: attention_packed_reference(qkv_, *ctx.heads, ctx.is_causal, ctx.dropout_p, ctx.scale,
                                                        seed, ctx.softcap, ctx.window),
                (qkv,), (grad_out,), ctx.needs_input_grad[:1])
        else:
            dqkv = _attention_bwd_packed(grad_out, qkv, out, lse, seed, *ctx.heads, ctx.is_causal, ctx.dropout_p,
                                         ctx.scale, ctx.softcap, ctx.window)
        return dqkv, None, None, None, None, None, None, None, None


def _check_heads(qkv, n_head, n_kv_head) -> int:
    """n_kv_head, defaulting to n_head, once qkv [B, T, (n_head + 2 * n_kv_head) * D] is checked against both."""
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    for name, n in (("n_head", n_head), ("n_kv_head", n_kv_head)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        raise ValueError(f"qkv must be a 3-D tensor [batch, seq, (n_head + 2 * n_kv_head) * head_dim], got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    if qkv.shape[-1] % (n_head + 2 * n_kv_head):
        raise ValueError(f"qkv's last dimension {qkv.shape[-1]} must be (n_head + 2 * n_kv_head) * head_dim with "
                         f"n_head={n_head} and n_kv_head={n_kv_head}")
    if qkv.stride(-1) != 1:  # the heads are views of each token's row
        raise ValueError(f"qkv must be contiguous in its last dimension, got strides {qkv.stride()}: call "
                         f".contiguous() first")
    return n_kv_head


def _check_softcap(softcap) -> None:
    """softcap: a finite number >= 0 (0 = off)."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float (0 = off), got {type(softcap).__name__}")
    if not (_runtime.is_finite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {softcap!r}")


def _check_window(window, is_causal) -> None:
    """window: None (off) or an int >= 1, and only with is_causal=True (a window is causal here: keys from
    ``window - 1`` positions back up to the query's own aligned position)."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, (int, torch.SymInt)):
        raise TypeError(f"window must be None or an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    if is_causal is not True:
        raise ValueError(f"window={window} needs is_causal=True (the sliding window is causal), got "
                         f"is_causal={is_causal!r}")


def _check_arguments(q, k, v, is_causal, dropout_p, scale, attn_mask, key_padding_mask, softcap=0.0,
                     window=None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    H_kv = k.shape[1]
    if k.shape != (B, H_kv, Tk, D) or v.shape != k.shape or H_kv == 0 or H % H_kv:
        raise ValueError(f"k and v must be [{B}, H_kv, Tk, {D}] with H_kv dividing q's {H} heads, to match q "
                         f"{tuple(q.shape)}; got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if min(B, H, Tq, Tk, D) == 0:
        raise ValueError(f"q, k and v must be non-empty, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM}, got {D}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not _runtime.is_finite(scale)):
        raise ValueError(f"scale must be None or a finite float, got {scale!r}")
    _check_softcap(softcap)
    _check_window(window, is_causal)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool:
            check_float("attn_mask", attn_mask)
        if attn_mask.dim() > 4 or any(s not in (1, full) for s, full in
                                      zip(attn_mask.shape[::-1], (Tk, Tq, H, B))):
            raise ValueError(f"attn_mask must broadcast to [B, H, Tq, Tk] = {[B, H, Tq, Tk]}, "
                             f"got shape {tuple(attn_mask.shape)}")
        if attn_mask.requires_grad and torch.is_grad_enabled():
            raise ValueError("attn_mask gets no gradient from attention; pass attn_mask.detach()")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if key_padding_mask.shape != (B, Tk):
            raise ValueError(f"key_padding_mask must be [B, Tk] = {[B, Tk]}, got {tuple(key_padding_mask.shape)}")
    check_device(q=q, k=k, v=v, attn_mask=attn_mask, key_padding_mask=key_padding_mask)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False, dropout_p: float = 0.0,
              scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None,
              key_padding_mask: Optional[torch.Tensor] = None, seed=None, softcap: float = 0.0,
              window: Optional[int] = None) -> torch.Tensor:
    """Flash attention on q [B, H, Tq, D], k/v [B, H_kv, Tk, D] (H_kv divides H: grouped-query attention);
    returns [B, H, Tq, D] (see the module
    docstring for masks, causal alignment, rows with nothing to attend to, and dropout). ``scale``
    defaults to 1/sqrt(D). ``seed`` (used only when dropout_p > 0): an int in [0, 2**63) or a 0-dim
    integer tensor; None draws one from the generator of q's device, exactly as ``triformer.dropout`` does.
    ``softcap`` > 0 soft-caps the scaled scores, ``softcap * tanh(q @ k^T * scale / softcap)``, before the
    masks (Gemma-2's attention logit soft-capping); 0, the default, leaves them as they are.
    ``window`` (an int >= 1, with ``is_causal=True`` only) is a sliding window: the query at aligned position
    ``a`` (see the causal alignment) attends keys ``a - window < j <= a``, the ``window`` latest (transformers'
    ``sliding_window``, Mistral's); the kernels skip the key blocks outside it. None, the default: no window."""
    _check_arguments(q, k, v, is_causal, dropout_p, scale, attn_mask, key_padding_mask, softcap, window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed_t = seed_tensor(seed, q.device) if dropout_p > 0 else None
    return AttentionFunction.apply(q, k, v, is_causal, float(dropout_p), scale, attn_mask, key_padding_mask, seed_t,
                                   float(softcap), window)


def attention_packed(qkv: torch.Tensor, n_head: int, n_kv_head: Optional[int] = None, is_causal: bool = False,
                     dropout_p: float = 0.0, scale: Optional[float] = None, seed=None,
                     softcap: float = 0.0, window: Optional[int] = None) -> torch.Tensor:
    """``attention`` on the output of a fused q/k/v projection, ``qkv`` [B, T, (n_head + 2 * n_kv_head) * D]
    (per token the query heads, then the key heads, then the value heads: ``split_qkv``). Returns [B, n_head,
    T, D] as ``attention`` does, and its backward returns d(qkv) as one tensor written by the kernels, where
    separate q, k, v views would have autograd concatenate their gradients. ``n_kv_head`` defaults to
    ``n_head``; the other arguments are ``attention``'s."""
    n_kv_head = _check_heads(qkv, n_head, n_kv_head)
    q, k, v = split_qkv(qkv, n_head, n_kv_head)
    _check_arguments(q, k, v, is_causal, dropout_p, scale, None, None, softcap, window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed_t = seed_tensor(seed, qkv.device) if dropout_p > 0 else None
    return PackedAttentionFunction.apply(qkv, n_head, n_kv_head, is_causal, float(dropout_p), scale, seed_t,
                                         float(softcap), window)


def attention_packed_reference(qkv: torch.Tensor, n_head: int, n_kv_head: Optional[int] = None,
                               is_causal: bool = False, dropout_p: float = 0.0, scale: Optional[float] = None,
                               seed=None, softcap: float = 0.0, window: Optional[int] = None) -> torch.Tensor:
    """``attention_reference`` on ``split_qkv``'s views: plain PyTorch, ``attention_packed``'s semantics."""
    n_kv_head = _check_heads(qkv, n_head, n_kv_head)
    return attention_reference(*split_qkv(qkv, n_head, n_kv_head), is_causal, dropout_p, scale, seed=seed,
                               softcap=softcap, window=window)


def attention_dropout_mask(shape, dropout_p: float, seed, device=None) -> torch.Tensor:
    """The keep mask (True = kept) that ``attention(..., dropout_p=dropout_p, seed=seed)`` applies to
    inputs of ``shape`` = (B, H, Tq, Tk), drawn from the same Philox counters. For tests: it stores the
    full [B, H, Tq, Tk] matrix that attention itself never builds."""
    B, H, Tq, Tk = (int(s) for s in shape)
    if not 0.0 < dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in (0, 1), got {dropout_p}")
    device = torch.device("cpu" if INTERPRET else "cuda") if device is None else torch.device(device)
    out = _empty((B, H, Tq, Tk), torch.empty(0, dtype=torch.uint8, device=device))
    block_m = 64 if INTERPRET else 32
    _runtime.launch(_dropout_mask_kernel, (_cdiv(Tq, block_m) * B * H,))(
        out, seed_tensor(seed, device), Tq, Tk, float(dropout_p), QUADS=Tk % 4 == 0, BLOCK_M=block_m, BLOCK_N=64)
    return out.view(torch.bool)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
                        dropout_p: float = 0.0, scale: Optional[float] = None,
                        attn_mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                        seed=None, softcap: float = 0.0, dropout_mask: Optional[torch.Tensor] = None,
                        window: Optional[int] = None) -> torch.Tensor:
    """Plain PyTorch attention with ``attention``'s semantics, in the inputs' dtype (float64-friendly).

    ``softcap`` > 0: the scaled scores become ``softcap * tanh(scores / softcap)`` before any mask, as in
    transformers' eager Gemma-2 attention. ``window`` (with ``is_causal``): the causal mask's band, keys
    ``i + Tk - Tq - window < j <= i + Tk - Tq`` for query row i, as a dense boolean mask.

    Dropout keeps where ``dropout_mask`` (bool, broadcastable to [B, H, Tq, Tk]) is True. Without it, a
    given ``seed`` regenerates the kernel's mask bit for bit (triformer.dropout's plain-PyTorch Philox on the
    flat [B, H, Tq, Tk] index; memory-hungry, for tests), and ``seed=None`` draws a ``torch.rand`` mask:
    the same distribution, other bits, at the cost of ordinary unfused attention.
    """
    _check_softcap(softcap)
    _check_window(window, is_causal)
    Tq, Tk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if k.dim() == 4 and k.shape[1] != q.shape[1]:  # grouped-query attention: query head h reads kv head h // group
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = allowed.tril(diagonal=Tk - Tq)
    if window is not None:  # j - i >= Tk - Tq - window + 1
        allowed = allowed.triu(diagonal=Tk - Tq - window + 1)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.to(s.dtype)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0:
        if dropout_mask is None and seed is None:
            dropout_mask = torch.rand(p.shape, device=q.device) >= dropout_p
        elif dropout_mask is None:
            index = torch.arange(p.numel(), device=q.device).reshape(p.shape)
            dropout_mask = dropout_keep_reference(index, int(seed_tensor(seed, q.device)), dropout_p)
        p = p * dropout_mask / (1.0 - dropout_p)
    return p @ v


class Attention(torch.nn.Module):
    """``attention`` as a module: dropout applies in training mode only."""

    def __init__(self, is_causal: bool = False, dropout_p: float = 0.0, scale: Optional[float] = None,
                 softcap: float = 0.0, window: Optional[int] = None):
        super().__init__()
        _check_softcap(softcap)
        _check_window(window, is_causal)
        self.is_causal, self.dropout_p, self.scale, self.softcap = is_causal, dropout_p, scale, softcap
        self.window = window

    def forward(self, q, k, v, attn_mask=None, key_padding_mask=None):
        return attention(q, k, v, self.is_causal, self.dropout_p if self.training else 0.0, self.scale,
                         attn_mask, key_padding_mask, softcap=self.softcap, window=self.window)

    def extra_repr(self) -> str:
        return (f"is_causal={self.is_causal}, dropout_p={self.dropout_p}, scale={self.scale}"
                + (f", softcap={self.softcap}" if self.softcap else "")
                + (f", window={self.window}" if self.window is not None else ""))
