"""ONNX lowering of ``window_sink``: the token keep mask of sliding window plus sinks.

Declared in :data:`LOWERINGS`, which :meth:`surgeon.attention.base.Variant.lowerings`
reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.
"""
from __future__ import annotations

from typing import Optional

import onnx_ir as ir

from surgeon.exporters.onnx_kit import LoweringBuilder, attention, modulator_edits, params_of, positions


def window_keep(op: LoweringBuilder, q: ir.Value, k: ir.Value, causal: bool, sink_tokens: int,
                window: int) -> ir.Value:
    """Bool [Nq, Nk] of ``window_sink``: key j kept when j < sink_tokens or inside the window
    (causal: p − window < j ≤ p; else |p − j| < window), p the query position."""
    qpos, kpos = positions(op, q, k)
    p = op.Unsqueeze(qpos, op.ints([1]))
    j = op.Unsqueeze(kpos, op.ints([0]))
    lo = op.Greater(j, op.Sub(p, op.int_scalar(window)))
    hi = op.LessOrEqual(j, p) if causal else op.Less(j, op.Add(p, op.int_scalar(window)))
    return op.Or(op.And(lo, hi), op.Less(j, op.int_scalar(sink_tokens)))


def lower_window_sink(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                      attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                      block_mask: Optional[ir.Value]) -> ir.Value:
    """Sliding window plus sink tokens (token-level keep mask, masked attention), modulators
    composed as in the reference (``attention_from_keep`` with the context's hooks). → [B,Hq,Nq,Dv]."""
    p = params_of(config)
    keep = window_keep(op, q, k, causal, int(p.sink_tokens), int(p.window))
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **mods.kwargs())


LOWERINGS = {"window_sink": {"mask": lower_window_sink}}
