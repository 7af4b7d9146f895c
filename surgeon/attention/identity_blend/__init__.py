"""``identity_blend``: SoftPAG — attention of chosen heads blended toward the identity (methods.md §9).

Definition (probability space), for each selected head h:

    A'[b, h] = (1 − u) · A[b, h] + u · I

where I maps query row r to its own key position ``Nk − Nq + r`` (queries are the last Nq of
the Nk positions, so this needs self-attention: for non-causal sites Nq must equal Nk).
u = 1 is hard PAG (A = I). Rows whose own key is padding (``key_padding`` False) are left
unchanged, so padded keys are never attended. Other heads are untouched.

Equivalent output form (:meth:`IdentityBlend.fused_hooks`, and the fused path):
``O' = (1 − u)·O + u·V_self`` with V_self the value at the query's own position — fused SDPA
plus an elementwise blend, no N×N matrix.

HeadHunter's greedy head search lives in :func:`surgeon.profiles.selectors.headhunter_greedy`.
Guidance itself (ε̂ = (1+w)ε − w·ε_perturbed) is a sampling-loop matter outside this op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from surgeon.errors import BadInput
from surgeon.attention.base import AttnContext, VariantParams
from surgeon.attention.modulation import (
    Hooks,
    ModulatedVariant,
    check_index_tuple,
    check_strength,
    dense_sdpa,
    expect_params,
    normalise_fields,
    site_heads,
)

NAME = "identity_blend"


@dataclass(frozen=True)
class IdentityBlendParams(VariantParams):
    """``u`` in [0, 1] (0: dense, 1: PAG's identity attention); ``heads``: query-head indices
    (empty: all heads of the site). The default u = 0.5 is [PROPOSED] (the paper sweeps u)."""

    u: float = 0.5
    heads: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        normalise_fields(self, ("heads",))
        check_strength(NAME, "u", self.u, 0.0, 1.0)
        check_index_tuple(NAME, "heads", self.heads)


def blend_weights(p: IdentityBlendParams, hq: int, nq: int, nk: int, key_padding: Optional[torch.Tensor],
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """u per (batch, head, row): [B|1, Hq, Nq, 1]; 0 for unselected heads and padded own keys."""
    heads = p.heads or tuple(range(hq))
    uh = torch.zeros(hq, device=device, dtype=dtype)
    uh[list(heads)] = float(p.u)
    u = uh[None, :, None, None].expand(1, hq, nq, 1)
    if key_padding is not None:
        real = key_padding.to(torch.bool)[:, nk - nq:].to(dtype)  # [B, Nq]
        u = u * real[:, None, :, None]
    return u


class IdentityBlend(ModulatedVariant):
    name = NAME
    lowering_module = "surgeon.attention.identity_blend.lowering"
    Params = IdentityBlendParams
    description = "SoftPAG: A' = (1-u)A + uI in chosen heads (fused: (1-u)*SDPA + u*V)"

    def check_site(self, q, k, ctx: AttnContext, p: VariantParams) -> None:
        p = expect_params(NAME, p, IdentityBlendParams)
        site_heads(NAME, "heads", p.heads, q.shape[1], ctx)
        nq, nk = q.shape[2], k.shape[2]
        if nq > nk or (not ctx.causal and nq != nk):
            raise BadInput(f"{NAME}: needs self-attention (query i blends its own value) but Nq={nq}, Nk={nk}",
                           "use identity_blend only at self-attention sites")

    def make_hooks(self, q, k, v, ctx: AttnContext, p: VariantParams) -> Hooks:
        p = expect_params(NAME, p, IdentityBlendParams)
        hq, kp = q.shape[1], ctx.key_padding

        def prob_fn(a: torch.Tensor) -> torch.Tensor:
            nq, nk = a.shape[-2], a.shape[-1]
            u = blend_weights(p, hq, nq, nk, kp, a.device, a.dtype)
            eye = torch.zeros(nq, nk, device=a.device, dtype=a.dtype)
            eye[torch.arange(nq, device=a.device), torch.arange(nk - nq, nk, device=a.device)] = 1.0
            return (1.0 - u) * a + u * eye

        return {"prob_fn": prob_fn}

    def fused_hooks(self, q, k, v, ctx: AttnContext, p: VariantParams) -> Hooks:
        """The output form ``out_fn(o, v) = (1 − u)·o + u·v_self`` (equal to :meth:`hooks`)."""
        self.check_site(q, k, ctx, p)
        p = expect_params(NAME, p, IdentityBlendParams)
        hq, kp = q.shape[1], ctx.key_padding

        def out_fn(o: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
            nq, nk = o.shape[-2], vv.shape[-2]
            u = blend_weights(p, hq, nq, nk, kp, o.device, o.dtype)
            return (1.0 - u) * o + u * vv[:, :, nk - nq:]

        return {"out_fn": out_fn}

    def fused(self, q, k, v, ctx: AttnContext, p: VariantParams) -> torch.Tensor:
        p = expect_params(NAME, p, IdentityBlendParams)
        out = dense_sdpa(q, k, v, ctx)
        if p.u == 0.0:
            return out
        hq, nq, nk = q.shape[1], q.shape[2], k.shape[2]
        heads = sorted(p.heads) if p.heads else list(range(hq))
        idx = torch.tensor(heads, dtype=torch.long, device=q.device)
        g = hq // k.shape[1]
        v_self = v.index_select(1, torch.div(idx, g, rounding_mode="floor"))[:, :, nk - nq:]
        u = blend_weights(p, hq, nq, nk, ctx.key_padding, q.device, out.dtype).index_select(1, idx)
        out = out.clone()
        out[:, idx] = (1.0 - u) * out[:, idx] + u * v_self.to(out.dtype)
        return out

    def degenerate_params(self, n: int) -> VariantParams:
        return IdentityBlendParams(u=0.0)

    def example_params(self, n: int, hq: int) -> VariantParams:
        return IdentityBlendParams(u=0.3, heads=(0, hq // 2))

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"u": 0.4, "heads": [0, 5]})
