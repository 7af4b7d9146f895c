"""ONNX lowering of ``identity_blend``: its output / probability edit, then the site's modulators.

Declared in :data:`LOWERINGS` and :data:`EDITS`, which
:meth:`surgeon.attention.base.Variant.lowerings` reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.
"""
from __future__ import annotations

from typing import Any, Optional

import onnx_ir as ir

from surgeon.exporters.onnx_kit import (
    Edits,
    EditSite,
    LoweringBuilder,
    checked_heads,
    head_vector,
    lower_modulated,
    own_position,
    positions,
    repeat_heads,
)


def _blend_weights(op: LoweringBuilder, s: EditSite, p: Any, heads: list[int], like: ir.Value) -> ir.Value:
    """``identity_blend.blend_weights``: u per (batch, head, row), [1|B, Hq, 1|Nq, 1]; 0 for
    unselected heads and rows whose own key is padding."""
    uh = [float(p.u) if h in set(heads) else 0.0 for h in range(op.facts.q_heads)]
    u = head_vector(op, uh, like)  # [1,Hq,1,1]
    if s.key_padding is not None:
        start, end = own_position(op, s)
        real = op.Slice(op.Cast(s.key_padding, to=ir.DataType.BOOL), start, end, op.ints([1]))  # [B,Nq]
        u = op.Mul(u, op.Unsqueeze(op.CastLike(real, like), op.ints([1, 3])))  # [B,Hq,Nq,1]
    return u


def identity_blend_edits(op: LoweringBuilder, s: EditSite, p: Any, definition: bool) -> Edits:
    """SoftPAG. Output form (``fused_hooks``): ``(1 − u)·O + u·V_self`` with V_self the value at
    the query's own position; probability form (``make_hooks``): ``(1 − u)·A + u·I``."""
    from surgeon.attention.identity_blend import NAME

    heads = checked_heads(NAME, p.heads, op.facts.q_heads)
    if p.u == 0.0:
        return Edits()
    if definition:
        def prob_edit(a: ir.Value) -> ir.Value:
            qpos, kpos = positions(op, s.q, s.k)
            eye = op.CastLike(op.Equal(op.Unsqueeze(qpos, op.ints([1])), op.Unsqueeze(kpos, op.ints([0]))), a)
            u = _blend_weights(op, s, p, heads, a)
            return op.Add(op.Mul(op.Sub(op.scalar(1.0, a), u), a), op.Mul(u, eye))

        return Edits(prob=(prob_edit,))

    def out_edit(o: ir.Value) -> ir.Value:
        u = _blend_weights(op, s, p, heads, o)
        start, end = own_position(op, s)
        v_self = repeat_heads(op, op.Slice(s.v, start, end, op.ints([2])))  # [B,Hq,Nq,Dv]
        return op.Add(op.Mul(op.Sub(op.scalar(1.0, o), u), o), op.Mul(u, op.CastLike(v_self, o)))

    return Edits(out=(out_edit,))


def lower_identity_blend(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value,
                         key_padding: Optional[ir.Value], attn_mask: Optional[ir.Value], causal: bool,
                         scale: float, config: str, block_mask: Optional[ir.Value]) -> ir.Value:
    """SoftPAG (:func:`identity_blend_edits`; output form on its own), then any modulators.
    → [B,Hq,Nq,Dv]."""
    return lower_modulated("identity_blend", op, q, k, v, key_padding, attn_mask, causal, scale, config)


LOWERINGS = {"identity_blend": {"mask": lower_identity_blend}}
EDITS = {"identity_blend": identity_blend_edits}
