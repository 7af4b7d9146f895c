"""The block pieces of the ONNX lowering kit: block geometry, selection helpers, gathered attention.

Block geometry (:class:`BlockGrid`, the ONNX values of
:class:`surgeon.kernels.geometry.BlockGeometry`) and the selection helpers mirror
:mod:`surgeon.kernels.geometry` op for op. Selections that the references make as index lists
(``torch.sort`` / ``torch.topk`` plus data-dependent slicing) are expressed with static-rank
tensors: a full ``TopK`` over the last axis gives the order, ``ScatterElements`` of a range turns
it into each element's rank, and "rank < budget" is the selection. ONNX ``TopK`` breaks ties
toward the lower index, as the references' stable sorts do.

:func:`gathered_block_attention` is the body of the block-sparse variants' "gather" lowerings
(``lowering="gather"``, see :func:`surgeon.exporters.onnx_lowering.get_lowering`): the token-mask
bodies compute the block selection and then run *dense* masked attention with the selection
upsampled to a token mask [B,Hq,Nq,Nk] (correct, but slower than dense attention in onnxruntime);
the gathered body attends only to the kept blocks, with standard ONNX ops:

1. ``K = max over rows of the number of kept blocks`` (a 0-D value: the bodies stay dynamic);
   ``TopK`` of the 0/1 selection [B,Hq,nqb,nkb] gives each query block's kept block indices
   [B,Hq,nqb,K] (kept blocks first, ascending; the remaining slots are unkept blocks and are
   masked out).
2. K and V, padded to ``nkb·k_block`` keys, are viewed as a list of blocks [B·Hkv·nkb, k_block, D]
   and ``Gather``-ed by ``(b·Hkv + h // (Hq/Hkv))·nkb + index`` → [B,Hq,nqb,K·k_block,D]
   (GQA: a query head reads its KV head's blocks; nothing is repeated per head up front).
3. Per query block: scores [B,Hq,nqb,q_block,K·k_block] = MatMul, token masks (unused slots,
   padding keys, keys past Nk, causal positions) as -inf, the masked softmax of
   :func:`surgeon.exporters.onnx_kit.masked_softmax` (rows with no key give 0), MatMul with
   the gathered V, reshape to [B,Hq,Nq,Dv].

Work and memory are O(Nq · K · k_block) instead of O(Nq · Nk). The result equals the op's
reference (same kept keys, same softmax) up to float rounding; the returned block mask is the
same selection bit for bit. Sites with an explicit ``attn_mask`` or composed modulators keep
the token-mask body (:func:`needs_token_mask`; the gathered body does not apply them).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional, Sequence

import numpy as np
import onnx_ir as ir

from surgeon.exporters.onnx_kit import INT64_MAX, LoweringBuilder, last_dim, ones_row


@dataclasses.dataclass(frozen=True)
class BlockGrid:
    """ONNX values of :class:`surgeon.kernels.geometry.BlockGeometry` (dynamic lengths).

    nqb/nkb: 0-D int64 block counts; qb/kb: [nqb]/[nkb] block indices; q_first/q_last: [nqb]
    query positions; k_start/k_end: [nkb] first/last key position of each key block;
    allowed/partial: bool [nqb, nkb] (partial None when not causal);
    diag: [nqb] key block holding the block's last query, clamped to [0, nkb−1].
    """

    q_block: int
    k_block: int
    nqb: ir.Value
    nkb: ir.Value
    qb: ir.Value
    kb: ir.Value
    q_first: ir.Value
    q_last: ir.Value
    k_start: ir.Value
    k_end: ir.Value
    allowed: ir.Value
    partial: Optional[ir.Value]
    diag: ir.Value


def block_grid(op: LoweringBuilder, q: ir.Value, k: ir.Value, q_block: int, k_block: int, causal: bool) -> BlockGrid:
    """Block geometry for Nq = len(q), Nk = len(k) (queries are the last Nq positions; Nq ≤ Nk)."""

    def make() -> BlockGrid:
        nq, nk = op.dim(q, 2), op.dim(k, 2)
        zero, one = op.int_scalar(0), op.int_scalar(1)
        qbs, kbs = op.int_scalar(q_block), op.int_scalar(k_block)
        nqb = op.Div(op.Add(nq, op.int_scalar(q_block - 1)), qbs)
        nkb = op.Div(op.Add(nk, op.int_scalar(k_block - 1)), kbs)
        off = op.Sub(nk, nq)
        qb, kb = op.Range(zero, nqb, one), op.Range(zero, nkb, one)
        q_first = op.Add(off, op.Mul(qb, qbs))
        q_last = op.Sub(op.Add(off, op.Min(op.Mul(op.Add(qb, one), qbs), nq)), one)
        k_start = op.Mul(kb, kbs)
        k_end = op.Sub(op.Min(op.Add(k_start, kbs), nk), one)
        row = op.ints([1])
        col = op.ints([0])
        if causal:
            allowed = op.LessOrEqual(op.Unsqueeze(k_start, col), op.Unsqueeze(q_last, row))
            partial = op.And(allowed, op.Greater(op.Unsqueeze(k_end, col), op.Unsqueeze(q_first, row)))
        else:
            shape = op.Concat(op.Unsqueeze(nqb, col), op.Unsqueeze(nkb, col), axis=0)
            allowed = op.Expand(op.Constant(value=ir.tensor(np.array(True))), shape)
            partial = None
        diag = op.Max(op.Min(op.Div(q_last, kbs), op.Sub(nkb, one)), zero)
        return BlockGrid(q_block, k_block, nqb, nkb, qb, kb, q_first, q_last, k_start, k_end, allowed, partial, diag)

    return op.memo(("grid", id(q), id(k), q_block, k_block, causal), make)


def sink_local_blocks(op: LoweringBuilder, g: BlockGrid, sink_blocks: int, local_blocks: int) -> ir.Value:
    """Bool [nqb, nkb]: the first ``sink_blocks`` key blocks and the ``local_blocks`` blocks
    ending at each query block's diagonal block, among allowed blocks."""
    kb = op.Unsqueeze(g.kb, op.ints([0]))
    d = op.Unsqueeze(g.diag, op.ints([1]))
    local = op.And(op.LessOrEqual(kb, d), op.Greater(kb, op.Sub(d, op.int_scalar(local_blocks))))
    return op.And(op.Or(op.Less(kb, op.int_scalar(sink_blocks)), local), g.allowed)


def upsample_block_mask(op: LoweringBuilder, bm: ir.Value, q: ir.Value, k: ir.Value, q_block: int,
                        k_block: int) -> ir.Value:
    """Block mask [B,H,nqb,nkb] → token mask [B,H,Nq,Nk] (query row i → block i // q_block)."""
    zero, one = op.int_scalar(0), op.int_scalar(1)
    qi = op.Div(op.Range(zero, op.dim(q, 2), one), op.int_scalar(q_block))
    ki = op.Div(op.Range(zero, op.dim(k, 2), one), op.int_scalar(k_block))
    return op.Gather(op.Gather(bm, qi, axis=2), ki, axis=3)


def pooled_rows(op: LoweringBuilder, x: ir.Value, w: ir.Value, nblocks: ir.Value, block: int,
                shifted: bool) -> tuple[ir.Value, ir.Value]:
    """Weighted mean per block of rows: x [B,H,N,D], w [B|1,N] → ([B,H,nb,D], count [B|1,1,nb,1]).

    ``shifted`` (the causal query pooling of ``pooled_queries``): block b averages rows
    [b·block − block + 1, b·block]; otherwise rows [b·block, (b+1)·block). Missing rows weigh 0.
    """
    total = op.Unsqueeze(op.Mul(nblocks, op.int_scalar(block)), op.ints([0]))  # [1]
    if shifted:
        front = op.ints([block - 1])
        xs = op.Pad(x, op.Concat(op.ints([0, 0]), front, op.ints([0, 0, 0, 0, 0]), axis=0))
        ws = op.Pad(w, op.Concat(op.ints([0]), front, op.ints([0, 0]), axis=0))
        xs = op.Slice(xs, op.ints([0]), total, op.ints([2]))
        ws = op.Slice(ws, op.ints([0]), total, op.ints([1]))
    else:
        tail = op.Sub(total, op.dims(x, 2, 3))
        xs = op.Pad(x, op.Concat(op.ints([0, 0, 0, 0, 0, 0]), tail, op.ints([0]), axis=0))
        ws = op.Pad(w, op.Concat(op.ints([0, 0, 0]), tail, axis=0))
    nb = op.Unsqueeze(nblocks, op.ints([0]))
    x5 = op.Reshape(xs, op.Concat(op.dims(x, 0, 2), nb, op.ints([block]), op.dims(x, 3), axis=0), allowzero=1)
    w5 = op.Reshape(ws, op.Concat(op.dims(w, 0, 1), op.ints([1]), nb, op.ints([block, 1]), axis=0), allowzero=1)
    s = op.ReduceSum(op.Mul(x5, w5), op.ints([3]), keepdims=0)
    cnt = op.ReduceSum(w5, op.ints([3]), keepdims=0)
    return op.Div(s, op.Max(cnt, op.scalar(1.0, cnt))), cnt


def query_weights(op: LoweringBuilder, q: ir.Value, k: ir.Value, key_padding: Optional[ir.Value],
                  causal: bool) -> ir.Value:
    """Real-query weights [B|1, Nq] (``query_validity``): key_padding's last Nq entries for
    self-attention (causal, or the same sequence axis), else ones."""
    if key_padding is None or not (causal or op.facts.self_attention):
        return ones_row(op, q, q)
    start = op.Sub(op.dims(k, 2, 3), op.dims(q, 2, 3))
    return op.CastLike(op.Slice(key_padding, start, op.ints([INT64_MAX]), op.ints([1])), q)


def select_top(op: LoweringBuilder, scores: ir.Value, allowed: ir.Value, forced: ir.Value, candidate: ir.Value,
               counts: ir.Value) -> ir.Value:
    """``geometry.select_top``: forced allowed blocks (+inf) plus the best-scoring
    eligible allowed blocks up to ``counts`` per row; ties toward the lower block index (ONNX
    TopK's documented tie-break). scores [B,H,R,C]; allowed/forced [R,C]; candidate
    broadcastable; counts [H,R] int64. Returns bool [B,H,R,C]."""
    forced = op.And(forced, allowed)
    s = op.Where(op.And(allowed, candidate), scores, op.scalar(-math.inf, scores))
    s = op.Where(forced, op.scalar(math.inf, scores), s)
    n_forced = op.ReduceSum(op.Cast(forced, to=ir.DataType.INT64), op.ints([-1]), keepdims=0)  # [R]
    k_eff = op.Unsqueeze(op.Max(counts, n_forced), op.ints([-1]))  # [H,R,1]
    order = op.TopK(s, op.dims(s, 3, 4), axis=-1, largest=1, sorted=1, _outputs=2)[1]
    ar = op.Expand(op.Range(op.int_scalar(0), op.dim(s, 3), op.int_scalar(1)), op.Shape(order))
    ranks = op.ScatterElements(ar, order, ar, axis=-1)  # rank of each block in the order
    return op.And(op.Less(ranks, k_eff), op.Greater(s, op.scalar(-math.inf, scores)))


def keep_counts(op: LoweringBuilder, fractions: Sequence[float], allowed: ir.Value) -> ir.Value:
    """⌈fraction_h · n_allowed_r − 1e−9⌉ in float64: [H, R] int64 (``geometry.keep_counts``)."""
    n_allowed = op.Cast(op.ReduceSum(op.Cast(allowed, to=ir.DataType.INT64), op.ints([-1]), keepdims=0),
                        to=ir.DataType.DOUBLE)
    frac = op.Constant(value=ir.tensor(np.asarray(fractions, dtype=np.float64).reshape(-1, 1)))
    x = op.Sub(op.Mul(frac, op.Unsqueeze(n_allowed, op.ints([0]))), op.Constant(value=ir.tensor(np.array(1e-9))))
    return op.Cast(op.Ceil(x), to=ir.DataType.INT64)


def recent_blocks(op: LoweringBuilder, g: BlockGrid, sink_blocks: int, recent_tokens: int) -> ir.Value:
    """Bool [nqb, nkb] (``geometry.recent_blocks``): the first ``sink_blocks`` key blocks
    plus every key block overlapping [q_first − recent + 1, q_last + recent − 1], among allowed."""
    lo = op.Unsqueeze(op.Sub(g.q_first, op.int_scalar(recent_tokens - 1)), op.ints([1]))
    hi = op.Unsqueeze(op.Add(g.q_last, op.int_scalar(recent_tokens - 1)), op.ints([1]))
    col = op.ints([0])
    near = op.And(op.GreaterOrEqual(op.Unsqueeze(g.k_end, col), lo), op.LessOrEqual(op.Unsqueeze(g.k_start, col), hi))
    sink = op.Less(op.Unsqueeze(g.kb, col), op.int_scalar(sink_blocks))
    return op.And(op.Or(near, sink), g.allowed)


def real_blocks(op: LoweringBuilder, key_padding: ir.Value, g: BlockGrid, k: ir.Value) -> ir.Value:
    """Bool [B, nkb]: key blocks holding at least one real key."""
    kpf = op.Cast(key_padding, to=ir.DataType.FLOAT)
    total = op.Unsqueeze(op.Mul(g.nkb, op.int_scalar(g.k_block)), op.ints([0]))
    kpf = op.Pad(kpf, op.Concat(op.ints([0, 0, 0]), op.Sub(total, op.dims(k, 2, 3)), axis=0))
    shape = op.Concat(op.dims(key_padding, 0, 1), op.Unsqueeze(g.nkb, op.ints([0])), op.ints([g.k_block]), axis=0)
    return op.Greater(op.ReduceMax(op.Reshape(kpf, shape, allowzero=1), op.ints([-1]), keepdims=0),
                      op.Constant(value_float=0.0))


def exact_query_weights(op: LoweringBuilder, q: ir.Value, k: ir.Value, key_padding: Optional[ir.Value],
                        causal: bool) -> ir.Value:
    """Real-query weights [B|1, Nq], exactly ``geometry.query_validity``: the last Nq
    entries of key_padding when causal or when Nq == Nk (decided at run time, so a model with
    distinct symbolic lengths still matches when they happen to be equal), else ones."""
    ones = ones_row(op, q, q)
    if key_padding is None:
        return ones
    start = op.Sub(op.dims(k, 2, 3), op.dims(q, 2, 3))
    tail = op.CastLike(op.Slice(key_padding, start, op.ints([INT64_MAX]), op.ints([1])), q)  # [B,Nq]
    if causal:
        return tail
    return op.Where(op.Equal(op.dim(q, 2), op.dim(k, 2)), tail, ones)


def block_row_sums(op: LoweringBuilder, x: ir.Value, w: ir.Value, nblocks: ir.Value,
                   block: int) -> tuple[ir.Value, ir.Value]:
    """Weighted sums per block of rows [b·block, (b+1)·block): x [B,H,N,D], w [B|1,N] →
    (sums [B,H,nb,D], weights [B|1,1,nb,1]); missing rows weigh 0 (``_window_sums``)."""
    total = op.Unsqueeze(op.Mul(nblocks, op.int_scalar(block)), op.ints([0]))  # [1]
    tail = op.Sub(total, op.dims(x, 2, 3))
    xs = op.Pad(x, op.Concat(op.ints([0, 0, 0, 0, 0, 0]), tail, op.ints([0]), axis=0))
    ws = op.Pad(w, op.Concat(op.ints([0, 0, 0]), tail, axis=0))
    nb = op.Unsqueeze(nblocks, op.ints([0]))
    x5 = op.Reshape(xs, op.Concat(op.dims(x, 0, 2), nb, op.ints([block]), op.dims(x, 3), axis=0), allowzero=1)
    w5 = op.Reshape(ws, op.Concat(op.dims(w, 0, 1), op.ints([1]), nb, op.ints([block, 1]), axis=0), allowzero=1)
    return op.ReduceSum(op.Mul(x5, w5), op.ints([3]), keepdims=0), op.ReduceSum(w5, op.ints([3]), keepdims=0)


def ranks_of(op: LoweringBuilder, scores: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Descending order of the last axis with ties toward the lower index (ONNX TopK; equal to
    ``torch.sort(descending=True, stable=True)``): (sorted values, order, rank of each element),
    all shaped like ``scores``."""
    vals, order = op.TopK(scores, op.dims(scores, -1), axis=-1, largest=1, sorted=1, _outputs=2)
    ar = op.Expand(op.Range(op.int_scalar(0), last_dim(op, scores), op.int_scalar(1)), op.Shape(order))
    return vals, order, op.ScatterElements(ar, order, ar, axis=-1)


def ceil_fraction(op: LoweringBuilder, n: ir.Value, frac: float) -> ir.Value:
    """⌈frac · n − 1e−9⌉ computed in float64, as int64 (the references' budget rounding)."""
    x = op.Mul(op.Cast(n, to=ir.DataType.DOUBLE), op.Constant(value=ir.tensor(np.array(float(frac)))))
    x = op.Sub(x, op.Constant(value=ir.tensor(np.array(1e-9))))
    return op.Cast(op.Ceil(x), to=ir.DataType.INT64)
F32 = ir.DataType.FLOAT


def descending_ranks(op: LoweringBuilder, s: ir.Value) -> ir.Value:
    """Rank of each entry along the last axis in descending order, ties toward the lower index
    (``torch.sort(descending=True, stable=True)`` then scatter; ONNX TopK's documented
    tie-break): int64, same shape as ``s``."""
    order = op.TopK(s, op.Shape(s, start=-1), axis=-1, largest=1, sorted=1, _outputs=2)[1]
    ar = op.Expand(op.Range(op.int_scalar(0), last_dim(op, s), op.int_scalar(1)), op.Shape(order))
    return op.ScatterElements(ar, order, ar, axis=-1)


def real_key_weights(op: LoweringBuilder, k: ir.Value, key_padding: Optional[ir.Value]) -> ir.Value:
    """Float32 weights [B|1, Nk]: 1 for real keys, 0 for padding (``real_keys``)."""
    if key_padding is None:
        return ones_row(op, k, op.Constant(value_float=0.0))
    return op.Cast(op.Cast(key_padding, to=ir.DataType.BOOL), to=F32)


def needs_token_mask(op: LoweringBuilder, attn_mask: Optional[ir.Value], config: str) -> bool:
    """Whether a site must keep the token-mask body: an explicit attn_mask or modulators."""
    return attn_mask is not None or bool(json.loads(config).get("modulators"))


def _full_shape(op: LoweringBuilder, q: ir.Value, nqb: ir.Value, nkb: ir.Value) -> ir.Value:
    """[B, Hq, nqb, nkb] as a 1-D int64 shape."""
    col = op.ints([0])
    return op.Concat(op.dims(q, 0, 2), op.Unsqueeze(nqb, col), op.Unsqueeze(nkb, col), axis=0)


def _pad_rows(op: LoweringBuilder, x: ir.Value, total: ir.Value) -> ir.Value:
    """Zero-pad axis 2 of a rank-4 x [B,H,N,D] to ``total`` (1-D [1]) rows."""
    extra = op.Sub(total, op.dims(x, 2, 3))
    return op.Pad(x, op.Concat(op.ints([0, 0, 0, 0, 0, 0]), extra, op.ints([0]), axis=0))


def gathered_block_attention(
    op: LoweringBuilder,
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    key_padding: Optional[ir.Value],
    causal: bool,
    scale: float,
    block_mask: ir.Value,
    g: BlockGrid,
) -> ir.Value:
    """Attention over the kept key blocks only (see module doc).

    q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D|Dv], key_padding bool [B,Nk] (True = real) or None,
    block_mask bool broadcastable to [B,Hq,nqb,nkb] (blocks of ``g.q_block`` queries ×
    ``g.k_block`` keys). Token-level causal and padding masks apply inside kept blocks; rows with
    no kept, allowed key give 0. → out [B,Hq,Nq,Dv], equal to ``attention(..., keep=upsampled
    block_mask)``.
    """
    hq, hkv = op.facts.q_heads, op.facts.kv_heads
    rep = hq // hkv
    qbs, kbs = g.q_block, g.k_block
    zero, one = op.int_scalar(0), op.int_scalar(1)
    col = op.ints([0])
    last = op.ints([-1])
    nqb1, nkb1 = op.Unsqueeze(g.nqb, col), op.Unsqueeze(g.nkb, col)  # [1]
    sel = op.And(op.Expand(op.Cast(block_mask, to=ir.DataType.BOOL), _full_shape(op, q, g.nqb, g.nkb)), g.allowed)

    # 1. slots [B,Hq,nqb,K]: kept blocks wholly in the past first (no causal mask needed), then
    #    the blocks crossing the causal boundary (the same for every batch row and head)
    full = sel if g.partial is None else op.And(sel, op.Not(g.partial))
    idx, slot_ok = _kept_slots(op, full)
    if g.partial is not None:
        pidx, pok = _kept_slots(op, g.partial)  # [nqb, P]
        shape = op.Concat(op.dims(q, 0, 2), op.Shape(pidx), axis=0)
        pidx = op.Expand(pidx, shape)
        idx = op.Concat(idx, pidx, axis=-1)
        slot_ok = op.Concat(slot_ok, op.And(op.Expand(pok, shape), op.GatherElements(sel, pidx, axis=-1)), axis=-1)

    # 2. gather K/V blocks: flat block index (b·Hkv + h//rep)·nkb + idx
    total_k = op.Mul(nkb1, op.int_scalar(kbs))  # [1]
    b_ar = op.Range(zero, op.dim(q, 0), one)  # [B]
    head_kv = op.Constant(value=ir.tensor(np.arange(hq, dtype=np.int64) // rep))  # [Hq]
    base = op.Mul(op.Add(op.Unsqueeze(op.Mul(b_ar, op.int_scalar(hkv)), op.ints([1])),
                         op.Unsqueeze(head_kv, col)), g.nkb)  # [B,Hq]
    flat = op.Add(op.Unsqueeze(base, op.ints([2, 3])), idx)  # [B,Hq,nqb,S]
    d_k, d_v = op.dims(k, 3, 4), op.dims(v, 3, 4)
    kblocks = op.Reshape(_pad_rows(op, k, total_k), op.Concat(op.ints([-1, kbs]), d_k, axis=0))
    vblocks = op.Reshape(_pad_rows(op, v, total_k), op.Concat(op.ints([-1, kbs]), d_v, axis=0))
    lead = op.Concat(op.dims(q, 0, 2), nqb1, last, axis=0)  # [B,Hq,nqb,S·kbs]
    kg = op.Reshape(op.Gather(kblocks, flat, axis=0), op.Concat(lead, d_k, axis=0))
    vg = op.Reshape(op.Gather(vblocks, flat, axis=0), op.Concat(lead, d_v, axis=0))

    # token validity of each gathered key: slot used, real (not padding), inside Nk
    t_k = op.Range(zero, op.int_scalar(kbs), one)  # [kbs]
    kpos = op.Add(op.Unsqueeze(op.Mul(idx, op.int_scalar(kbs)), op.ints([4])), t_k)  # [B,Hq,nqb,S,kbs]
    ok = op.And(op.Unsqueeze(slot_ok, op.ints([4])), op.Less(kpos, op.dim(k, 2)))
    if key_padding is not None:
        kp = op.Cast(key_padding, to=ir.DataType.BOOL)  # [B,Nk]
        kp = op.Pad(kp, op.Concat(op.ints([0, 0, 0]), op.Sub(total_k, op.dims(k, 2, 3)), axis=0),
                    op.Constant(value=ir.tensor(np.array(False))))
        kp = op.Reshape(kp, op.ints([-1, kbs]))  # [B·nkb, kbs]
        bflat = op.Add(op.Unsqueeze(op.Mul(b_ar, g.nkb), op.ints([1, 2, 3])), idx)  # [B,Hq,nqb,S]
        ok = op.And(ok, op.Gather(kp, bflat, axis=0))
    ok = op.Reshape(ok, lead)  # [B,Hq,nqb,S·kbs]
    kpos = op.Reshape(kpos, lead)

    # 3. scores per query block [B,Hq,nqb,qbs,S·kbs] + additive masks, softmax, P·V
    total_q = op.Mul(nqb1, op.int_scalar(qbs))
    qs = op.Mul(q, op.scalar(scale, q))
    qs = op.Reshape(_pad_rows(op, qs, total_q), op.Concat(op.dims(q, 0, 2), nqb1, op.ints([qbs]), op.dims(q, 3, 4),
                                                            axis=0))
    z = op.MatMul(qs, op.Transpose(kg, perm=[0, 1, 2, 4, 3]))
    neg_inf, zero_f = op.scalar(-math.inf, q), op.scalar(0.0, q)
    z = op.Add(z, op.Unsqueeze(op.Where(ok, zero_f, neg_inf), op.ints([3])))
    # query position of row r of block i: (Nk − Nq) + i·qbs + r
    qpos = op.Add(op.Sub(op.dim(k, 2), op.dim(q, 2)),
                  op.Add(op.Unsqueeze(op.Mul(g.qb, op.int_scalar(qbs)), op.ints([1])),
                         op.Unsqueeze(op.Range(zero, op.int_scalar(qbs), one), col)))  # [nqb,qbs]
    if g.partial is not None:
        # causal bias [nqb,qbs,S·kbs]: 0 on the past slots, causal on the boundary slots
        n_past = op.Mul(op.Sub(op.dims(idx, 3, 4), op.dims(pidx, 3, 4)), op.int_scalar(kbs))  # [1]
        ppos = op.Reshape(op.Add(op.Unsqueeze(op.Mul(op.Slice(pidx, op.ints([0, 0]), op.ints([1, 1]),
                                                              op.ints([0, 1])), op.int_scalar(kbs)),
                                              op.ints([4])), t_k),
                          op.Concat(nqb1, op.ints([1, -1]), axis=0))  # [nqb,1,P·kbs]
        cbias = op.Where(op.Greater(ppos, op.Unsqueeze(qpos, op.ints([2]))), neg_inf, zero_f)  # [nqb,qbs,P·kbs]
        zeros = op.CastLike(op.ConstantOfShape(op.Concat(nqb1, op.ints([qbs]), n_past, axis=0)), q)
        z = op.Add(z, op.Concat(zeros, cbias, axis=-1))
    pr = op.Softmax(z, axis=-1)  # rows with no key are NaN here and zeroed below
    o = op.MatMul(pr, vg)  # [B,Hq,nqb,qbs,Dv]
    if g.partial is not None:
        big = op.Constant(value=ir.tensor(np.array(INT64_MAX, dtype=np.int64)))
        first = op.ReduceMin(op.Where(ok, kpos, big), last, keepdims=1)  # [B,Hq,nqb,1] earliest usable key
        row_ok = op.LessOrEqual(first, qpos)  # [B,Hq,nqb,qbs]
    else:
        row_ok = op.Cast(op.ReduceMax(op.Cast(ok, to=ir.DataType.INT32), last, keepdims=1), to=ir.DataType.BOOL)
    o = op.Where(op.Unsqueeze(row_ok, op.ints([4])), o, zero_f)
    o = op.Reshape(o, op.Concat(op.dims(q, 0, 2), last, d_v, axis=0))
    return op.Slice(o, op.ints([0]), op.dims(q, 2, 3), op.ints([2]))


def _kept_slots(op: LoweringBuilder, keep: ir.Value) -> tuple[ir.Value, ir.Value]:
    """Indices of the True entries of ``keep`` [..., n] along the last axis, ascending, padded to
    the largest row count (at least 1) with False entries: (idx [..., K] int64, used [..., K] bool)."""
    n = op.dims(keep, -1)
    counts = op.ReduceSum(op.Cast(keep, to=ir.DataType.INT64), op.ints([-1]), keepdims=0)
    kmax = op.Max(op.Reshape(op.ReduceMax(counts, keepdims=0, noop_with_empty_axes=0), op.ints([1])), op.ints([1]))
    kmax = op.Min(kmax, n)
    idx = op.TopK(op.Cast(keep, to=ir.DataType.FLOAT), kmax, axis=-1, largest=1, sorted=1, _outputs=2)[1]
    return idx, op.GatherElements(keep, idx, axis=-1)
