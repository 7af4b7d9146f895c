"""Fast ONNX lowerings of the block-sparse variants: gather the kept key blocks, never N×N.

The lowerings in :mod:`surgeon.exporters.onnx_lowering` for ``block_topk``, ``reuse`` and
``delta_sparse`` compute the block selection and then run *dense* masked attention with the
selection upsampled to a token mask [B,Hq,Nq,Nk]: correct, but slower than dense attention in
onnxruntime (an N×N score matrix plus the mask). The bodies here compute the same selection
and then attend only to the kept blocks, with standard ONNX ops:

1. ``K = max over rows of the number of kept blocks`` (a 0-D value: the bodies stay dynamic);
   ``TopK`` of the 0/1 selection [B,Hq,nqb,nkb] gives each query block's kept block indices
   [B,Hq,nqb,K] (kept blocks first, ascending; the remaining slots are unkept blocks and are
   masked out).
2. K and V, padded to ``nkb·k_block`` keys, are viewed as a list of blocks [B·Hkv·nkb, k_block, D]
   and ``Gather``-ed by ``(b·Hkv + h // (Hq/Hkv))·nkb + index`` → [B,Hq,nqb,K·k_block,D]
   (GQA: a query head reads its KV head's blocks; nothing is repeated per head up front).
3. Per query block: scores [B,Hq,nqb,q_block,K·k_block] = MatMul, token masks (unused slots,
   padding keys, keys past Nk, causal positions) as -inf, the masked softmax of
   :func:`surgeon.exporters.onnx_lowering.masked_softmax` (rows with no key give 0), MatMul with
   the gathered V, reshape to [B,Hq,Nq,Dv].

Work and memory are O(Nq · K · k_block) instead of O(Nq · Nk). The result equals the op's
reference (same kept keys, same softmax) up to float rounding; the returned block mask is the
same selection bit for bit. Sites with an explicit ``attn_mask`` or composed modulators keep
the token-mask lowering (the gathered body does not apply them).

Use :func:`register_fast_lowerings` (idempotent) before exporting; :func:`use_lowerings`
switches between these bodies ("gather") and the token-mask ones ("mask") for comparisons.
"""
from __future__ import annotations

import contextlib
import json
import math
from typing import Iterator, Optional

import numpy as np
import onnx_ir as ir
import torch

from surgeon.errors import BadInput
from surgeon.exporters import onnx_lowering as L

_INT64_MAX = 2**63 - 1
FAST_VARIANTS = ("block_topk", "reuse", "delta_sparse")


def _needs_token_mask(op: L.LoweringBuilder, attn_mask: Optional[ir.Value], config: str) -> bool:
    """Whether a site must keep the token-mask body: an explicit attn_mask or modulators."""
    return attn_mask is not None or bool(json.loads(config).get("modulators"))


def _full_shape(op: L.LoweringBuilder, q: ir.Value, nqb: ir.Value, nkb: ir.Value) -> ir.Value:
    """[B, Hq, nqb, nkb] as a 1-D int64 shape."""
    col = op.ints([0])
    return op.Concat(op.dims(q, 0, 2), op.Unsqueeze(nqb, col), op.Unsqueeze(nkb, col), axis=0)


def _pad_rows(op: L.LoweringBuilder, x: ir.Value, total: ir.Value) -> ir.Value:
    """Zero-pad axis 2 of a rank-4 x [B,H,N,D] to ``total`` (1-D [1]) rows."""
    extra = op.Sub(total, op.dims(x, 2, 3))
    return op.Pad(x, op.Concat(op.ints([0, 0, 0, 0, 0, 0]), extra, op.ints([0]), axis=0))


def gathered_block_attention(
    op: L.LoweringBuilder,
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    key_padding: Optional[ir.Value],
    causal: bool,
    scale: float,
    block_mask: ir.Value,
    g: L.BlockGrid,
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
        big = op.Constant(value=ir.tensor(np.array(_INT64_MAX, dtype=np.int64)))
        first = op.ReduceMin(op.Where(ok, kpos, big), last, keepdims=1)  # [B,Hq,nqb,1] earliest usable key
        row_ok = op.LessOrEqual(first, qpos)  # [B,Hq,nqb,qbs]
    else:
        row_ok = op.Cast(op.ReduceMax(op.Cast(ok, to=ir.DataType.INT32), last, keepdims=1), to=ir.DataType.BOOL)
    o = op.Where(op.Unsqueeze(row_ok, op.ints([4])), o, zero_f)
    o = op.Reshape(o, op.Concat(op.dims(q, 0, 2), last, d_v, axis=0))
    return op.Slice(o, op.ints([0]), op.dims(q, 2, 3), op.ints([2]))


def _kept_slots(op: L.LoweringBuilder, keep: ir.Value) -> tuple[ir.Value, ir.Value]:
    """Indices of the True entries of ``keep`` [..., n] along the last axis, ascending, padded to
    the largest row count (at least 1) with False entries: (idx [..., K] int64, used [..., K] bool)."""
    n = op.dims(keep, -1)
    counts = op.ReduceSum(op.Cast(keep, to=ir.DataType.INT64), op.ints([-1]), keepdims=0)
    kmax = op.Max(op.Reshape(op.ReduceMax(counts, keepdims=0, noop_with_empty_axes=0), op.ints([1])), op.ints([1]))
    kmax = op.Min(kmax, n)
    idx = op.TopK(op.Cast(keep, to=ir.DataType.FLOAT), kmax, axis=-1, largest=1, sorted=1, _outputs=2)[1]
    return idx, op.GatherElements(keep, idx, axis=-1)


# --------------------------------------------------------------------------- the lowerings

def lower_block_topk_gather(op: L.LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value,
                            key_padding: Optional[ir.Value], attn_mask: Optional[ir.Value], causal: bool,
                            scale: float, config: str, block_mask: Optional[ir.Value]) -> tuple[ir.Value, ir.Value]:
    """``block_topk`` with the same selection as :func:`onnx_lowering.lower_block_topk`, then
    gathered attention. → (out [B,Hq,Nq,Dv], block mask bool [B,Hq,nqb,nkb])."""
    if _needs_token_mask(op, attn_mask, config):
        return L.lower_block_topk(op, q, k, v, key_padding, attn_mask, causal, scale, config, block_mask)
    from surgeon.attention.block_topk import head_fractions

    p = L._params(config)
    bs = int(p.block_size)
    fractions = head_fractions(p, op.facts.q_heads, torch.device("cpu")).tolist()
    g = L.block_grid(op, q, k, bs, bs, causal)
    qbar, _ = L.pooled_rows(op, q, L.query_weights(op, q, k, key_padding, causal), g.nqb, bs, causal)
    kw = L._ones_row(op, k, k) if key_padding is None else op.CastLike(key_padding, k)
    kbar, kcnt = L.pooled_rows(op, k, kw, g.nkb, bs, False)
    has_real = op.Transpose(op.Greater(kcnt, op.scalar(0.0, kcnt)), perm=[0, 1, 3, 2])
    logits = op.Mul(L.gqa_scores(op, qbar, kbar), op.scalar(scale, q))
    forced = L.sink_local_blocks(op, g, int(p.sink_blocks), int(p.local_blocks))
    if g.partial is not None:
        forced = op.Or(forced, g.partial)
    sel = L.select_top(op, logits, g.allowed, forced, has_real, L.keep_counts(op, fractions, g.allowed))
    return gathered_block_attention(op, q, k, v, key_padding, causal, scale, sel, g), sel


def lower_reuse_gather(op: L.LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value,
                       key_padding: Optional[ir.Value], attn_mask: Optional[ir.Value], causal: bool, scale: float,
                       config: str, block_mask: Optional[ir.Value]) -> ir.Value:
    """``reuse``: the anchor's block mask [B|1,Hq|1,nqb,nkb] ∪ sink/local blocks, gathered. → [B,Hq,Nq,Dv]."""
    if block_mask is None or _needs_token_mask(op, attn_mask, config):
        return L.lower_reuse(op, q, k, v, key_padding, attn_mask, causal, scale, config, block_mask)
    p = L._params(config)
    bs = int(p.block_size)
    g = L.block_grid(op, q, k, bs, bs, causal)
    bm = op.Or(op.Cast(block_mask, to=ir.DataType.BOOL), L.sink_local_blocks(op, g, int(p.sink_blocks),
                                                                             int(p.local_blocks)))
    return gathered_block_attention(op, q, k, v, key_padding, causal, scale, bm, g)


def lower_delta_sparse_gather(op: L.LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value,
                              key_padding: Optional[ir.Value], attn_mask: Optional[ir.Value], causal: bool,
                              scale: float, config: str, block_mask: Optional[ir.Value]) -> ir.Value:
    """``delta_sparse``: the Δ-layer's page mask ∪ sink/recent pages, gathered. → [B,Hq,Nq,Dv]."""
    if block_mask is None or _needs_token_mask(op, attn_mask, config):
        return L.lower_delta_sparse(op, q, k, v, key_padding, attn_mask, causal, scale, config, block_mask)
    p = L._params(config)
    g = L.block_grid(op, q, k, int(p.q_block), int(p.page_size), causal)
    bm = op.Or(op.Cast(block_mask, to=ir.DataType.BOOL),
               L.recent_blocks(op, g, int(p.sink_pages), int(p.recent_pages) * int(p.page_size)))
    return gathered_block_attention(op, q, k, v, key_padding, causal, scale, bm, g)


_FAST = {"block_topk": lower_block_topk_gather, "reuse": lower_reuse_gather,
         "delta_sparse": lower_delta_sparse_gather}
_MASK = {"block_topk": L.lower_block_topk, "reuse": L.lower_reuse, "delta_sparse": L.lower_delta_sparse}
LOWERING_MODES = ("gather", "mask")


def _install(table: dict) -> None:
    from surgeon.attention.registry import VARIANTS

    for name, fn in table.items():
        if name in VARIANTS:
            L.register_lowering(name)(fn)


def register_fast_lowerings() -> None:
    """Make the gathered bodies the lowerings of block_topk, reuse and delta_sparse (idempotent)."""
    _install(_FAST)


def current_mode() -> str:
    """"gather" when the fast bodies are registered for block_topk, else "mask"."""
    return "gather" if L._LOWERINGS.get("block_topk") is lower_block_topk_gather else "mask"


@contextlib.contextmanager
def use_lowerings(mode: str) -> Iterator[None]:
    """Within the block, lower the block-sparse variants with ``mode``: "gather" (this module)
    or "mask" (token-mask bodies of :mod:`onnx_lowering`); the previous choice is restored."""
    if mode not in LOWERING_MODES:
        raise BadInput(f"unknown block-sparse lowering '{mode}'", f"use one of: {', '.join(LOWERING_MODES)}")
    before = {n: L._LOWERINGS.get(n) for n in _FAST}
    _install(_FAST if mode == "gather" else _MASK)
    try:
        yield
    finally:
        for n, fn in before.items():
            if fn is None:
                L._LOWERINGS.pop(n, None)
            else:
                L._LOWERINGS[n] = fn
