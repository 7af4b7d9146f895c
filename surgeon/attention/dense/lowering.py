"""ONNX lowering of ``dense``: masked dense attention with the site's modulators.

Declared in :data:`LOWERINGS`, which :meth:`surgeon.attention.base.Variant.lowerings`
reads through the class's ``lowering_module``; the lowering contract is in
:mod:`surgeon.exporters.onnx_kit`.
"""
from __future__ import annotations

from typing import Optional

import onnx_ir as ir

from surgeon.exporters.onnx_kit import LoweringBuilder, attention, modulator_edits


def lower_dense(
    op: LoweringBuilder,
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    key_padding: Optional[ir.Value],
    attn_mask: Optional[ir.Value],
    causal: bool,
    scale: float,
    config: str,
    block_mask: Optional[ir.Value],
) -> ir.Value:
    """Dense attention: [B,Hq,Nq,D] x [B,Hkv,Nk,D] → [B,Hq,Nq,Dv]; fully-masked rows give 0.
    Composes the site's modulators (:func:`modulator_edits`)."""
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, **mods.kwargs())


LOWERINGS = {"dense": {"mask": lower_dense}}
