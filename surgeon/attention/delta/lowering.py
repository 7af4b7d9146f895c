"""ONNX lowering of ``delta`` and ``delta_sparse``: token-mask bodies, and delta_sparse's gathered body.

Declared in :data:`LOWERINGS`, which :meth:`surgeon.attention.base.Variant.lowerings`
reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir

from surgeon.errors import BadInput
from surgeon.exporters.onnx_blocks import (
    BlockGrid,
    block_grid,
    gathered_block_attention,
    keep_counts,
    needs_token_mask,
    query_weights,
    real_blocks,
    recent_blocks,
    select_top,
    upsample_block_mask,
)
from surgeon.exporters.onnx_kit import (
    LoweringBuilder,
    allowed_mask,
    attention,
    gqa_apply,
    masked_softmax,
    modulator_edits,
    params_of,
    scaled_logits,
)


def delta_page_scores(op: LoweringBuilder, a: ir.Value, q: ir.Value, k: ir.Value, key_padding: Optional[ir.Value],
                      causal: bool, g: BlockGrid, score_queries: int) -> ir.Value:
    """DELTA page scores [B, nqb, npages] (``delta.page_scores``) from the dense probabilities
    a [B,Hq,Nq,Nk]: Σ over the block's scoring rows and the page's keys of max over heads."""
    sq = score_queries
    nq = op.dim(q, 2)
    ar = op.Unsqueeze(op.Constant(value=ir.tensor(np.arange(sq, dtype=np.int64))), op.ints([0]))  # [1,sq]
    first = op.Unsqueeze(op.Mul(g.qb, op.int_scalar(g.q_block)), op.ints([1]))  # [nqb,1] row index
    if causal:
        rows = op.Add(op.Sub(first, op.int_scalar(sq - 1)), ar)
        in_range = op.GreaterOrEqual(rows, op.int_scalar(0))
    else:
        rows = op.Add(first, ar)
        in_range = op.And(op.Less(rows, nq), op.Less(rows, op.Add(first, op.int_scalar(g.q_block))))
    rows = op.Max(op.Min(rows, op.Sub(nq, op.int_scalar(1))), op.int_scalar(0))  # [nqb,sq]
    weight = op.Unsqueeze(op.CastLike(in_range, a), op.ints([0]))  # [1,nqb,sq]
    if key_padding is not None and (causal or op.facts.self_attention):
        qv = query_weights(op, q, k, key_padding, causal)  # [B,Nq]
        weight = op.Mul(weight, op.Gather(qv, rows, axis=1))  # [B,nqb,sq]
    pr = op.ReduceMax(a, op.ints([1]), keepdims=0)  # [B,Nq,Nk]
    pr = op.Gather(pr, rows, axis=1)  # [B,nqb,sq,Nk]
    pr = op.Mul(pr, op.Unsqueeze(weight, op.ints([3])))
    total = op.Unsqueeze(op.Mul(g.nkb, op.int_scalar(g.k_block)), op.ints([0]))
    pr = op.Pad(pr, op.Concat(op.ints([0, 0, 0, 0, 0, 0, 0]), op.Sub(total, op.dims(k, 2, 3)), axis=0))
    shape = op.Concat(op.dims(pr, 0, 3), op.Unsqueeze(g.nkb, op.ints([0])), op.ints([g.k_block]), axis=0)
    return op.ReduceSum(op.Reshape(pr, shape, allowzero=1), op.ints([2, 4]), keepdims=0)


def lower_delta(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                block_mask: Optional[ir.Value]) -> tuple[ir.Value, ir.Value]:
    """DELTA Δ-layer: dense attention plus one page set per query block (top pages by the
    dense probabilities, sink/recent pages forced), repeated over heads. The output composes
    the site's modulators; the page scores use the unmodulated probabilities (``page_scores``
    never sees the hooks). → (out [B,Hq,Nq,Dv], page mask bool [B,Hq,nqb,npages])."""
    p = params_of(config)
    z = scaled_logits(op, q, k, attn_mask, scale)
    allow = allowed_mask(op, q, k, key_padding, attn_mask, causal)
    a = masked_softmax(op, z, allow)
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    am = a if not mods.logit else masked_softmax(op, mods.logit_edit(z), allow)
    if mods.prob:
        am = mods.prob_edit(am)
    out = gqa_apply(op, am, v)
    if mods.out:
        out = mods.out_edit(out)
    g = block_grid(op, q, k, int(p.q_block), int(p.page_size), causal)
    scores = op.Unsqueeze(delta_page_scores(op, a, q, k, key_padding, causal, g, int(p.score_queries)),
                          op.ints([1]))  # [B,1,nqb,npg]
    if key_padding is None:
        candidate = op.Constant(value=ir.tensor(np.array(True)))
    else:
        candidate = op.Unsqueeze(real_blocks(op, key_padding, g, k), op.ints([1, 2]))  # [B,1,1,npg]
    forced = recent_blocks(op, g, int(p.sink_pages), int(p.recent_pages) * int(p.page_size))
    sel = select_top(op, scores, g.allowed, forced, candidate, keep_counts(op, [float(p.keep)], g.allowed))
    shape = op.Concat(op.dims(sel, 0, 1), op.ints([op.facts.q_heads]), op.dims(sel, 2), axis=0)
    return out, op.Expand(sel, shape)


def lower_delta_sparse(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                       attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                       block_mask: Optional[ir.Value]) -> ir.Value:
    """DELTA sparse layer: attention over the incoming page mask ∪ sink/recent pages, with the
    site's modulators. → [B,Hq,Nq,Dv]."""
    if block_mask is None:
        raise BadInput("delta_sparse needs the page mask of its Δ-layer",
                       "rewrite with a delta layer before this layer")
    p = params_of(config)
    g = block_grid(op, q, k, int(p.q_block), int(p.page_size), causal)
    bm = op.Or(op.Cast(block_mask, to=ir.DataType.BOOL),
               recent_blocks(op, g, int(p.sink_pages), int(p.recent_pages) * int(p.page_size)))
    keep = upsample_block_mask(op, bm, q, k, int(p.q_block), int(p.page_size))
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **mods.kwargs())


def lower_delta_sparse_gather(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value,
                              key_padding: Optional[ir.Value], attn_mask: Optional[ir.Value], causal: bool,
                              scale: float, config: str, block_mask: Optional[ir.Value]) -> ir.Value:
    """``delta_sparse``: the Δ-layer's page mask ∪ sink/recent pages, gathered. → [B,Hq,Nq,Dv]."""
    if block_mask is None or needs_token_mask(op, attn_mask, config):
        return lower_delta_sparse(op, q, k, v, key_padding, attn_mask, causal, scale, config, block_mask)
    p = params_of(config)
    g = block_grid(op, q, k, int(p.q_block), int(p.page_size), causal)
    bm = op.Or(op.Cast(block_mask, to=ir.DataType.BOOL),
               recent_blocks(op, g, int(p.sink_pages), int(p.recent_pages) * int(p.page_size)))
    return gathered_block_attention(op, q, k, v, key_padding, causal, scale, bm, g)


LOWERINGS = {"delta": {"mask": lower_delta},
             "delta_sparse": {"mask": lower_delta_sparse, "gather": lower_delta_sparse_gather}}
