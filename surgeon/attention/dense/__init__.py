"""``dense``: exact attention with SDPA semantics (GQA, causal, padding, explicit masks).

The identity rewrite puts this op at every site; every other variant must reduce to it under
its degenerate parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from surgeon.attention.base import AttnContext, Variant, VariantParams, attention_from_keep


@dataclass(frozen=True)
class DenseParams(VariantParams):
    """Dense attention has no parameters."""


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """Dense attention through ``F.scaled_dot_product_attention``; fully-masked rows give 0.

    q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D] → [B,Hq,Nq,Dv].
    """
    hq, hkv = q.shape[1], k.shape[1]
    gqa = hq != hkv
    nq, nk = q.shape[2], k.shape[2]
    kp = ctx.key_padding
    pad_free = kp is None or bool(kp.all())
    if ctx.attn_mask is None and pad_free and (not ctx.causal or nq == nk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal, scale=ctx.scale, enable_gqa=gqa)
    mask = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=q.device)
    if ctx.causal:
        mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)[None, None]
    if kp is not None and not pad_free:
        mask = mask & kp.to(torch.bool)[:, None, None, :]
    if ctx.attn_mask is not None:
        if ctx.attn_mask.dtype == torch.bool:
            mask = mask & ctx.attn_mask
        else:
            add = ctx.attn_mask.masked_fill(~mask, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=add, scale=ctx.scale, enable_gqa=gqa)
            return torch.nan_to_num(out, nan=0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=ctx.scale, enable_gqa=gqa)
    row_ok = mask.any(dim=-1, keepdim=True)
    return torch.where(row_ok, out, torch.zeros((), dtype=out.dtype, device=out.device))


class Dense(Variant):
    name = "dense"
    lowering_module = "surgeon.attention.dense.lowering"
    Params = DenseParams
    family = "dense"
    description = "exact attention (SDPA semantics); the identity rewrite"
    exports = ("onnx", "tensorrt")

    def reference(self, q, k, v, ctx: AttnContext, p: VariantParams, block_mask=None):
        return attention_from_keep(q, k, v, ctx)

    def fast_paths(self):
        return {"sdpa": lambda q, k, v, ctx, p, bm=None: sdpa(q, k, v, ctx)}

    def fast_available(self, name: str, q, ctx: AttnContext, p: VariantParams) -> bool:
        return not ctx.modulated  # SDPA cannot apply modulation hooks
