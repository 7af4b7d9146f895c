"""ONNX lowering of ``dhsa``: the token keep mask of its reference, masked attention.

Declared in :data:`LOWERINGS`, which :meth:`surgeon.attention.base.Variant.lowerings`
reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import onnx_ir as ir

from surgeon.exporters.onnx_blocks import (
    block_grid,
    block_row_sums,
    ceil_fraction,
    exact_query_weights,
    pooled_rows,
    ranks_of,
    sink_local_blocks,
    upsample_block_mask,
)
from surgeon.exporters.onnx_kit import (
    LoweringBuilder,
    attention,
    gqa_scores,
    modulator_edits,
    neg_inf_like,
    ones_row,
    params_of,
)


def lower_dhsa(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
               attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
               block_mask: Optional[ir.Value]) -> ir.Value:
    """DHSA with fixed chunks (``dhsa.select_chunks`` as a mask): chunk similarity q̂·k̂ with
    k̂ = Σk/√|c| over real keys, whole key chunks taken best-first while the real keys of the
    better-ranked chunks are below the budget, plus sink/local/causal-boundary chunks.
    → [B,Hq,Nq,Dv]."""
    p = params_of(config)
    c = int(p.chunk)
    g = block_grid(op, q, k, c, c, causal)
    qhat, _ = pooled_rows(op, q, exact_query_weights(op, q, k, key_padding, causal), g.nqb, c, causal)
    kw = ones_row(op, k, k) if key_padding is None else op.CastLike(key_padding, k)
    ksum, kcnt = block_row_sums(op, k, kw, g.nkb, c)  # [B,Hkv,nkc,D], [B|1,1,nkc,1]
    khat = op.Div(ksum, op.Sqrt(op.Max(kcnt, op.scalar(1.0, kcnt))))
    s = gqa_scores(op, qhat, khat)  # [B,Hq,nqc,nkc]
    cnt_row = op.Transpose(kcnt, perm=[0, 1, 3, 2])  # [B|1,1,1,nkc]
    forced = sink_local_blocks(op, g, int(p.sink_chunks), int(p.local_chunks))  # ∧ allowed
    if g.partial is not None:
        forced = op.Or(forced, g.partial)  # partial ⊂ allowed
    s = op.Where(op.And(g.allowed, op.Greater(cnt_row, op.scalar(0.0, cnt_row))), s, neg_inf_like(op, s))
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
    take = op.And(op.Less(before, nb), op.Greater(vals, neg_inf_like(op, vals)))  # in rank order
    take = op.Cast(op.GatherElements(op.Cast(take, to=ir.DataType.INT64), ranks, axis=-1), to=ir.DataType.BOOL)
    sel = op.Or(take, forced)
    keep = upsample_block_mask(op, sel, q, k, c, c)
    edits = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **edits.kwargs())


LOWERINGS = {"dhsa": {"mask": lower_dhsa}}
