"""ONNX lowering of ``block_topp``: the token-mask body and the gathered body.

Both bodies compute the same selection as :func:`surgeon.attention.block_topp.topp_block_mask`
(sampled-row estimator, top-p counts with ``TopK`` + exclusive ``CumSum`` in float64, then the
shared ``select_top``). The ``mask`` body attends through the upsampled token keep mask with the
site's modulator edits (the selection itself is never modulated, as in the reference); the
``gather`` body attends only to the kept blocks with the gathered block-sparse body of
:mod:`surgeon.exporters.onnx_blocks`, and falls back to the ``mask`` body on sites with an
explicit ``attn_mask`` or modulators.

Declared in :data:`LOWERINGS`, which :meth:`surgeon.attention.base.Variant.lowerings`
reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import onnx_ir as ir
import torch

from surgeon.exporters.onnx_blocks import (
    BlockGrid,
    block_grid,
    exact_query_weights,
    gathered_block_attention,
    needs_token_mask,
    ranks_of,
    real_blocks,
    select_top,
    sink_local_blocks,
    upsample_block_mask,
)
from surgeon.exporters.onnx_kit import (
    LoweringBuilder,
    attention,
    gqa_scores,
    masked_softmax,
    modulator_edits,
    params_of,
    positions,
)


def _f64(op: LoweringBuilder, x: float) -> ir.Value:
    return op.Constant(value=ir.tensor(np.array(float(x), dtype=np.float64)))


def estimate_block_mass(op: LoweringBuilder, q: ir.Value, k: ir.Value, key_padding: Optional[ir.Value], causal: bool,
                        scale: float, g: BlockGrid, stride: int) -> tuple[ir.Value, ir.Value]:
    """ONNX twin of ``block_topp.estimate_block_mass``: (mass [B,Hq,nqb,nkb] double,
    live [B|1,nqb] bool)."""
    bs = g.q_block
    t = math.ceil(bs / stride)
    zero, one = op.int_scalar(0), op.int_scalar(1)
    nq, nk = op.dim(q, 2), op.dim(k, 2)
    tt = op.Unsqueeze(op.Constant(value=ir.tensor(np.arange(t, dtype=np.int64) * stride)), op.ints([0]))  # [1,T]
    first = op.Unsqueeze(op.Mul(g.qb, op.int_scalar(bs)), op.ints([1]))  # [nqb,1]
    if causal:
        rows = op.Sub(first, tt)
        ok = op.GreaterOrEqual(rows, zero)
    else:
        rows = op.Add(first, tt)
        ok = op.Less(rows, op.Min(op.Add(first, op.int_scalar(bs)), nq))
    rows = op.Max(op.Min(rows, op.Sub(nq, one)), zero)  # [nqb,T]
    qw = exact_query_weights(op, q, k, key_padding, causal)  # [B|1,Nq]
    okb = op.And(op.Unsqueeze(ok, op.ints([0])), op.Greater(op.Gather(qw, rows, axis=1), op.scalar(0.0, qw)))
    see = op.Unsqueeze(okb, op.ints([3]))  # [B|1,nqb,T,1]
    if key_padding is not None:
        see = op.And(see, op.Unsqueeze(op.Cast(key_padding, to=ir.DataType.BOOL), op.ints([1, 2])))
    if causal:
        _, kpos = positions(op, q, k)
        pos = op.Add(op.Sub(nk, nq), rows)  # [nqb,T]
        see = op.And(see, op.LessOrEqual(op.Unsqueeze(kpos, op.ints([0, 1])), op.Unsqueeze(pos, op.ints([2]))))
    # scores of the sampled rows [B,Hq,nqb·T,Nk] → [B,Hq,nqb,T,Nk]
    qs = op.Gather(q, op.Reshape(rows, op.ints([-1])), axis=2)
    z = op.Mul(gqa_scores(op, qs, k), op.scalar(scale, q))
    z = op.Reshape(z, op.Concat(op.dims(q, 0, 2), op.Unsqueeze(g.nqb, op.ints([0])), op.ints([t]), op.dims(k, 2, 3),
                                axis=0), allowzero=1)
    see5 = op.Unsqueeze(see, op.ints([1]))  # [B|1,1,nqb,T,Nk]
    pr = masked_softmax(op, z, see5)
    total = op.Unsqueeze(op.Mul(g.nkb, op.int_scalar(bs)), op.ints([0]))
    pr = op.Pad(pr, op.Concat(op.ints([0, 0, 0, 0, 0, 0, 0, 0, 0]), op.Sub(total, op.dims(k, 2, 3)), axis=0))
    pr = op.Reshape(pr, op.Concat(op.dims(pr, 0, 4), op.Unsqueeze(g.nkb, op.ints([0])), op.ints([bs]), axis=0),
                    allowzero=1)
    blk = op.ReduceSum(op.Cast(op.ReduceSum(pr, op.ints([5]), keepdims=0), to=ir.DataType.DOUBLE), op.ints([3]),
                       keepdims=0)  # [B,Hq,nqb,nkb]
    seen = op.Cast(op.ReduceMax(op.Cast(see, to=ir.DataType.INT64), op.ints([3]), keepdims=0), to=ir.DataType.DOUBLE)
    cnt = op.ReduceSum(seen, op.ints([2]), keepdims=0)  # [B|1,nqb]
    mass = op.Div(blk, op.Unsqueeze(op.Max(cnt, _f64(op, 1.0)), op.ints([1, 3])))
    return mass, op.Greater(cnt, _f64(op, 0.0))


def topp_counts(op: LoweringBuilder, mass: ir.Value, allowed: ir.Value, forced: ir.Value, cand: ir.Value,
                masses: list[float]) -> ir.Value:
    """ONNX twin of ``block_topp.topp_counts``: [B,Hq,nqb] int64."""
    forced = op.And(forced, allowed)
    total = op.ReduceSum(op.Mul(mass, op.Cast(allowed, to=ir.DataType.DOUBLE)), op.ints([-1]), keepdims=0)
    mf = op.ReduceSum(op.Mul(mass, op.Cast(forced, to=ir.DataType.DOUBLE)), op.ints([-1]), keepdims=0)
    vals = op.Where(cand, mass, _f64(op, -1.0))
    sv, _, _ = ranks_of(op, vals)
    is_c = op.GreaterOrEqual(sv, _f64(op, 0.0))
    cum = op.CumSum(op.Max(sv, _f64(op, 0.0)), op.int_scalar(-1), exclusive=1)
    ph = op.Constant(value=ir.tensor(np.asarray(masses, dtype=np.float64).reshape(1, -1, 1, 1)))
    need = op.And(op.Less(op.Add(op.Unsqueeze(mf, op.ints([-1])), cum),
                          op.Mul(ph, op.Unsqueeze(total, op.ints([-1])))), is_c)
    n = op.ReduceSum(op.Cast(need, to=ir.DataType.INT64), op.ints([-1]), keepdims=0)
    n_all = op.ReduceSum(op.Cast(is_c, to=ir.DataType.INT64), op.ints([-1]), keepdims=0)
    full = op.Constant(value=ir.tensor(np.asarray([m >= 1.0 for m in masses]).reshape(1, -1, 1)))
    return op.Where(full, n_all, n)


def topp_selection(op: LoweringBuilder, q: ir.Value, k: ir.Value, key_padding: Optional[ir.Value], causal: bool,
                   scale: float, p, masses: list[float]) -> tuple[ir.Value, BlockGrid]:
    """(selection bool [B,Hq,nqb,nkb], grid) of ``block_topp.topp_block_mask``."""
    bs = int(p.block_size)
    g = block_grid(op, q, k, bs, bs, causal)
    mass, live = estimate_block_mass(op, q, k, key_padding, causal, scale, g, int(p.stride))
    forced = sink_local_blocks(op, g, int(p.sink_blocks), int(p.local_blocks))
    if g.partial is not None:
        forced = op.Or(forced, g.partial)
    if key_padding is None:
        has_real = op.Constant(value=ir.tensor(np.array(True)))
    else:
        has_real = op.Unsqueeze(real_blocks(op, key_padding, g, k), op.ints([1, 2]))  # [B,1,1,nkb]
    cand = op.And(op.And(g.allowed, op.Not(forced)), has_real)
    n_p = topp_counts(op, mass, g.allowed, forced, cand, masses)  # [B,Hq,nqb]
    n_cand = op.ReduceSum(op.Cast(cand, to=ir.DataType.INT64), op.ints([-1]), keepdims=0)  # [B|1,1|nqb..]
    dense_blk = op.Or(op.Unsqueeze(op.Less(g.q_last, op.int_scalar(int(p.dense_below))), op.ints([0])), op.Not(live))
    dense_blk = op.Unsqueeze(dense_blk, op.ints([1]))  # [B|1,1,nqb]
    n_forced = op.ReduceSum(op.Cast(forced, to=ir.DataType.INT64), op.ints([-1]), keepdims=0)  # [nqb]
    n_allowed = op.Cast(op.ReduceSum(op.Cast(g.allowed, to=ir.DataType.INT64), op.ints([-1]), keepdims=0),
                        to=ir.DataType.DOUBLE)

    def ceil_frac(frac: float) -> ir.Value:
        return op.Cast(op.Ceil(op.Sub(op.Mul(n_allowed, _f64(op, frac)), _f64(op, 1e-9))), to=ir.DataType.INT64)

    lo = op.Max(ceil_frac(float(p.min_fraction)), op.int_scalar(int(p.min_blocks)))
    hi = op.Max(ceil_frac(float(p.max_fraction)), n_forced)
    kept = op.Min(op.Max(op.Add(n_forced, op.Where(dense_blk, n_cand, n_p)), lo), hi)
    kept = op.Where(dense_blk, op.Add(n_forced, n_cand), kept)
    return select_top(op, mass, g.allowed, forced, has_real, kept), g


def lower_block_topp(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                     attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                     block_mask: Optional[ir.Value]) -> tuple[ir.Value, ir.Value]:
    """The top-p block selection as an upsampled token keep mask, masked attention with the
    site's modulators. → (out [B,Hq,Nq,Dv], block mask bool [B,Hq,nqb,nkb])."""
    from surgeon.attention.block_topp import head_masses

    p = params_of(config)
    bs = int(p.block_size)
    masses = head_masses(p, op.facts.q_heads, torch.device("cpu")).tolist()
    sel, _ = topp_selection(op, q, k, key_padding, causal, scale, p, masses)
    keep = upsample_block_mask(op, sel, q, k, bs, bs)
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **mods.kwargs()), sel


def lower_block_topp_gather(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value,
                            key_padding: Optional[ir.Value], attn_mask: Optional[ir.Value], causal: bool,
                            scale: float, config: str, block_mask: Optional[ir.Value]) -> tuple[ir.Value, ir.Value]:
    """``block_topp`` with the same selection as :func:`lower_block_topp`, then gathered
    attention over the kept blocks (the token-mask body where the site has an ``attn_mask`` or
    modulators). → (out [B,Hq,Nq,Dv], block mask bool [B,Hq,nqb,nkb])."""
    if needs_token_mask(op, attn_mask, config):
        return lower_block_topp(op, q, k, v, key_padding, attn_mask, causal, scale, config, block_mask)
    from surgeon.attention.block_topp import head_masses

    p = params_of(config)
    masses = head_masses(p, op.facts.q_heads, torch.device("cpu")).tolist()
    sel, g = topp_selection(op, q, k, key_padding, causal, scale, p, masses)
    return gathered_block_attention(op, q, k, v, key_padding, causal, scale, sel, g), sel


LOWERINGS = {"block_topp": {"mask": lower_block_topp, "gather": lower_block_topp_gather}}
