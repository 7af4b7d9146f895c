"""ONNX lowering of ``local_boost``: its logit / probability edit, then the site's modulators.

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
    positions,
)


def local_boost_edits(op: LoweringBuilder, s: EditSite, p: Any, definition: bool) -> Edits:
    """LocoRE: gains ``γ_h λ^(t−1−j)`` on the ``window`` keys before the query (j ≥ first_key).
    Logit form (``fused_hooks``): ``z + ln(1 + gain)``; probability form (``make_hooks``):
    ``a·(1 + gain)`` renormalised (rows summing to 0 stay 0)."""
    from surgeon.attention.local_boost import NAME, head_gammas

    hq = op.facts.q_heads
    checked_heads(NAME, p.heads, hq)
    gammas = head_gammas(p, hq)
    if not any(gammas):
        return Edits()

    def gain(like: ir.Value) -> ir.Value:  # [1,Hq,Nq,Nk]
        qpos, kpos = positions(op, s.q, s.k)
        d = op.Sub(op.Unsqueeze(qpos, op.ints([1])), op.Unsqueeze(kpos, op.ints([0])))  # [Nq,Nk]
        inside = op.And(op.GreaterOrEqual(d, op.int_scalar(1)), op.LessOrEqual(d, op.int_scalar(p.window)))
        inside = op.And(inside, op.Unsqueeze(op.GreaterOrEqual(kpos, op.int_scalar(p.first_key)), op.ints([0])))
        expo = op.CastLike(op.Max(op.Sub(d, op.int_scalar(1)), op.int_scalar(0)), like)
        g = op.Where(inside, op.Pow(op.scalar(p.decay, like), expo), op.scalar(0.0, like))  # [Nq,Nk]
        return op.Mul(head_vector(op, gammas, like), g)

    if definition:
        def prob_edit(a: ir.Value) -> ir.Value:
            b = op.Mul(a, op.Add(op.scalar(1.0, a), gain(a)))
            tot = op.ReduceSum(b, op.ints([-1]), keepdims=1)
            return op.Div(b, op.Where(op.Greater(tot, op.scalar(0.0, tot)), tot, op.scalar(1.0, tot)))

        return Edits(prob=(prob_edit,))

    def logit_edit(z: ir.Value) -> ir.Value:
        return op.Add(z, op.Log(op.Add(op.scalar(1.0, z), gain(z))))

    return Edits(logit=(logit_edit,))


def lower_local_boost(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                      attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                      block_mask: Optional[ir.Value]) -> ir.Value:
    """LocoRE (:func:`local_boost_edits`; logit form on its own), then any modulators. → [B,Hq,Nq,Dv]."""
    return lower_modulated("local_boost", op, q, k, v, key_padding, attn_mask, causal, scale, config)


LOWERINGS = {"local_boost": {"mask": lower_local_boost}}
EDITS = {"local_boost": local_boost_edits}
