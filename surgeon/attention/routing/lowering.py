"""ONNX lowering of ``routing``: the token keep mask of its routed regions, masked attention.

Declared in :data:`LOWERINGS`, which :meth:`surgeon.attention.base.Variant.lowerings`
reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.

Modulators (config ``modulators``), as the torch references treat them: ``routing`` attends
token keys through ``attention_from_keep``, so its lowering applies the composed edits of
:func:`surgeon.exporters.onnx_kit.modulator_edits` at the same places (logits over the
token keys after scaling, probabilities, output). ``pyramid`` attends pooled keys, which
per-token hooks cannot edit: its reference refuses a modulated context (BadInput), and so does
its lowering, with the reference's reason, rather than export a body torch would not run.
"""
from __future__ import annotations

import math
from typing import Optional

import onnx_ir as ir

from surgeon.errors import BadInput
from surgeon.exporters.onnx_blocks import descending_ranks, real_key_weights
from surgeon.exporters.onnx_kit import (
    LoweringBuilder,
    attention,
    gqa_scores,
    modulator_edits,
    params_of,
    positions,
)


def routing_regions(op: LoweringBuilder, k: ir.Value, p) -> tuple[ir.Value, int]:
    """``routing.grid_of``: region of each key position, int64 [Nk] (−1 for the ``n_extra``
    leading tokens), and the region count R = n_win². The grid comes from the parameters:
    grid_h × grid_w, one of them inferred from Nk − n_extra, or a square when both are 0
    (the reference's BadInput for a length that fits no grid cannot be raised at run time)."""
    nw, x = int(p.n_win), int(p.n_extra)
    gh, gw = int(p.grid_h), int(p.grid_w)
    if gh and gw and nw > min(gh, gw):
        raise BadInput(f"routing: n_win={nw} is out of range for a {gh}x{gw} grid", f"use n_win in [1, {min(gh, gw)}]")
    nk = op.dim(k, 2)
    n = op.Sub(nk, op.int_scalar(x))
    if gh == 0 and gw == 0:
        side = op.Cast(op.Floor(op.Sqrt(op.Cast(n, to=ir.DataType.DOUBLE))), to=ir.DataType.INT64)
        h = w = side
    elif gh == 0:
        h, w = op.Div(n, op.int_scalar(gw)), op.int_scalar(gw)
    elif gw == 0:
        h, w = op.int_scalar(gh), op.Div(n, op.int_scalar(gh))
    else:
        h, w = op.int_scalar(gh), op.int_scalar(gw)
    nws = op.int_scalar(nw)
    t = op.Sub(op.Range(op.int_scalar(0), nk, op.int_scalar(1)), op.int_scalar(x))
    grid = op.GreaterOrEqual(t, op.int_scalar(0))
    t = op.Max(t, op.int_scalar(0))
    ry = op.Mul(op.Div(op.Mul(op.Div(t, w), nws), h), nws)
    rx = op.Div(op.Mul(op.Mod(t, w), nws), w)
    return op.Where(grid, op.Add(ry, rx), op.int_scalar(-1)), nw * nw


def _top_regions(op: LoweringBuilder, s: ir.Value, topk: int) -> ir.Value:
    """``routing._top_regions``: bool, the top-``topk`` entries of the last axis (ties toward the
    lower index) that are above −inf."""
    return op.And(op.Less(descending_ranks(op, s), op.int_scalar(topk)), op.Greater(s, op.scalar(-math.inf, s)))


def lower_routing(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                  attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                  block_mask: Optional[ir.Value]) -> ir.Value:
    """BiFormer routing: non-causal, each region keeps its top-k regions by the head-summed
    pooled affinity Σ_h (Q^r_h·scale)·K^r_{g(h)}; causal, each query token keeps its top-k
    regions by Σ_h q_{h,i}·K^r_{g(h)}(i)·scale (K^r(i): the region's real keys up to i).
    Tokens attend to the tokens of their kept regions; the extra leading tokens attend to and
    are attended by everything. The site's modulators edit the token logits, probabilities and
    output of that attention (the routing itself never sees them), as the reference's
    ``attention_from_keep``. → [B,Hq,Nq,Dv]."""
    p = params_of(config)
    if not causal and not op.facts.self_attention:
        raise BadInput("routing: a non-causal site needs as many queries as keys",
                       "route self-attention sites only (q and k on one sequence axis)")
    reg, r = routing_regions(op, k, p)
    greg = op.Max(reg, op.int_scalar(0))
    onehot = op.CastLike(op.Equal(op.Unsqueeze(reg, op.ints([1])),
                                  op.Unsqueeze(op.Range(op.int_scalar(0), op.int_scalar(r), op.int_scalar(1)),
                                               op.ints([0]))), q)  # [Nk, R]
    kw = op.CastLike(real_key_weights(op, k, key_padding), q)  # [B|1, Nk]
    hq, hkv = op.facts.q_heads, op.facts.kv_heads
    one = op.scalar(1.0, q)
    if causal:
        q5 = op.Reshape(q, op.Concat(op.dims(q, 0, 1), op.ints([hkv, hq // hkv]), op.dims(q, 2), axis=0),
                        allowzero=1)
        qs = op.ReduceSum(q5, op.ints([2]), keepdims=0)  # [B,Hkv,Nq,D]: Σ over each KV head's queries
        zs = op.ReduceSum(op.MatMul(qs, op.Transpose(k, perm=[0, 1, 3, 2])), op.ints([1]), keepdims=0)  # [B,Nq,Nk]
        qpos, kpos = positions(op, q, k)
        vis = op.CastLike(op.LessOrEqual(op.Unsqueeze(kpos, op.ints([0])), op.Unsqueeze(qpos, op.ints([1]))), q)
        mf = op.Mul(op.Unsqueeze(vis, op.ints([0])), op.Unsqueeze(kw, op.ints([1])))  # [B|1,Nq,Nk]
        num = op.MatMul(op.Mul(zs, mf), onehot)  # [B,Nq,R]
        cnt = op.MatMul(mf, onehot)  # [B|1,Nq,R]
        s = op.Mul(op.Div(num, op.Max(cnt, one)), op.scalar(scale, q))
        s = op.Where(op.Equal(cnt, op.scalar(0.0, q)), op.scalar(-math.inf, q), s)
        sel = _top_regions(op, s, int(p.topk))  # [B,Nq,R]
        keep = op.Gather(sel, greg, axis=2)  # [B,Nq,Nk]
        qreg = op.Gather(reg, qpos, axis=0)
    else:
        qw = kw  # real queries: self-attention, so query_validity is key_padding
        onehot_t = op.Unsqueeze(op.Transpose(onehot, perm=[1, 0]), op.ints([0]))  # [1,R,N]

        def region_means(x: ir.Value, wts: ir.Value) -> tuple[ir.Value, ir.Value]:
            m = op.Mul(onehot_t, op.Unsqueeze(wts, op.ints([1])))  # [B|1,R,N]
            c = op.ReduceSum(m, op.ints([-1]), keepdims=0)  # [B|1,R]
            mean = op.Div(op.MatMul(op.Unsqueeze(m, op.ints([1])), x), op.Unsqueeze(op.Max(c, one), op.ints([1, 3])))
            return mean, c  # [B,H,R,D]

        qr, _ = region_means(q, qw)
        kr, kcnt = region_means(k, kw)
        a = op.ReduceSum(gqa_scores(op, op.Mul(qr, op.scalar(scale, q)), kr), op.ints([1]), keepdims=0)  # [B,R,R]
        a = op.Where(op.Unsqueeze(op.Equal(kcnt, op.scalar(0.0, q)), op.ints([1])), op.scalar(-math.inf, q), a)
        sel = _top_regions(op, a, int(p.topk))  # [B,R,R]
        qpos, _ = positions(op, q, k)
        qreg = op.Gather(reg, qpos, axis=0)
        keep = op.Gather(op.Gather(sel, op.Max(qreg, op.int_scalar(0)), axis=1), greg, axis=2)  # [B,Nq,Nk]
    extra_key = op.Unsqueeze(op.Less(reg, op.int_scalar(0)), op.ints([0]))  # [1,Nk]
    extra_query = op.Unsqueeze(op.Less(qreg, op.int_scalar(0)), op.ints([1]))  # [Nq,1]
    keep = op.Or(op.Or(keep, extra_key), extra_query)
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, op.Unsqueeze(keep, op.ints([1])),
                     **mods.kwargs())


LOWERINGS = {"routing": {"mask": lower_routing}}
