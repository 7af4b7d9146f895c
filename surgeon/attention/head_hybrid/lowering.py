"""ONNX lowering of ``head_hybrid``: one token keep mask per query head, masked attention.

Correctness-first, like the other token-mask bodies: one
token keep mask per query head — all True for dense groups, the ``window_sink`` band for
streaming groups, the upsampled ``block_topp`` / ``block_topk`` selection for sparse groups
(computed for every head, used for the sparse ones; a head's selection never depends on other
heads) — then masked attention with the site's modulator edits. → [B,Hq,Nq,Dv].

Declared in :data:`LOWERINGS`, which :meth:`surgeon.attention.base.Variant.lowerings`
reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir
import torch

from surgeon.attention.block_topp.lowering import topp_selection
from surgeon.attention.window_sink.lowering import window_keep
from surgeon.exporters.onnx_blocks import (
    block_grid,
    keep_counts,
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


def _head_flags(op: LoweringBuilder, kinds: list[str], kind: str, g: int) -> ir.Value:
    flags = np.asarray([kd == kind for kd in kinds for _ in range(g)]).reshape(1, -1, 1, 1)
    return op.Constant(value=ir.tensor(flags))


def topk_selection(op: LoweringBuilder, q: ir.Value, k: ir.Value, key_padding: Optional[ir.Value], causal: bool,
                   scale: float, sp, hq: int) -> ir.Value:
    """``block_topk.topk_block_mask`` with uniform keep (as ``lower_block_topk``): bool
    [B,Hq,nqb,nkb]."""
    from surgeon.attention.block_topk import head_fractions

    bs = int(sp.block_size)
    fractions = head_fractions(sp, hq, torch.device("cpu")).tolist()
    g = block_grid(op, q, k, bs, bs, causal)
    qbar, _ = pooled_rows(op, q, query_weights(op, q, k, key_padding, causal), g.nqb, bs, causal)
    kw = ones_row(op, k, k) if key_padding is None else op.CastLike(key_padding, k)
    kbar, kcnt = pooled_rows(op, k, kw, g.nkb, bs, False)
    has_real = op.Transpose(op.Greater(kcnt, op.scalar(0.0, kcnt)), perm=[0, 1, 3, 2])
    logits = op.Mul(gqa_scores(op, qbar, kbar), op.scalar(scale, q))
    forced = sink_local_blocks(op, g, int(sp.sink_blocks), int(sp.local_blocks))
    if g.partial is not None:
        forced = op.Or(forced, g.partial)
    return select_top(op, logits, g.allowed, forced, has_real, keep_counts(op, fractions, g.allowed))


def lower_head_hybrid(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                      attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                      block_mask: Optional[ir.Value]) -> ir.Value:
    from surgeon.attention.block_topp import head_masses
    from surgeon.attention.head_hybrid import group_kinds

    p = params_of(config)
    hq, hkv = op.facts.q_heads, op.facts.kv_heads
    g = hq // hkv
    kinds = group_kinds(p, hkv)
    keep: Optional[ir.Value] = None
    if "streaming" in kinds:
        band = window_keep(op, q, k, causal, int(p.sink_tokens), int(p.window))  # [Nq,Nk]
        keep = op.Or(op.Not(_head_flags(op, kinds, "streaming", g)), band)  # [1,Hq,Nq,Nk]
    if "sparse" in kinds:
        name, sp = p.sparse_params()
        bs = int(sp.block_size)
        if name == "block_topp":
            sel, _ = topp_selection(op, q, k, key_padding, causal, scale, sp,
                                    head_masses(sp, hq, torch.device("cpu")).tolist())
        else:
            sel = topk_selection(op, q, k, key_padding, causal, scale, sp, hq)
        tok = op.Or(op.Not(_head_flags(op, kinds, "sparse", g)), upsample_block_mask(op, sel, q, k, bs, bs))
        keep = tok if keep is None else op.And(keep, tok)
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **mods.kwargs())


LOWERINGS = {"head_hybrid": {"mask": lower_head_hybrid}}
