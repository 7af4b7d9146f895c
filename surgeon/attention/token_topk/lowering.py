"""ONNX lowering of ``token_topk``: the token keep mask of its reference, masked attention.

Declared in :data:`LOWERINGS`, which :meth:`surgeon.attention.base.Variant.lowerings`
reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.
"""
from __future__ import annotations

from typing import Optional

import onnx_ir as ir

from surgeon.exporters.onnx_blocks import (
    block_grid,
    ceil_fraction,
    exact_query_weights,
    pooled_rows,
    ranks_of,
)
from surgeon.exporters.onnx_kit import (
    LoweringBuilder,
    attention,
    gqa_scores,
    is_finite,
    modulator_edits,
    neg_inf_like,
    params_of,
    positions,
)


def lower_token_topk(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                     attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                     block_mask: Optional[ir.Value]) -> ir.Value:
    """TokenSelect (``token_topk.select_tokens`` as a mask): per query chunk, init keys
    [0, min(n_init, lim)), local keys [max(n_init', lim − n_local), lim), causal the chunk's own
    keys, plus the top-budget candidates [n_init, lim − n_local) (real keys) by the soft vote
    Σ_h softmax_j(q̄_h·k_j); lim = chunk start (causal) or Nk. → [B,Hq,Nq,Dv]."""
    p = params_of(config)
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
        s_h = op.Where(cand4, s_h, neg_inf_like(op, s_h))
        mx = op.ReduceMax(s_h, op.ints([-1]), keepdims=1)
        mx = op.Where(is_finite(op, mx), mx, op.scalar(0.0, mx))
        e = op.Exp(op.Sub(s_h, mx))
        den = op.ReduceSum(e, op.ints([-1]), keepdims=1)
        den = op.Where(op.Greater(den, op.scalar(0.0, den)), den, op.scalar(1.0, den))
        vote = op.ReduceSum(op.Div(e, den), op.ints([1]), keepdims=0)  # [B,ng,Nk]
        vote = op.Where(cand, vote, neg_inf_like(op, vote))
        if p.keep > 0:
            kcnt = op.Unsqueeze(ceil_fraction(op, end, float(p.keep)), col)  # [ng,1]
        else:
            kcnt = op.int_scalar(int(p.top_k))
        _, _, ranks = ranks_of(op, vote)
        voted = op.And(op.Less(ranks, kcnt), op.Greater(vote, neg_inf_like(op, vote)))
        keep = op.Or(keep, voted)  # [B|1,ng,Nk]

    rows = op.Div(op.Range(op.int_scalar(0), op.dim(q, 2), op.int_scalar(1)), op.int_scalar(c))
    keep = op.Unsqueeze(op.Gather(keep, rows, axis=1), op.ints([1]))  # [B|1,1,Nq,Nk]
    edits = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **edits.kwargs())


LOWERINGS = {"token_topk": {"mask": lower_token_topk}}
