"""ONNX lowering of ``pyramid``: the keep mask over its bank of pooled levels, masked attention.

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

import numpy as np
import onnx_ir as ir

from surgeon.attention.ops import parse_config
from surgeon.errors import BadInput
from surgeon.exporters.onnx_blocks import (
    F32,
    block_grid,
    descending_ranks,
    pooled_rows,
    query_weights,
    real_key_weights,
)
from surgeon.exporters.onnx_kit import (
    LoweringBuilder,
    gqa_apply,
    gqa_scores,
    masked_softmax,
    ones_row,
    params_of,
    positions,
)


def pyramid_levels(op: LoweringBuilder, q: ir.Value, k: ir.Value, key_padding: Optional[ir.Value], causal: bool,
                   scale: float, bs: int, intervals) -> ir.Value:
    """``pyramid.assign_levels``: level per (query block, key block), int64 [B,Hq,nqb,nkb] in
    {0, 1, 2, 4, 8}, causal rule applied (future blocks 0, blocks reaching the query block's
    first position 1)."""
    g = block_grid(op, q, k, bs, bs, causal)
    partial = None
    if causal:  # pyramid's rule: the key block's last key reaches the block's first query
        partial = op.And(g.allowed, op.GreaterOrEqual(op.Unsqueeze(g.k_end, op.ints([0])),
                                                       op.Unsqueeze(g.q_first, op.ints([1]))))
    qbar, _ = pooled_rows(op, q, query_weights(op, q, k, key_padding, causal), g.nqb, bs, causal)
    kw = ones_row(op, k, k) if key_padding is None else op.CastLike(key_padding, k)
    kbar, kcnt = pooled_rows(op, k, kw, g.nkb, bs, False)  # [B,Hkv,nkb,D], [B|1,1,nkb,1]
    has_real = op.Transpose(op.Greater(kcnt, op.scalar(0.0, kcnt)), perm=[0, 1, 3, 2])  # [B|1,1,1,nkb]
    s = op.Mul(gqa_scores(op, qbar, kbar), op.scalar(scale, q))  # [B,Hq,nqb,nkb]
    s = op.Where(op.And(g.allowed, has_real), s, op.scalar(-math.inf, s))
    if partial is not None:
        s = op.Where(partial, op.scalar(math.inf, s), s)
    ranks = descending_ranks(op, s)
    n = op.Cast(op.ReduceSum(op.Cast(g.allowed, to=ir.DataType.INT64), op.ints([-1]), keepdims=0),
                to=ir.DataType.DOUBLE)  # [nqb]
    eps = op.Constant(value=ir.tensor(np.array(1e-9)))

    def bound(frac: float) -> ir.Value:  # ⌈n·frac − 1e−9⌉ per row, [nqb, 1]
        x = op.Sub(op.Mul(n, op.Constant(value=ir.tensor(np.array(float(frac))))), eps)
        return op.Unsqueeze(op.Cast(op.Ceil(x), to=ir.DataType.INT64), op.ints([1]))

    zero = op.int_scalar(0)
    lv = op.Mul(ranks, zero)
    for f, lo, hi in intervals:
        inside = op.And(op.GreaterOrEqual(ranks, bound(lo)), op.Less(ranks, bound(hi)))
        lv = op.Where(inside, op.int_scalar(int(f)), lv)
    lv = op.Where(op.Greater(s, op.scalar(-math.inf, s)), lv, zero)
    if partial is not None:
        lv = op.Where(partial, op.int_scalar(1), lv)
    return op.Where(g.allowed, lv, zero)


def pyramid_bank(op: LoweringBuilder, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value], nkb: ir.Value,
                 bs: int, levels: tuple[int, ...]) -> dict[str, ir.Value]:
    """``pyramid.build_bank``: every level's pooled keys/values side by side along the key axis.

    The keys are padded to npad = nkb·bs; level f splits them into npad/f groups of f
    consecutive tokens; a group's k̄, v̄ are the means over its real tokens (accumulated in
    float32, then cast back to k's type; a float64 model would pool in float32 here where the
    reference pools in float64), its bias ``ln c`` (c real tokens, −inf when c = 0).
    Returns k [B,Hkv,M,D], v [B,Hkv,M,Dv], bias [B|1,M] (k's type), and int64 [M] ``level``,
    ``block`` (key block) and ``pos`` (position of the group's last token).
    """
    npad = op.Unsqueeze(op.Mul(nkb, op.int_scalar(bs)), op.ints([0]))  # [1]
    tail = op.Sub(npad, op.dims(k, 2, 3))
    w = op.Pad(real_key_weights(op, k, key_padding), op.Concat(op.ints([0, 0, 0]), tail, axis=0))  # [B|1,npad]
    real4 = op.Unsqueeze(op.Greater(w, op.Constant(value_float=0.0)), op.ints([1, 3]))  # [B|1,1,npad,1]
    pad4 = op.Concat(op.ints([0, 0, 0, 0, 0, 0]), tail, op.ints([0]), axis=0)
    zero32 = op.Constant(value_float=0.0)
    ks = op.Where(real4, op.Pad(op.Cast(k, to=F32), pad4), zero32)
    vs = op.Where(real4, op.Pad(op.Cast(v, to=F32), pad4), zero32)
    kk, vv, bias, lvl, blk, pos = [], [], [], [], [], []
    zero, one = op.int_scalar(0), op.int_scalar(1)
    for f in levels:
        ng = op.Mul(nkb, op.int_scalar(bs // f))  # 0-D: groups of this level
        ng1 = op.Unsqueeze(ng, op.ints([0]))
        cnt = op.ReduceSum(op.Reshape(w, op.Concat(op.dims(w, 0, 1), ng1, op.ints([f]), axis=0), allowzero=1),
                           op.ints([-1]), keepdims=0)  # [B|1, ng]
        div = op.Unsqueeze(op.Max(cnt, op.Constant(value_float=1.0)), op.ints([1, 3]))  # [B|1,1,ng,1]

        def pool(x: ir.Value) -> ir.Value:
            shape = op.Concat(op.dims(x, 0, 2), ng1, op.ints([f]), op.dims(x, 3), axis=0)
            return op.Div(op.ReduceSum(op.Reshape(x, shape, allowzero=1), op.ints([3]), keepdims=0), div)

        kk.append(op.CastLike(pool(ks), k))
        vv.append(op.CastLike(pool(vs), v))
        bias.append(op.Where(op.Greater(cnt, zero32), op.Log(op.Max(cnt, op.Constant(value_float=1.0))),
                             op.Constant(value_float=-math.inf)))
        gi = op.Range(zero, ng, one)
        start = op.Mul(gi, op.int_scalar(f))
        lvl.append(op.Expand(op.ints([f]), ng1))
        blk.append(op.Div(start, op.int_scalar(bs)))
        pos.append(op.Add(start, op.int_scalar(f - 1)))
    return {"k": op.Concat(*kk, axis=2), "v": op.Concat(*vv, axis=2), "bias": op.CastLike(op.Concat(*bias, axis=1), k),
            "level": op.Concat(*lvl, axis=0), "block": op.Concat(*blk, axis=0), "pos": op.Concat(*pos, axis=0)}


def pooled_bool_mask(op: LoweringBuilder, attn_mask: ir.Value, q: ir.Value, k: ir.Value, nkb: ir.Value, bs: int,
                     levels: tuple[int, ...]) -> ir.Value:
    """Bool [B|1,H|1,Nq,M]: a bool ``attn_mask`` over the bank (a group passes only if the mask
    allows every token of it; positions past Nk count as allowed), as ``pyramid_reference``."""
    nq = op.dims(q, 2, 3)
    ones = op.ConstantOfShape(op.Concat(op.ints([1, 1]), nq, op.dims(k, 2, 3), axis=0),
                              value=ir.tensor(np.array([1.0], dtype=np.float32)))
    am = op.Mul(op.Cast(op.Cast(attn_mask, to=ir.DataType.BOOL), to=F32), ones)  # [B|1,H|1,Nq,Nk]
    npad = op.Unsqueeze(op.Mul(nkb, op.int_scalar(bs)), op.ints([0]))
    am = op.Pad(am, op.Concat(op.ints([0, 0, 0, 0, 0, 0, 0]), op.Sub(npad, op.dims(k, 2, 3)), axis=0),
                op.Constant(value_float=1.0))
    parts = []
    for f in levels:
        ng = op.Unsqueeze(op.Mul(nkb, op.int_scalar(bs // f)), op.ints([0]))
        shape = op.Concat(op.dims(am, 0, 3), ng, op.ints([f]), axis=0)
        parts.append(op.ReduceMin(op.Reshape(am, shape, allowzero=1), op.ints([-1]), keepdims=0))
    return op.Greater(op.Concat(*parts, axis=-1), op.Constant(value_float=0.5))


def lower_pyramid(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                  attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                  block_mask: Optional[ir.Value]) -> ir.Value:
    """PSA pyramid attention: levels per (query block, key block) from pooled-QK ranks, then
    softmax over the bank of all levels' pooled keys (logit ``q·k̄·scale + ln c``), keeping a
    bank entry for query row i when its key block's level for row i's block equals its level,
    it holds a real token and (causal) its last token is not after the query. → [B,Hq,Nq,Dv].

    A site with modulators is refused, as the reference refuses a modulated context."""
    mods = [str(m.get("variant")) for m in (parse_config(config)[2].get("modulators") or [])]
    if mods:
        where = f"site '{op.site}'" if op.site else "a site"
        raise BadInput(f"{where} uses variant 'pyramid' with modulator(s) {', '.join(mods)}: pyramid attends pooled "
                       f"keys, which per-token modulation hooks cannot edit (the PyTorch op refuses it too)",
                       "remove the modulators from this site's policy entry, or compose them with a token-level "
                       "variant (e.g. block_topk) instead of pyramid")
    if attn_mask is not None and not op.facts.attn_mask_bool:
        raise BadInput("pyramid cannot pool a float attn_mask",
                       "use a bool attn_mask at this site, or another variant")
    p = params_of(config)
    bs = int(p.block_size)
    levels = p.levels_used()
    lv = pyramid_levels(op, q, k, key_padding, causal, scale, bs, p.intervals)  # [B,Hq,nqb,nkb]
    g = block_grid(op, q, k, bs, bs, causal)
    bank = pyramid_bank(op, k, v, key_padding, g.nkb, bs, levels)
    bias4 = op.Unsqueeze(bank["bias"], op.ints([1, 2]))  # [B|1,1,1,M]
    z = op.Add(op.Mul(gqa_scores(op, q, bank["k"]), op.scalar(scale, q)), bias4)  # [B,Hq,Nq,M]
    keep = op.Equal(op.Gather(lv, bank["block"], axis=3), bank["level"])  # [B,Hq,nqb,M]
    keep = op.And(keep, op.Greater(bias4, op.scalar(-math.inf, bias4)))
    rows = op.Div(op.Range(op.int_scalar(0), op.dim(q, 2), op.int_scalar(1)), op.int_scalar(bs))
    keep = op.Gather(keep, rows, axis=2)  # [B,Hq,Nq,M]
    if causal:
        qpos, _ = positions(op, q, k)
        keep = op.And(keep, op.LessOrEqual(op.Unsqueeze(bank["pos"], op.ints([0])), op.Unsqueeze(qpos, op.ints([1]))))
    if attn_mask is not None:
        keep = op.And(keep, pooled_bool_mask(op, attn_mask, q, k, g.nkb, bs, levels))
    return gqa_apply(op, masked_softmax(op, z, keep), bank["v"])


LOWERINGS = {"pyramid": {"mask": lower_pyramid}}
