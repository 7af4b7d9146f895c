"""ONNX lowering of ``reuse``: the token-mask body and the gathered body.

Declared in :data:`LOWERINGS`, which :meth:`surgeon.attention.base.Variant.lowerings`
reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.
"""
from __future__ import annotations

from typing import Optional

import onnx_ir as ir

from surgeon.errors import BadInput
from surgeon.exporters.onnx_blocks import (
    block_grid,
    gathered_block_attention,
    needs_token_mask,
    sink_local_blocks,
    upsample_block_mask,
)
from surgeon.exporters.onnx_kit import LoweringBuilder, attention, modulator_edits, params_of


def lower_reuse(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                block_mask: Optional[ir.Value]) -> ir.Value:
    """Attention over the anchor's block mask [B|1,Hq|1,nqb,nkb] ∪ sink/local blocks, with the
    site's modulators. → [B,Hq,Nq,Dv]."""
    if block_mask is None:
        raise BadInput("reuse needs the block mask of its anchor layer",
                       "rewrite with an anchor variant that produces block masks before this layer")
    p = params_of(config)
    bs = int(p.block_size)
    g = block_grid(op, q, k, bs, bs, causal)
    bm = op.Or(op.Cast(block_mask, to=ir.DataType.BOOL), sink_local_blocks(op, g, int(p.sink_blocks),
                                                                             int(p.local_blocks)))
    keep = upsample_block_mask(op, bm, q, k, bs, bs)
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **mods.kwargs())


def lower_reuse_gather(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value,
                       key_padding: Optional[ir.Value], attn_mask: Optional[ir.Value], causal: bool, scale: float,
                       config: str, block_mask: Optional[ir.Value]) -> ir.Value:
    """``reuse``: the anchor's block mask [B|1,Hq|1,nqb,nkb] ∪ sink/local blocks, gathered. → [B,Hq,Nq,Dv]."""
    if block_mask is None or needs_token_mask(op, attn_mask, config):
        return lower_reuse(op, q, k, v, key_padding, attn_mask, causal, scale, config, block_mask)
    p = params_of(config)
    bs = int(p.block_size)
    g = block_grid(op, q, k, bs, bs, causal)
    bm = op.Or(op.Cast(block_mask, to=ir.DataType.BOOL), sink_local_blocks(op, g, int(p.sink_blocks),
                                                                             int(p.local_blocks)))
    return gathered_block_attention(op, q, k, v, key_padding, causal, scale, bm, g)


LOWERINGS = {"reuse": {"mask": lower_reuse, "gather": lower_reuse_gather}}
