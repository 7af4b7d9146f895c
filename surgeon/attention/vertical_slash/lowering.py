"""ONNX lowering of ``vertical_slash``: the token keep mask of its reference, masked attention.

The same estimate as :func:`surgeon.attention.vertical_slash.vs_scores` (estimator rows'
softmax; vertical scores summed over rows; slash scores by ``GatherElements`` of each row's
probabilities at pos − δ), the same top-k with forced sinks / local offsets (the shared
``select_top``: ``TopK`` ties toward the lower index), the token keep mask of
``pattern_keep`` and masked attention with the site's modulator edits. → [B,Hq,Nq,Dv].

Declared in :data:`LOWERINGS`, which :meth:`surgeon.attention.base.Variant.lowerings`
reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir

from surgeon.exporters.onnx_blocks import block_grid, exact_query_weights, select_top
from surgeon.exporters.onnx_kit import (
    LoweringBuilder,
    attention,
    gqa_scores,
    masked_softmax,
    modulator_edits,
    params_of,
    positions,
)


def lower_vertical_slash(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                         attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                         block_mask: Optional[ir.Value]) -> ir.Value:
    p = params_of(config)
    bs, t = int(p.block_size), int(p.last_q)
    zero, one = op.int_scalar(0), op.int_scalar(1)
    nq, nk = op.dim(q, 2), op.dim(k, 2)
    off = op.Sub(nk, nq)
    g = block_grid(op, q, k, bs, bs, causal)
    qb = g.qb
    end = op.Mul(qb, op.int_scalar(bs)) if causal else op.Sub(op.Min(op.Mul(op.Add(qb, one), op.int_scalar(bs)), nq), one)
    tt = op.Unsqueeze(op.Constant(value=ir.tensor(np.arange(t, dtype=np.int64))), op.ints([0]))  # [1,T]
    rows = op.Sub(op.Unsqueeze(end, op.ints([1])), tt)  # [nqb,T]
    ok = op.GreaterOrEqual(rows, zero)
    rows = op.Max(op.Min(rows, op.Sub(nq, one)), zero)
    qw = exact_query_weights(op, q, k, key_padding, causal)
    okb = op.And(op.Unsqueeze(ok, op.ints([0])), op.Greater(op.Gather(qw, rows, axis=1), op.scalar(0.0, qw)))
    see = op.Unsqueeze(okb, op.ints([3]))  # [B|1,nqb,T,1]
    if key_padding is not None:
        see = op.And(see, op.Unsqueeze(op.Cast(key_padding, to=ir.DataType.BOOL), op.ints([1, 2])))
    _, kpos = positions(op, q, k)
    pos = op.Add(off, rows)  # [nqb,T]
    if causal:
        see = op.And(see, op.LessOrEqual(op.Unsqueeze(kpos, op.ints([0, 1])), op.Unsqueeze(pos, op.ints([2]))))
    qs = op.Gather(q, op.Reshape(rows, op.ints([-1])), axis=2)
    z = op.Mul(gqa_scores(op, qs, k), op.scalar(scale, q))
    z = op.Reshape(z, op.Concat(op.dims(q, 0, 2), op.Unsqueeze(g.nqb, op.ints([0])), op.ints([t]), op.dims(k, 2, 3),
                                axis=0), allowzero=1)
    pr = masked_softmax(op, z, op.Unsqueeze(see, op.ints([1])))  # [B,Hq,nqb,T,Nk]
    vsc = op.ReduceSum(pr, op.ints([3]), keepdims=0)  # [B,Hq,nqb,Nk]
    # slash scores over offset index o = pos − j + Nq − 1, δ = o − (Nq − 1)
    n_o = op.Sub(op.Add(nk, nq), one)
    delta = op.Sub(op.Range(zero, n_o, one), op.Sub(nq, one))  # [O]
    key = op.Sub(op.Unsqueeze(pos, op.ints([2])), op.Unsqueeze(delta, op.ints([0, 1])))  # [nqb,T,O]
    inside = op.And(op.GreaterOrEqual(key, zero), op.Less(key, nk))
    kc = op.Max(op.Min(key, op.Sub(nk, one)), zero)
    kc = op.Expand(op.Unsqueeze(kc, op.ints([0, 1])), op.Concat(op.dims(pr, 0, 4), op.Unsqueeze(n_o, op.ints([0])),
                                                              axis=0))
    gathered = op.GatherElements(pr, kc, axis=4)
    ssc = op.ReduceSum(op.Where(op.Unsqueeze(inside, op.ints([0, 1])), gathered, op.scalar(0.0, pr)), op.ints([3]),
                       keepdims=0)  # [B,Hq,nqb,O]

    jrow = op.Unsqueeze(kpos, op.ints([0]))  # [1,Nk]
    if causal:
        allow_v = op.LessOrEqual(jrow, op.Unsqueeze(g.q_first, op.ints([1])))
    else:
        allow_v = op.Expand(op.Constant(value=ir.tensor(np.array(True))),
                            op.Concat(op.Unsqueeze(g.nqb, op.ints([0])), op.dims(k, 2, 3), axis=0))
    force_v = op.And(allow_v, op.Less(jrow, op.int_scalar(int(p.sink_tokens))))
    kreal = (op.Constant(value=ir.tensor(np.array(True))) if key_padding is None
             else op.Unsqueeze(op.Cast(key_padding, to=ir.DataType.BOOL), op.ints([1, 2])))
    kv = op.Add(op.ReduceSum(op.Cast(force_v, to=ir.DataType.INT64), op.ints([-1]), keepdims=0),
                op.int_scalar(int(p.n_vertical)))
    vert = select_top(op, vsc, allow_v, force_v, kreal, kv)
    drow = op.Unsqueeze(delta, op.ints([0]))  # [1,O]
    if causal:
        allow_s = op.And(op.GreaterOrEqual(drow, zero), op.LessOrEqual(drow, op.Unsqueeze(g.q_last, op.ints([1]))))
        force_s = op.And(allow_s, op.Less(drow, op.int_scalar(int(p.local))))
    else:
        allow_s = op.Expand(op.Constant(value=ir.tensor(np.array(True))),
                            op.Concat(op.Unsqueeze(g.nqb, op.ints([0])), op.Unsqueeze(n_o, op.ints([0])), axis=0))
        force_s = op.And(allow_s, op.Less(op.Abs(drow), op.int_scalar(int(p.local))))
    ks = op.Add(op.ReduceSum(op.Cast(force_s, to=ir.DataType.INT64), op.ints([-1]), keepdims=0),
                op.int_scalar(int(p.n_slash)))
    slash = select_top(op, ssc, allow_s, force_s, op.Constant(value=ir.tensor(np.array(True))), ks)

    blk = op.Div(op.Range(zero, nq, one), op.int_scalar(bs))
    vtok = op.Gather(vert, blk, axis=2)  # [B,Hq,Nq,Nk]
    stok = op.Gather(slash, blk, axis=2)  # [B,Hq,Nq,O]
    qpos, _ = positions(op, q, k)
    o = op.Add(op.Sub(op.Unsqueeze(qpos, op.ints([1])), jrow), op.Sub(nq, one))  # [Nq,Nk]
    o = op.Expand(o, op.Concat(op.dims(stok, 0, 3), op.dims(k, 2, 3), axis=0))
    keep = op.Or(vtok, op.GatherElements(stok, o, axis=3))
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **mods.kwargs())


LOWERINGS = {"vertical_slash": {"mask": lower_vertical_slash}}
