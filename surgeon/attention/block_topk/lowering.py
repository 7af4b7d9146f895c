"""ONNX lowering of ``block_topk``: the token-mask body and the gathered body.

Declared in :data:`LOWERINGS`, which :meth:`surgeon.attention.base.Variant.lowerings`
reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.
"""
from __future__ import annotations

from typing import Optional

import onnx_ir as ir
import torch

from surgeon.exporters.onnx_blocks import (
    block_grid,
    gathered_block_attention,
    keep_counts,
    needs_token_mask,
    pooled_rows,
    query_weights,
    select_top,
    sink_local_blocks,
    upsample_block_mask,
)
from surgeon.exporters.onnx_kit import (
    LoweringBuilder,
    attention,
    gqa_scores,
    modulator_edits,
    ones_row,
    params_of,
)


def lower_block_topk(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                     attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                     block_mask: Optional[ir.Value]) -> tuple[ir.Value, ir.Value]:
    """Pooled-QK block scores, top key blocks per query block (forced sink/local/causal-
    boundary blocks), token keep mask from the block mask, masked attention with the site's
    modulators (the selection itself is never modulated, as in the reference).
    → (out [B,Hq,Nq,Dv], block mask bool [B,Hq,nqb,nkb])."""
    from surgeon.attention.block_topk import head_fractions

    p = params_of(config)
    bs = int(p.block_size)
    fractions = head_fractions(p, op.facts.q_heads, torch.device("cpu")).tolist()
    g = block_grid(op, q, k, bs, bs, causal)
    qbar, _ = pooled_rows(op, q, query_weights(op, q, k, key_padding, causal), g.nqb, bs, causal)
    kw = ones_row(op, k, k) if key_padding is None else op.CastLike(key_padding, k)
    kbar, kcnt = pooled_rows(op, k, kw, g.nkb, bs, False)  # [B,Hkv,nkb,D], [B|1,1,nkb,1]
    has_real = op.Transpose(op.Greater(kcnt, op.scalar(0.0, kcnt)), perm=[0, 1, 3, 2])  # [B|1,1,1,nkb]
    logits = op.Mul(gqa_scores(op, qbar, kbar), op.scalar(scale, q))  # [B,Hq,nqb,nkb]
    forced = sink_local_blocks(op, g, int(p.sink_blocks), int(p.local_blocks))
    if g.partial is not None:
        forced = op.Or(forced, g.partial)
    sel = select_top(op, logits, g.allowed, forced, has_real, keep_counts(op, fractions, g.allowed))
    keep = upsample_block_mask(op, sel, q, k, bs, bs)
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **mods.kwargs()), sel


def lower_block_topk_gather(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value,
                            key_padding: Optional[ir.Value], attn_mask: Optional[ir.Value], causal: bool,
                            scale: float, config: str, block_mask: Optional[ir.Value]) -> tuple[ir.Value, ir.Value]:
    """``block_topk`` with the same selection as :func:`lower_block_topk`, then
    gathered attention. → (out [B,Hq,Nq,Dv], block mask bool [B,Hq,nqb,nkb])."""
    if needs_token_mask(op, attn_mask, config):
        return lower_block_topk(op, q, k, v, key_padding, attn_mask, causal, scale, config, block_mask)
    from surgeon.attention.block_topk import head_fractions

    p = params_of(config)
    bs = int(p.block_size)
    fractions = head_fractions(p, op.facts.q_heads, torch.device("cpu")).tolist()
    g = block_grid(op, q, k, bs, bs, causal)
    qbar, _ = pooled_rows(op, q, query_weights(op, q, k, key_padding, causal), g.nqb, bs, causal)
    kw = ones_row(op, k, k) if key_padding is None else op.CastLike(key_padding, k)
    kbar, kcnt = pooled_rows(op, k, kw, g.nkb, bs, False)
    has_real = op.Transpose(op.Greater(kcnt, op.scalar(0.0, kcnt)), perm=[0, 1, 3, 2])
    logits = op.Mul(gqa_scores(op, qbar, kbar), op.scalar(scale, q))
    forced = sink_local_blocks(op, g, int(p.sink_blocks), int(p.local_blocks))
    if g.partial is not None:
        forced = op.Or(forced, g.partial)
    sel = select_top(op, logits, g.allowed, forced, has_real, keep_counts(op, fractions, g.allowed))
    return gathered_block_attention(op, q, k, v, key_padding, causal, scale, sel, g), sel


LOWERINGS = {"block_topk": {"mask": lower_block_topk, "gather": lower_block_topk_gather}}
