"""ONNX lowering of ``sink_redistribute``: its probability edit, then the site's modulators.

Declared in :data:`LOWERINGS` and :data:`EDITS`, which
:meth:`surgeon.attention.base.Variant.lowerings` reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import onnx_ir as ir

from surgeon.errors import BadInput
from surgeon.exporters.onnx_kit import (
    Edits,
    EditSite,
    LoweringBuilder,
    checked_heads,
    key_span_mask,
    lower_modulated,
    positions,
)


def sink_redistribute_edits(op: LoweringBuilder, s: EditSite, p: Any, definition: bool) -> Edits:
    """VAR: in selected rows of the chosen heads, keep p of the sink mass and give the rest to
    the non-sink target keys in proportion (``sink_redistribute.redistribute``); both forms."""
    from surgeon.attention.sink_redistribute import NAME

    hq = op.facts.q_heads
    heads = checked_heads(NAME, p.heads, hq)
    if p.active and (not p.sinks or p.target is None):
        raise BadInput(f"{NAME}: p={p.p} needs sink tokens and a target span",
                       "give sinks=[...] (see find_sink_tokens) and target=[start, end]")
    if not p.active:
        return Edits()

    def prob_edit(a: ir.Value) -> ir.Value:
        qpos, kpos = positions(op, s.q, s.k)
        sink = key_span_mask(op, kpos, [(t, t + 1) for t in p.sinks])
        target = key_span_mask(op, kpos, [p.target])
        vis = op.And(sink, target)
        rest = op.And(target, op.Not(vis))

        def mass(m: ir.Value) -> ir.Value:
            return op.ReduceSum(op.Mul(a, op.CastLike(m, a)), op.ints([-1]), keepdims=1)

        m, m_vis, m_sink, m_rest = mass(target), mass(vis), mass(sink), mass(rest)
        zero = op.scalar(0.0, a)
        sel = op.And(op.GreaterOrEqual(m, op.scalar(p.summ, a)), op.LessOrEqual(m_vis, op.Mul(op.scalar(p.rho, a), m)))
        sel = op.And(sel, op.And(op.Greater(m, zero), op.Greater(m_rest, zero)))
        head_on = np.zeros((1, hq, 1, 1), dtype=bool)
        head_on[0, heads] = True
        sel = op.And(sel, op.Constant(value=ir.tensor(head_on)))
        if p.after_target_only:  # VAR edits only queries at or after the target's end
            sel = op.And(sel, op.Unsqueeze(op.GreaterOrEqual(qpos, op.int_scalar(p.target[1])), op.ints([1])))
        omega = op.Mul(op.scalar(1.0 - p.p, a), m_sink)
        denom = op.Where(op.Greater(m_rest, zero), m_rest, op.scalar(1.0, a))
        kept = op.Where(sink, op.Mul(op.scalar(p.p, a), a), a)
        gain = op.Where(rest, op.Div(op.Mul(omega, a), denom), zero)
        return op.Where(sel, op.Add(kept, gain), a)

    return Edits(prob=(prob_edit,))


def lower_sink_redistribute(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value,
                            key_padding: Optional[ir.Value], attn_mask: Optional[ir.Value], causal: bool,
                            scale: float, config: str, block_mask: Optional[ir.Value]) -> ir.Value:
    """VAR (:func:`sink_redistribute_edits`), then any modulators. → [B,Hq,Nq,Dv]."""
    return lower_modulated("sink_redistribute", op, q, k, v, key_padding, attn_mask, causal, scale, config)


LOWERINGS = {"sink_redistribute": {"mask": lower_sink_redistribute}}
EDITS = {"sink_redistribute": sink_redistribute_edits}
