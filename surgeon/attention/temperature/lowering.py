"""ONNX lowering of ``temperature``: its logit edit, then the site's modulators.

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
    lower_modulated,
    own_position,
    positions,
)


def temperature_edits(op: LoweringBuilder, s: EditSite, p: Any, definition: bool) -> Edits:
    """SSA: logits of query row r times ``1 + σ ln i``; i = real tokens up to and including the
    query (``cumsum(key_padding)``, clamped ≥ 1), else position + 1 (both forms)."""
    sigma = p.effective_sigma
    if sigma == 0.0:
        return Edits()

    def logit_edit(z: ir.Value) -> ir.Value:
        qpos, _ = positions(op, s.q, s.k)
        if s.key_padding is None:
            i = op.Reshape(op.Add(qpos, op.int_scalar(1)), op.ints([1, 1, -1, 1]))  # [1,1,Nq,1]
        else:
            cs = op.CumSum(op.Cast(s.key_padding, to=ir.DataType.INT64), op.int_scalar(-1))  # [B,Nk]
            start, end = own_position(op, s)
            cs = op.Slice(cs, start, end, op.ints([1]))  # [B,Nq]
            i = op.Unsqueeze(op.Max(cs, op.int_scalar(1)), op.ints([1, 3]))  # [B,1,Nq,1]
        f = op.Add(op.scalar(1.0, z), op.Mul(op.scalar(sigma, z), op.Log(op.CastLike(i, z))))
        return op.Mul(z, f)

    return Edits(logit=(logit_edit,))


def lower_temperature(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                      attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                      block_mask: Optional[ir.Value]) -> ir.Value:
    """SSA temperature (:func:`temperature_edits`), then any modulators. → [B,Hq,Nq,Dv]."""
    return lower_modulated("temperature", op, q, k, v, key_padding, attn_mask, causal, scale, config)


LOWERINGS = {"temperature": {"mask": lower_temperature}}
EDITS = {"temperature": temperature_edits}
