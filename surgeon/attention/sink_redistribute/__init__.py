"""``sink_redistribute``: VAR visual attention redistribution (methods.md §8).

Definition (probability space, after the softmax). With S the ``sinks`` (key token indices,
found offline by :func:`surgeon.profiles.selectors.find_sink_tokens`), T the ``target`` span
(VAR's image span; for text models e.g. the informative prompt span), V = S ∩ T the sinks inside
the target and T' = T ∖ V, a row a = A[b, h, i, :] is *selected* when

    m = Σ_{j∈T} a_j ≥ summ   and   r = Σ_{j∈V} a_j / m ≤ rho

(and h is in ``heads``, and — with ``after_target_only`` — the query position i ≥ target end,
VAR's "only queries after the image"). A selected row becomes

    Ω = (1 − p) · Σ_{j∈S} a_j;   a_j ← p·a_j (j ∈ S);   a_j ← a_j + Ω · a_j / Σ_{k∈T'} a_k (j ∈ T')

so it still sums to 1. Rows whose T' mass is 0 (nothing to receive the budget) are left
unchanged. Sink positions index the key axis as passed. VAR's "every layer but the last" is
the planner's choice of sites.

Fused path (exact, no N×N matrix): the edit only rescales key *groups* by per-row factors, so
every quantity it needs is an attention-weighted sum of a per-key value — SDPA computes them
with indicator columns as values (see :meth:`SinkRedistribute._edited_heads`); unselected heads
run plain SDPA.
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
    check_span,
    check_strength,
    expect_params,
    ctx_for_heads,
    dense_sdpa,
    gather_heads,
    normalise_fields,
    patch_heads,
    query_positions,
    site_heads,
    site_index,
    site_span,
)

NAME = "sink_redistribute"


@dataclass(frozen=True)
class SinkRedistributeParams(VariantParams):
    """VAR parameters (defaults from the released config): ``p`` fraction of sink mass kept,
    ``rho`` max sink share of the target mass, ``summ`` min target mass, ``sinks`` key token
    indices, ``target`` (start, end) span, end exclusive, ``heads`` (empty: all),
    ``after_target_only`` edit only queries at or after the target's end."""

    p: float = 0.6
    rho: float = 0.5
    summ: float = 0.2
    sinks: tuple[int, ...] = ()
    target: Optional[tuple[int, int]] = None
    heads: tuple[int, ...] = ()
    after_target_only: bool = True

    def __post_init__(self) -> None:
        normalise_fields(self, ("sinks", "target", "heads"))
        check_strength(NAME, "p", self.p, 0.0, 1.0)
        check_strength(NAME, "rho", self.rho, 0.0, 1.0)
        check_strength(NAME, "summ", self.summ, 0.0, 1.0)
        check_index_tuple(NAME, "sinks", self.sinks)
        if self.target is not None:
            check_span(NAME, "target", self.target)
        check_index_tuple(NAME, "heads", self.heads)
        if not isinstance(self.after_target_only, bool):
            raise BadInput(f"{NAME}: parameter after_target_only={self.after_target_only!r} is not a boolean",
                           "use true or false")

    @property
    def active(self) -> bool:
        return self.p < 1.0


def redistribute(a: torch.Tensor, sink: torch.Tensor, target: torch.Tensor, head_on: torch.Tensor,
                 row_on: torch.Tensor, p: float, rho: float, summ: float) -> torch.Tensor:
    """VAR's edit of probability rows a [B,H,R,K]; sink/target bool [K], head_on [H], row_on [R]."""
    vis = sink & target
    rest = target & ~vis
    m = (a * target).sum(-1, keepdim=True)
    m_vis = (a * vis).sum(-1, keepdim=True)
    m_sink = (a * sink).sum(-1, keepdim=True)
    m_rest = (a * rest).sum(-1, keepdim=True)
    sel = (head_on[None, :, None, None] & row_on[None, None, :, None]
           & (m >= summ) & (m_vis <= rho * m) & (m > 0) & (m_rest > 0))
    omega = (1.0 - p) * m_sink
    gain = omega / torch.where(m_rest > 0, m_rest, 1.0)
    edited = torch.where(sink, p * a, a) + torch.where(rest, gain * a, 0.0)
    return torch.where(sel, edited, a)


class SinkRedistribute(ModulatedVariant):
    name = NAME
    lowering_module = "surgeon.attention.sink_redistribute.lowering"
    Params = SinkRedistributeParams
    description = ("VAR: move (1-p) of the sink attention onto the target span in selected rows "
                   "(fused: SDPA with key-group indicator values)")

    def check_site(self, q, k, ctx: AttnContext, p: VariantParams) -> None:
        p = expect_params(NAME, p, SinkRedistributeParams)
        nk = k.shape[2]
        site_heads(NAME, "heads", p.heads, q.shape[1], ctx)
        for s in p.sinks:
            site_index(NAME, "sinks", s, nk)
        if p.target is not None:
            site_span(NAME, "target", p.target, nk)
        if p.active and (not p.sinks or p.target is None):
            raise BadInput(f"{NAME}: p={p.p} needs sink tokens and a target span",
                           "give sinks=[...] (see find_sink_tokens) and target=[start, end]")

    def _key_masks(self, p: SinkRedistributeParams, kpos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sink = torch.zeros(kpos.shape[0], dtype=torch.bool, device=kpos.device)
        for s in p.sinks:
            sink |= kpos == s
        t0, t1 = p.target if p.target is not None else (0, 0)
        return sink, (kpos >= t0) & (kpos < t1)

    def _row_start(self, p: SinkRedistributeParams, nq: int, nk: int) -> int:
        if not p.after_target_only or p.target is None:
            return 0
        return min(nq, max(0, p.target[1] - (nk - nq)))

    def make_hooks(self, q, k, v, ctx: AttnContext, p: VariantParams) -> Hooks:
        p = expect_params(NAME, p, SinkRedistributeParams)
        hq = q.shape[1]
        heads = site_heads(NAME, "heads", p.heads, hq, ctx)

        def prob_fn(a: torch.Tensor) -> torch.Tensor:
            if not p.active:
                return a
            nq, nk = a.shape[-2], a.shape[-1]
            sink, target = self._key_masks(p, torch.arange(nk, device=a.device))
            head_on = torch.zeros(hq, dtype=torch.bool, device=a.device)
            head_on[heads] = True
            row_on = query_positions(nq, nk, a.device) >= nk - nq + self._row_start(p, nq, nk)
            return redistribute(a, sink, target, head_on, row_on, p.p, p.rho, p.summ)

        return {"prob_fn": prob_fn}

    def fused(self, q, k, v, ctx: AttnContext, p: VariantParams) -> torch.Tensor:
        p = expect_params(NAME, p, SinkRedistributeParams)
        heads = site_heads(NAME, "heads", p.heads, q.shape[1], ctx) if p.active else []
        return patch_heads(q, k, v, ctx, heads, 0, lambda idx: self._edited_heads(q, k, v, ctx, p, idx))

    def _edited_heads(self, q, k, v, ctx: AttnContext, p: SinkRedistributeParams,
                      idx: torch.Tensor) -> torch.Tensor:
        """All rows of query heads ``idx`` [Hs] with VAR applied: [B,Hs,Nq,Dv], exactly, from
        SDPA calls only. A selected row's output is

            O' = O + (p − 1)·Σ_{j∈S} a_j v_j + (Ω / m_T')·Σ_{j∈T'} a_j v_j

        and everything it needs is an attention-weighted sum of a per-key quantity: O (values),
        Σ_{T'} a_j v_j (values zeroed outside T'), and the masses m_T, m_V, m_S, m_T' and each
        sink's a_j (0/1 indicator columns as values, D columns per SDPA call so SDPA keeps its
        fused kernel). Σ_S a_j v_j is then a small [Nq, |S|] × [|S|, Dv] product.
        """
        nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
        qs, ks, vs = gather_heads(q, k, v, idx)
        c = ctx_for_heads(ctx, idx)
        kpos = torch.arange(nk, device=q.device)
        sink, target = self._key_masks(p, kpos)
        vis = sink & target
        rest = target & ~vis
        out = dense_sdpa(qs, ks, vs, c)
        out_rest = dense_sdpa(qs, ks, vs * rest[:, None].to(vs.dtype), c)
        cols = [target, vis, sink, rest] + [kpos == j for j in p.sinks]
        ind = torch.stack(cols, dim=-1).to(q.dtype)  # [Nk, 4 + |S|]
        ncol = ind.shape[-1]
        ind = torch.nn.functional.pad(ind, (0, (-ncol) % d))
        masses = torch.cat([
            dense_sdpa(qs, ks, ind[None, None, :, i:i + d].expand(qs.shape[0], qs.shape[1], nk, d), c)
            for i in range(0, ind.shape[-1], d)
        ], dim=-1)[..., :ncol]  # [B,Hs,Nq,4+|S|]
        m, m_vis, m_sink, m_rest = (masses[..., i:i + 1] for i in range(4))
        a_sinks = masses[..., 4:]
        row_on = query_positions(nq, nk, q.device) >= nk - nq + self._row_start(p, nq, nk)
        sel = row_on[:, None] & (m >= p.summ) & (m_vis <= p.rho * m) & (m > 0) & (m_rest > 0)
        omega = (1.0 - p.p) * m_sink
        sink_out = torch.matmul(a_sinks, vs[:, :, list(p.sinks)].to(a_sinks.dtype)).to(out.dtype)
        edited = out + (p.p - 1.0) * sink_out + (omega / torch.where(m_rest > 0, m_rest, 1.0)) * out_rest
        return torch.where(sel, edited, out)

    def degenerate_params(self, n: int) -> VariantParams:
        return SinkRedistributeParams(p=1.0, sinks=(0,), target=(1, min(n, 16)))

    def example_params(self, n: int, hq: int) -> VariantParams:
        return SinkRedistributeParams(p=0.6, rho=0.5, summ=0.2, sinks=(0, 12), target=(8, 40), heads=(0, 2, hq - 1))

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"p": 0.2, "rho": 0.9, "summ": 0.05, "sinks": [0, 3], "target": [2, 20],
                                 "after_target_only": False})
