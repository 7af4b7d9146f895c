"""ONNX lowering of ``head_boost``: its logit edit, then the site's modulators.

Declared in :data:`LOWERINGS` and :data:`EDITS`, which
:meth:`surgeon.attention.base.Variant.lowerings` reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.
"""
from __future__ import annotations

from typing import Any, Optional

import onnx_ir as ir

from surgeon.errors import BadInput
from surgeon.exporters.onnx_kit import (
    Edits,
    EditSite,
    LoweringBuilder,
    checked_heads,
    head_vector,
    is_finite,
    key_span_mask,
    lower_modulated,
    positions,
)


def head_boost_edits(op: LoweringBuilder, s: EditSite, p: Any, definition: bool) -> Edits:
    """PAINT: ``z + α_h · w_j · |z|`` on finite logits of the boosted heads' span keys (only the
    last query row with ``last_row_only``); both forms."""
    from surgeon.attention.head_boost import NAME, head_strengths

    hq = op.facts.q_heads
    checked_heads(NAME, p.heads, hq)
    if not p.heads and p.head_alpha and len(p.head_alpha) != hq:
        raise BadInput(f"{NAME}: head_alpha has {len(p.head_alpha)} entries but the site has {hq} query heads",
                       f"give {hq} head_alpha entries, or list the heads they belong to in heads")
    alphas = head_strengths(p, hq)
    if not p.spans and any(alphas):
        raise BadInput(f"{NAME}: no key spans to boost", "give spans=[[start, end], ...] (end exclusive)")
    if not p.spans or not any(alphas):
        return Edits()

    def logit_edit(z: ir.Value) -> ir.Value:
        _, kpos = positions(op, s.q, s.k)
        w: Optional[ir.Value] = None  # [Nk] span scale, 0 outside the spans
        for i, span in enumerate(p.spans):
            val = float(p.span_scale[i]) if p.span_scale else 1.0
            inside = key_span_mask(op, kpos, [span])
            w = op.Where(inside, op.scalar(val, z), op.scalar(0.0, z) if w is None else w)
        a = op.Mul(head_vector(op, alphas, z), w)  # [1,Hq,1,Nk]
        edit = is_finite(op, z)
        if p.last_row_only:
            nq = op.dim(s.q, 2)
            last = op.Equal(op.Range(op.int_scalar(0), nq, op.int_scalar(1)), op.Sub(nq, op.int_scalar(1)))
            edit = op.And(edit, op.Unsqueeze(last, op.ints([1])))  # rows [Nq,1]
        return op.Where(edit, op.Add(z, op.Mul(a, op.Abs(z))), z)

    return Edits(logit=(logit_edit,))


def lower_head_boost(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                     attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                     block_mask: Optional[ir.Value]) -> ir.Value:
    """PAINT (:func:`head_boost_edits`), then any modulators. → [B,Hq,Nq,Dv]."""
    return lower_modulated("head_boost", op, q, k, v, key_padding, attn_mask, causal, scale, config)


LOWERINGS = {"head_boost": {"mask": lower_head_boost}}
EDITS = {"head_boost": head_boost_edits}
