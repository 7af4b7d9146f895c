"""ONNX lowering of ``knn``: the token keep mask of its reference, masked attention.

Declared in :data:`LOWERINGS`, which :meth:`surgeon.attention.base.Variant.lowerings`
reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.
"""
from __future__ import annotations

import math
from typing import Optional

import onnx_ir as ir

from surgeon.exporters.onnx_blocks import ceil_fraction
from surgeon.exporters.onnx_kit import (
    LoweringBuilder,
    allowed_mask,
    gqa_apply,
    is_finite,
    modulator_edits,
    neg_inf_like,
    ones_row,
    params_of,
    repeat_heads,
    scaled_logits,
)


def lower_knn(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
              attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
              block_mask: Optional[ir.Value]) -> ir.Value:
    """K-NN context attention: each query keeps every allowed key whose logit is ≥ its K-th
    largest allowed logit (K = top_k or ⌈frac · n_allowed⌉), plus with ``context_token`` the
    mean key/value column over its allowed keys. → [B,Hq,Nq,Dv]."""
    p = params_of(config)
    edits = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    z = scaled_logits(op, q, k, attn_mask, scale)  # [B,Hq,Nq,Nk]
    if edits.logit_edit is not None:  # the edited logits are the ones ranked (as the reference)
        z = edits.logit_edit(z)
    allow = allowed_mask(op, q, k, key_padding, attn_mask, causal)  # None or broadcastable bool
    ninf = neg_inf_like(op, z)
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
        w = ones_row(op, k, q) if allow is None else op.CastLike(allow, q)  # broadcastable [.., Nq|1, Nk]
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


LOWERINGS = {"knn": {"mask": lower_knn}}
