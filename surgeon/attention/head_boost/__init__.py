"""``head_boost``: PAINT-style logit boost toward chosen key spans in chosen heads (methods.md §11).

Definition (logit space, before the softmax), for each boosted head h and key j in span s:

    z'[b, h, i, j] = z[b, h, i, j] + α_{h,s} · |z[b, h, i, j]|,   α_{h,s} = α_h · span_scale[s]

with α_h = ``head_alpha`` (per head) or ``alpha``; other heads and keys are untouched
(non-finite logits from a float ``attn_mask`` stay as they are).

* ``spans``: key-token spans ``(start, end)``, end exclusive, non-overlapping (PAINT's local
  tokens T_loc and summary tokens T_sum; single tokens are ``(t, t+1)``). ``span_scale``
  (optional, one per span, in [0, 2]) multiplies α per span: PAINT's β = 0.3 on T_sum with
  α = 0.7 on T_loc is ``alpha=0.7, span_scale=(1, 0.3/0.7)``.
* ``heads``: query-head indices (empty: all heads). ``head_alpha``: optional per-head strengths,
  one per entry of ``heads`` (or one per query head of the site when ``heads`` is empty), in
  [0, 10] — the [PROPOSED] head-specific PAINT α_h = α·v_h/mean v clipped to [0, 2α], computed
  by :func:`surgeon.profiles.selectors.paint_head_alpha`.
* ``last_row_only``: PAINT as released edits only the last query row (each decode step, the
  last prefill position). Default False: every query row is boosted (prefill-wide use, which
  is what a rewritten prefill graph can express); set True for PAINT's exact behaviour.

Fused path (exact): the boost is an additive bias α·|z| that is nonzero on the span columns
only, so z is computed for the span keys alone (O(N·|spans|) per head) and the boosted heads
(rows) run SDPA with that bias as a float mask, chunked over queries; the other heads run plain
SDPA. No head's full N×N score matrix is materialised beyond one chunk's mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.errors import BadInput
from surgeon.attention.base import AttnContext, VariantParams
from surgeon.attention.modulation import (
    Hooks,
    ModulatedVariant,
    check_index_tuple,
    check_span,
    check_strength,
    expect_params,
    BiasChunk,
    biased_sdpa_rows,
    normalise_fields,
    patch_heads,
    site_heads,
    site_span,
)

NAME = "head_boost"
ALPHA_MAX = 5.0


@dataclass(frozen=True)
class HeadBoostParams(VariantParams):
    """PAINT logit boost; see the module docstring for each field."""

    alpha: float = 0.7
    heads: tuple[int, ...] = ()
    head_alpha: tuple[float, ...] = ()
    spans: tuple[tuple[int, int], ...] = ()
    span_scale: tuple[float, ...] = ()
    last_row_only: bool = False

    def __post_init__(self) -> None:
        normalise_fields(self, ("heads", "head_alpha", "spans", "span_scale"))
        check_strength(NAME, "alpha", self.alpha, 0.0, ALPHA_MAX)
        check_index_tuple(NAME, "heads", self.heads)
        if not isinstance(self.head_alpha, tuple):
            raise BadInput(f"{NAME}: parameter head_alpha={self.head_alpha!r} is not a list",
                           "give one strength per head")
        for x in self.head_alpha:
            check_strength(NAME, "head_alpha entry", x, 0.0, 2 * ALPHA_MAX)
        if self.heads and self.head_alpha and len(self.head_alpha) != len(self.heads):
            raise BadInput(f"{NAME}: head_alpha has {len(self.head_alpha)} entries for {len(self.heads)} heads",
                           "give one head_alpha entry per entry of heads")
        if not isinstance(self.spans, tuple):
            raise BadInput(f"{NAME}: parameter spans={self.spans!r} is not a list of spans", "give [[start, end], ...]")
        for s in self.spans:
            check_span(NAME, "spans", s)
        ordered = sorted(self.spans)
        for a, b in zip(ordered, ordered[1:]):
            if b[0] < a[1]:
                raise BadInput(f"{NAME}: parameter spans overlap: {list(a)} and {list(b)}",
                               "merge or split overlapping spans")
        if not isinstance(self.span_scale, tuple):
            raise BadInput(f"{NAME}: parameter span_scale={self.span_scale!r} is not a list", "give one scale per span")
        if self.span_scale and len(self.span_scale) != len(self.spans):
            raise BadInput(f"{NAME}: span_scale has {len(self.span_scale)} entries for {len(self.spans)} spans",
                           "give one span_scale entry per span, or none")
        for x in self.span_scale:
            check_strength(NAME, "span_scale entry", x, 0.0, 2.0)
        if not isinstance(self.last_row_only, bool):
            raise BadInput(f"{NAME}: parameter last_row_only={self.last_row_only!r} is not a boolean",
                           "use true or false")


def head_strengths(p: HeadBoostParams, hq: int) -> list[float]:
    """α_h for every query head (0 for heads not boosted): length ``hq``."""
    if p.heads:
        vals = p.head_alpha or (p.alpha,) * len(p.heads)
        out = [0.0] * hq
        for h, a in zip(p.heads, vals):
            out[h] = float(a)
        return out
    return [float(a) for a in (p.head_alpha or (p.alpha,) * hq)]


def key_weights(p: HeadBoostParams, nk: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-key span scale [Nk] (0 outside the spans)."""
    w = torch.zeros(nk, device=device, dtype=dtype)
    for i, (s, e) in enumerate(p.spans):
        w[s:e] = float(p.span_scale[i]) if p.span_scale else 1.0
    return w


def boost(z: torch.Tensor, alpha_h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """z [B,H,R,K] + α_h[H]·w[K]·|z| where z is finite."""
    a = alpha_h[None, :, None, None] * w[None, None, None, :]
    return torch.where(torch.isfinite(z), z + a * z.abs(), z)


class HeadBoost(ModulatedVariant):
    name = NAME
    lowering_module = "surgeon.attention.head_boost.lowering"
    Params = HeadBoostParams
    description = "PAINT: z + alpha*|z| on chosen key spans in chosen heads (fused: SDPA with a span-logit bias)"

    def check_site(self, q, k, ctx: AttnContext, p: VariantParams) -> None:
        p = expect_params(NAME, p, HeadBoostParams)
        hq, nk = q.shape[1], k.shape[2]
        site_heads(NAME, "heads", p.heads, hq, ctx)
        if not p.heads and p.head_alpha and len(p.head_alpha) != hq:
            raise BadInput(f"{NAME}: head_alpha has {len(p.head_alpha)} entries but the site has {hq} query heads",
                           f"give {hq} head_alpha entries, or list the heads they belong to in heads")
        for s in p.spans:
            site_span(NAME, "spans entry", s, nk)
        if not p.spans and any(head_strengths(p, hq)):
            raise BadInput(f"{NAME}: no key spans to boost", "give spans=[[start, end], ...] (end exclusive)")

    def make_hooks(self, q, k, v, ctx: AttnContext, p: VariantParams) -> Hooks:
        p = expect_params(NAME, p, HeadBoostParams)
        alphas = head_strengths(p, q.shape[1])

        def logit_fn(z: torch.Tensor) -> torch.Tensor:
            a = torch.tensor(alphas, device=z.device, dtype=z.dtype)
            w = key_weights(p, z.shape[-1], z.device, z.dtype)
            if not p.last_row_only:
                return boost(z, a, w)
            return torch.cat([z[..., :-1, :], boost(z[..., -1:, :], a, w)], dim=-2)

        return {"logit_fn": logit_fn}

    def fused(self, q, k, v, ctx: AttnContext, p: VariantParams) -> torch.Tensor:
        p = expect_params(NAME, p, HeadBoostParams)
        alphas = head_strengths(p, q.shape[1])
        scales = p.span_scale or (1.0,) * len(p.spans)
        heads = [h for h, a in enumerate(alphas) if a > 0.0] if any(scales) else []
        row_start = q.shape[2] - 1 if p.last_row_only else 0

        def bias_fn(chunk: BiasChunk, mask: torch.Tensor) -> torch.Tensor:
            # α_h·c_s·|z| on the span keys only: z is computed for those columns alone
            a = torch.tensor([alphas[h] for h in chunk.heads.tolist()], device=q.device, dtype=q.dtype)
            kc = chunk.kpos.shape[0]
            bias = mask.expand(chunk.q.shape[0], chunk.q.shape[1], chunk.q.shape[2], kc).clone()
            for (s0, e0), c in zip(p.spans, scales):
                e1 = min(e0, kc)
                if s0 >= e1 or c == 0.0:
                    continue
                z = torch.matmul(chunk.q, chunk.k[:, :, s0:e1].transpose(-1, -2)) * ctx.scale
                if chunk.add is not None:
                    z = z + (chunk.add if chunk.add.shape[-1] == 1 else chunk.add[..., s0:e1])
                boost_z = (a[None, :, None, None] * float(c)) * z.abs()
                zero = torch.zeros((), dtype=z.dtype, device=z.device)
                bias[..., s0:e1] += torch.where(torch.isfinite(z), boost_z, zero)
            return bias

        return patch_heads(q, k, v, ctx, heads, row_start,
                           lambda idx: biased_sdpa_rows(q, k, v, ctx, idx, bias_fn, row_start))

    def degenerate_params(self, n: int) -> VariantParams:
        return HeadBoostParams(alpha=0.0, spans=((0, min(8, n)),))

    def example_params(self, n: int, hq: int) -> VariantParams:
        return HeadBoostParams(alpha=0.7, heads=(1, hq - 2), head_alpha=(0.7, 1.4),
                               spans=((4, 12), (20, 24)), span_scale=(1.0, 0.5))

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"alpha": 1.5, "heads": [1, 4], "spans": [[0, 3], [10, 16]],
                                 "span_scale": [1.0, 0.5]})
