"""ONNX lowerings of the selection variants ``token_topk``, ``knn`` and ``dhsa``.

Each builds, in standard ONNX ops, the token-level keep mask of its variant's ``reference``
(surgeon/attention/<name>/__init__.py) and runs masked dense attention, the same correctness-
first scheme as the sparse lowerings of :mod:`surgeon.exporters.onnx_lowering` (see its module
docstring for the lowering contract). Selections that the reference makes as index lists
(``torch.sort`` / ``torch.topk`` plus data-dependent slicing) are expressed with static-rank
tensors: a full ``TopK`` over the last axis gives the order, ``ScatterElements`` of a range
turns it into each element's rank, and "rank < budget" is the selection. ONNX ``TopK`` breaks
ties toward the lower index, as the references' stable sorts do.

A site's modulators (config ``modulators``) are composed through ``modulator_edits``, applied
where each reference applies the AttnContext hooks. Imported at the end of
:mod:`surgeon.exporters.onnx_lowering` so the decorators register.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import onnx_ir as ir

from surgeon.exporters.onnx_lowering import (
    _INT64_MAX,
    LoweringBuilder,
    _ones_row,
    _params,
    allowed_mask,
    attention,
    block_grid,
    gqa_apply,
    gqa_scores,
    is_finite,
    pooled_rows,
    positions,
    register_lowering,
    repeat_heads,
    scaled_logits,
    sink_local_blocks,
    upsample_block_mask,
)

# --------------------------------------------------------------------------- shared pieces


def exact_query_weights(op: LoweringBuilder, q: ir.Value, k: ir.Value, key_padding: Optional[ir.Value],
                        causal: bool) -> ir.Value:
    """Real-query weights [B|1, Nq], exactly ``geometry.query_validity``: the last Nq
    entries of key_padding when causal or when Nq == Nk (decided at run time, so a model with
    distinct symbolic lengths still matches when they happen to be equal), else ones."""
    ones = _ones_row(op, q, q)
    if key_padding is None:
        return ones
    start = op.Sub(op.dims(k, 2, 3), op.dims(q, 2, 3))
    tail = op.CastLike(op.Slice(key_padding, start, op.ints([_INT64_MAX]), op.ints([1])), q)  # [B,Nq]
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
    ar = op.Expand(op.Range(op.int_scalar(0), _last_dim(op, scores), op.int_scalar(1)), op.Shape(order))
    return vals, order, op.ScatterElements(ar, order, ar, axis=-1)


def _last_dim(op: LoweringBuilder, x: ir.Value) -> ir.Value:
    """``Shape(x)[-1]`` as a 0-D int64."""
    return op.Squeeze(op.Shape(x, start=-1), op.ints([0]))


def ceil_fraction(op: LoweringBuilder, n: ir.Value, frac: float) -> ir.Value:
    """⌈frac · n − 1e−9⌉ computed in float64, as int64 (the references' budget rounding)."""
    x = op.Mul(op.Cast(n, to=ir.DataType.DOUBLE), op.Constant(value=ir.tensor(np.array(float(frac)))))
    x = op.Sub(x, op.Constant(value=ir.tensor(np.array(1e-9))))
    return op.Cast(op.Ceil(x), to=ir.DataType.INT64)


def _neg_inf(op: LoweringBuilder, like: ir.Value) -> ir.Value:
    return op.scalar(-math.inf, like)


def _site_edits(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                causal: bool, scale: float, config: str) -> Any:
    """The site's composed modulator edits (``onnx_lowering.modulator_edits``; empty without
    modulators). Imported here, not at module level, so this module never blocks importing
    :mod:`surgeon.exporters.onnx_lowering`."""
    from surgeon.exporters.onnx_lowering import modulator_edits

    return modulator_edits(op, q, k, v, key_padding, causal, scale, config)


# --------------------------------------------------------------------------- token_topk

@register_lowering("token_topk")
def lower_token_topk(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                     attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                     block_mask: Optional[ir.Value]) -> ir.Value:
    """TokenSelect (``token_topk.select_tokens`` as a mask): per query chunk, init keys
    [0, min(n_init, lim)), local keys [max(n_init', lim − n_local), lim), causal the chunk's own
    keys, plus the top-budget candidates [n_init, lim − n_local) (real keys) by the soft vote
    Σ_h softmax_j(q̄_h·k_j); lim = chunk start (causal) or Nk. → [B,Hq,Nq,Dv]."""
    p = _params(config)
    c = int(p.chunk)
    g = block_grid(op, q, k, c, c, causal)  # query chunks = query blocks of size c
    nk = op.dim(k, 2)
    if causal:
        lim, end = g.q_first, op.Add(g.q_last, op.int_scalar(1))
    else:
        lim = op.Expand(nk, op.Shape(g.q_first))
        end = lim
    _, kpos = positions(op, q, k)
    j = op.Unsqueeze(kpos, op.ints([0]))  # [1,Nk]
    col = op.ints([1])
    lim_c = op.Unsqueeze(lim, col)  # [ng,1]
    n_i = op.Min(lim, op.int_scalar(int(p.n_init)))
    init = op.Less(j, op.Unsqueeze(n_i, col))
    lo = op.Max(n_i, op.Sub(lim, op.int_scalar(int(p.n_local))))
    local = op.And(op.GreaterOrEqual(j, op.Unsqueeze(lo, col)), op.Less(j, lim_c))
    keep = op.Or(init, local)  # [ng,Nk]
    if causal:  # the chunk's own keys [first, first + chunk) (the causal mask trims them per row)
        first = op.Unsqueeze(g.q_first, col)
        own = op.And(op.GreaterOrEqual(j, first), op.Less(j, op.Add(first, op.int_scalar(c))))
        keep = op.Or(keep, own)
    keep = op.Unsqueeze(keep, op.ints([0]))  # [1,ng,Nk]

    voting = (p.keep > 0) or int(p.top_k) > 0
    if voting:
        cand = op.And(op.GreaterOrEqual(j, op.int_scalar(int(p.n_init))),
                      op.Less(j, op.Sub(lim_c, op.int_scalar(int(p.n_local)))))  # [ng,Nk]
        cand = op.Unsqueeze(cand, op.ints([0]))  # [1,ng,Nk]
        if key_padding is not None:
            cand = op.And(cand, op.Unsqueeze(op.Cast(key_padding, to=ir.DataType.BOOL), op.ints([1])))  # [B,ng,Nk]
        qbar, _ = pooled_rows(op, q, exact_query_weights(op, q, k, key_padding, causal), g.nqb, c, causal)
        s_h = gqa_scores(op, qbar, k)  # [B,Hq,ng,Nk], no scale (TokenSelect's kernel)
        cand4 = op.Unsqueeze(cand, op.ints([1]))
        s_h = op.Where(cand4, s_h, _neg_inf(op, s_h))
        mx = op.ReduceMax(s_h, op.ints([-1]), keepdims=1)
        mx = op.Where(is_finite(op, mx), mx, op.scalar(0.0, mx))
        e = op.Exp(op.Sub(s_h, mx))
        den = op.ReduceSum(e, op.ints([-1]), keepdims=1)
        den = op.Where(op.Greater(den, op.scalar(0.0, den)), den, op.scalar(1.0, den))
        vote = op.ReduceSum(op.Div(e, den), op.ints([1]), keepdims=0)  # [B,ng,Nk]
        vote = op.Where(cand, vote, _neg_inf(op, vote))
        if p.keep > 0:
            kcnt = op.Unsqueeze(ceil_fraction(op, end, float(p.keep)), col)  # [ng,1]
        else:
            kcnt = op.int_scalar(int(p.top_k))
        _, _, ranks = ranks_of(op, vote)
        voted = op.And(op.Less(ranks, kcnt), op.Greater(vote, _neg_inf(op, vote)))
        keep = op.Or(keep, voted)  # [B|1,ng,Nk]

    rows = op.Div(op.Range(op.int_scalar(0), op.dim(q, 2), op.int_scalar(1)), op.int_scalar(c))
    keep = op.Unsqueeze(op.Gather(keep, rows, axis=1), op.ints([1]))  # [B|1,1,Nq,Nk]
    edits = _site_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **edits.kwargs())


# --------------------------------------------------------------------------- knn

@register_lowering("knn")
def lower_knn(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
              attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
              block_mask: Optional[ir.Value]) -> ir.Value:
    """K-NN context attention: each query keeps every allowed key whose logit is ≥ its K-th
    largest allowed logit (K = top_k or ⌈frac · n_allowed⌉), plus with ``context_token`` the
    mean key/value column over its allowed keys. → [B,Hq,Nq,Dv]."""
    p = _params(config)
    edits = _site_edits(op, q, k, v, key_padding, causal, scale, config)
    z = scaled_logits(op, q, k, attn_mask, scale)  # [B,Hq,Nq,Nk]
    if edits.logit_edit is not None:  # the edited logits are the ones ranked (as the reference)
        z = edits.logit_edit(z)
    allow = allowed_mask(op, q, k, key_padding, attn_mask, causal)  # None or broadcastable bool
    ninf = _neg_inf(op, z)
    if allow is None:
        zm = z
        n_allow = op.Unsqueeze(op.dim(k, 2), op.ints([0]))  # [1]
    else:
        zm = op.Where(allow, z, ninf)
        n_allow = op.ReduceSum(op.Cast(allow, to=ir.DataType.INT64), op.ints([-1]), keepdims=1)
    if int(p.top_k) > 0:
        kk = op.Min(n_allow, op.int_scalar(int(p.top_k)))
    else:
        kk = op.Min(ceil_fraction(op, n_allow, float(p.frac)), n_allow)
    kk = op.Expand(kk, op.Concat(op.Shape(zm, start=0, end=3), op.ints([1]), axis=0))  # [B,Hq,Nq,1]
    # The K-th largest of a row = element K−1 of the row's top-kmax values (kmax = max K ≥ 1).
    kmax = op.Max(op.ReduceMax(kk, op.ints([0, 1, 2, 3]), keepdims=0), op.int_scalar(1))
    vals = op.TopK(zm, op.Unsqueeze(kmax, op.ints([0])), axis=-1, largest=1, sorted=1, _outputs=2)[0]
    thr = op.GatherElements(vals, op.Max(op.Sub(kk, op.int_scalar(1)), op.int_scalar(0)), axis=-1)
    thr = op.Where(op.Greater(kk, op.int_scalar(0)), thr, op.scalar(math.inf, z))
    keep = op.GreaterOrEqual(zm, thr)
    if allow is not None:
        keep = op.And(keep, allow)
    zk = op.Where(keep, z, ninf)  # kept token logits
    mx = op.ReduceMax(zk, op.ints([-1]), keepdims=1)

    zc = vbar = None
    if p.context_token:  # mean key/value over the keys the query may see, logit q·k̄·scale (not edited)
        w = _ones_row(op, k, q) if allow is None else op.CastLike(allow, q)  # broadcastable [.., Nq|1, Nk]
        cnt = op.ReduceSum(w, op.ints([-1]), keepdims=1)
        cnt1 = op.Max(cnt, op.scalar(1.0, cnt))
        kbar = op.Div(op.MatMul(w, repeat_heads(op, k)), cnt1)  # [B,Hq,Nq|1,D]
        vbar = op.Div(op.MatMul(w, repeat_heads(op, v)), cnt1)
        zc = op.Mul(op.ReduceSum(op.Mul(q, kbar), op.ints([-1]), keepdims=1), op.scalar(scale, q))  # [B,Hq,Nq,1]
        zc = op.Where(op.Greater(cnt, op.scalar(0.0, cnt)), zc, ninf)
        mx = op.Max(mx, zc)
    mx = op.Where(is_finite(op, mx), mx, op.scalar(0.0, mx))
    e = op.Exp(op.Sub(zk, mx))
    den = op.ReduceSum(e, op.ints([-1]), keepdims=1)
    ec = None
    if zc is not None:
        ec = op.Exp(op.Sub(zc, mx))
        den = op.Add(den, ec)
    den = op.Where(op.Greater(den, op.scalar(0.0, den)), den, op.scalar(1.0, den))
    pt = op.Div(e, den)
    if edits.prob_edit is not None:  # token probabilities only; the context column is left as is
        pt = edits.prob_edit(pt)
    out = gqa_apply(op, pt, v)
    if ec is not None:
        out = op.Add(out, op.Mul(op.Div(ec, den), vbar))
    return out if edits.out_edit is None else edits.out_edit(out)


# --------------------------------------------------------------------------- dhsa

@register_lowering("dhsa")
def lower_dhsa(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
               attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
               block_mask: Optional[ir.Value]) -> ir.Value:
    """DHSA with fixed chunks (``dhsa.select_chunks`` as a mask): chunk similarity q̂·k̂ with
    k̂ = Σk/√|c| over real keys, whole key chunks taken best-first while the real keys of the
    better-ranked chunks are below the budget, plus sink/local/causal-boundary chunks.
    → [B,Hq,Nq,Dv]."""
    p = _params(config)
    c = int(p.chunk)
    g = block_grid(op, q, k, c, c, causal)
    qhat, _ = pooled_rows(op, q, exact_query_weights(op, q, k, key_padding, causal), g.nqb, c, causal)
    kw = _ones_row(op, k, k) if key_padding is None else op.CastLike(key_padding, k)
    ksum, kcnt = block_row_sums(op, k, kw, g.nkb, c)  # [B,Hkv,nkc,D], [B|1,1,nkc,1]
    khat = op.Div(ksum, op.Sqrt(op.Max(kcnt, op.scalar(1.0, kcnt))))
    s = gqa_scores(op, qhat, khat)  # [B,Hq,nqc,nkc]
    cnt_row = op.Transpose(kcnt, perm=[0, 1, 3, 2])  # [B|1,1,1,nkc]
    forced = sink_local_blocks(op, g, int(p.sink_chunks), int(p.local_chunks))  # ∧ allowed
    if g.partial is not None:
        forced = op.Or(forced, g.partial)  # partial ⊂ allowed
    s = op.Where(op.And(g.allowed, op.Greater(cnt_row, op.scalar(0.0, cnt_row))), s, _neg_inf(op, s))
    s = op.Where(forced, op.scalar(math.inf, s), s)
    if causal:
        visible = op.Add(g.q_last, op.int_scalar(1))
    else:
        visible = op.Expand(op.dim(k, 2), op.Shape(g.q_last))
    if int(p.budget_tokens) > 0:
        nb = op.Constant(value=ir.tensor(np.array(float(p.budget_tokens))))
    else:
        nb = op.Cast(ceil_fraction(op, visible, float(p.budget)), to=ir.DataType.DOUBLE)
        nb = op.Unsqueeze(nb, op.ints([1]))  # [nqc,1]
    vals, order, ranks = ranks_of(op, s)
    sizes = op.GatherElements(op.Expand(op.Cast(cnt_row, to=ir.DataType.DOUBLE), op.Shape(s)), order, axis=-1)
    before = op.CumSum(sizes, op.int_scalar(-1), exclusive=1)  # real keys in better-ranked chunks
    take = op.And(op.Less(before, nb), op.Greater(vals, _neg_inf(op, vals)))  # in rank order
    take = op.Cast(op.GatherElements(op.Cast(take, to=ir.DataType.INT64), ranks, axis=-1), to=ir.DataType.BOOL)
    sel = op.Or(take, forced)
    keep = upsample_block_mask(op, sel, q, k, c, c)
    edits = _site_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **edits.kwargs())
