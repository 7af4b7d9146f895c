"""ONNX lowering of ``token_topp``: the token keep mask of its reference, masked attention.

``token_topk``'s lowering with the mass budget: the chunk's token keep mask (init, local, the
chunk's own keys when causal) plus the voted candidates whose rank is below the top-p count —
sorted votes by ``TopK``, their exclusive ``CumSum`` in float64 against p · total, bounded by
min/max tokens — then masked attention with the site's modulator edits. → [B,Hq,Nq,Dv].

Declared in :data:`LOWERINGS`, which :meth:`surgeon.attention.base.Variant.lowerings`
reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir

from surgeon.exporters.onnx_blocks import block_grid, exact_query_weights, pooled_rows, ranks_of
from surgeon.exporters.onnx_kit import (
    LoweringBuilder,
    attention,
    gqa_scores,
    masked_softmax,
    modulator_edits,
    neg_inf_like,
    params_of,
    positions,
)


def _f64(op: LoweringBuilder, x: float) -> ir.Value:
    return op.Constant(value=ir.tensor(np.array(float(x), dtype=np.float64)))


def lower_token_topp(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                     attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                     block_mask: Optional[ir.Value]) -> ir.Value:
    p = params_of(config)
    c = int(p.chunk)
    g = block_grid(op, q, k, c, c, causal)
    nk = op.dim(k, 2)
    lim = g.q_first if causal else op.Expand(nk, op.Shape(g.q_first))
    _, kpos = positions(op, q, k)
    j = op.Unsqueeze(kpos, op.ints([0]))  # [1,Nk]
    col = op.ints([1])
    lim_c = op.Unsqueeze(lim, col)
    n_i = op.Min(lim, op.int_scalar(int(p.n_init)))
    init = op.Less(j, op.Unsqueeze(n_i, col))
    lo = op.Max(n_i, op.Sub(lim, op.int_scalar(int(p.n_local))))
    local = op.And(op.GreaterOrEqual(j, op.Unsqueeze(lo, col)), op.Less(j, lim_c))
    keep = op.Or(init, local)  # [ng,Nk]
    if causal:
        first = op.Unsqueeze(g.q_first, col)
        keep = op.Or(keep, op.And(op.GreaterOrEqual(j, first), op.Less(j, op.Add(first, op.int_scalar(c)))))
    keep = op.Unsqueeze(keep, op.ints([0]))  # [1,ng,Nk]

    cand = op.And(op.GreaterOrEqual(j, op.int_scalar(int(p.n_init))),
                  op.Less(j, op.Sub(lim_c, op.int_scalar(int(p.n_local)))))
    cand = op.Unsqueeze(cand, op.ints([0]))  # [1,ng,Nk]
    if key_padding is not None:
        cand = op.And(cand, op.Unsqueeze(op.Cast(key_padding, to=ir.DataType.BOOL), op.ints([1])))
    qbar, _ = pooled_rows(op, q, exact_query_weights(op, q, k, key_padding, causal), g.nqb, c, causal)
    s_h = gqa_scores(op, qbar, k)  # [B,Hq,ng,Nk]
    if p.scaled:
        s_h = op.Mul(s_h, op.scalar(scale, q))
    vote = op.ReduceSum(masked_softmax(op, s_h, op.Unsqueeze(cand, op.ints([1]))), op.ints([1]), keepdims=0)
    vote = op.Where(cand, vote, neg_inf_like(op, vote))  # [B,ng,Nk]
    sv, _, ranks = ranks_of(op, vote)
    is_c = op.Greater(sv, neg_inf_like(op, sv))
    v64 = op.Cast(op.Where(is_c, sv, op.scalar(0.0, sv)), to=ir.DataType.DOUBLE)
    total = op.ReduceSum(v64, op.ints([-1]), keepdims=1)
    before = op.CumSum(v64, op.int_scalar(-1), exclusive=1)
    n_all = op.ReduceSum(op.Cast(is_c, to=ir.DataType.INT64), op.ints([-1]), keepdims=0)  # [B,ng]
    if float(p.p) >= 1.0:
        n = n_all
    else:
        need = op.And(op.Less(before, op.Mul(total, _f64(op, float(p.p)))), is_c)
        n = op.ReduceSum(op.Cast(need, to=ir.DataType.INT64), op.ints([-1]), keepdims=0)
    n = op.Max(n, op.int_scalar(int(p.min_tokens)))
    if int(p.max_tokens):
        n = op.Min(n, op.int_scalar(int(p.max_tokens)))
    n = op.Min(n, n_all)
    voted = op.And(op.Less(ranks, op.Unsqueeze(n, op.ints([-1]))), op.Greater(vote, neg_inf_like(op, vote)))
    keep = op.Or(keep, voted)  # [B,ng,Nk]

    rows = op.Div(op.Range(op.int_scalar(0), op.dim(q, 2), op.int_scalar(1)), op.int_scalar(c))
    keep = op.Unsqueeze(op.Gather(keep, rows, axis=1), op.ints([1]))  # [B,1,Nq,Nk]
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **mods.kwargs())


LOWERINGS = {"token_topp": {"mask": lower_token_topp}}
