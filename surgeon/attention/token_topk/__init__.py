"""``token_topk``: TokenSelect-style token-level KV selection (methods.md §4).

Queries are processed in chunks of ``chunk`` consecutive rows (row i sits at position
p = Nk − Nq + i). Each chunk shares one key set across all its heads:

    selected = [0, n_init) ∪ topk_j S(j) ∪ local

* Fingerprint q̄_h of the chunk (per query head h): non-causal, the mean of the chunk's real
  queries (the spec). Causal: the mean of the real queries among the ``chunk`` rows *ending
  at the chunk's first row* (our causal-safe choice, shared with ``block_topk``): the spec's
  mean over the chunk's own rows would let a later query of the chunk change the outputs of
  earlier rows, which a causal site must never allow. During decode (Nq = 1) both are the
  current query, as in TokenSelect.
* Per-head criticality s_h(j) = q̄_h · k_{g(h), j} with the model's GQA mapping
  g(h) = h // (Hq/Hkv) and no 1/√d scale (as in TokenSelect's kernel); soft vote
  S(j) = Σ_h softmax_j s_h(j), the softmax taken over the chunk's candidates.
* The "cache" a chunk sees: causal — the keys before the chunk's first position s;
  non-causal — all Nk keys (end E = s = Nk). Its first ``n_init`` and last ``n_local`` keys are
  always kept, the rest are candidates:
      init  = [0, min(n_init, s))
      cands = [n_init, s − n_local)                (real keys only)
      local = [max(min(n_init, s), s − n_local), E)  with E = last chunk position + 1 (causal)
  so for causal chunks the local part also holds the chunk's own keys (under the token-level
  causal mask). The three parts are disjoint and their union is every key the chunk may see
  when nothing is dropped.
* Budget: ``top_k`` candidates, or with ``keep > 0`` ⌈keep · E⌉ (a fraction of the keys the chunk
  can see, so the budget never depends on tokens after the chunk). ``top_k ≥ N`` is dense.
* Ties in S are broken toward the lower position. Padding keys are never candidates and
  never attended. Positions are absolute: with left padding the init keys may be padding
  (and then attend nothing). The selection cache (cos ≥ θ reuse) and the optional max-pool
  of S are not implemented (static export; the max-pool is off by default in TokenSelect).

Fast path ``gather`` (:func:`surgeon.kernels.gather_cpu.gathered_attention`): the selection
needs only the [B, Hq, ceil(Nq/chunk), Nk] fingerprint scores; each chunk's keys are gathered
once per KV head ([B, Hkv, S, D], S = n_init + top_k + n_local) and attended by all of its query
heads and rows at once, with the chunk's own keys as a causal block merged by log-sum-exp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from surgeon.kernels.geometry import pooled_queries, query_validity
from surgeon.kernels.gather_cpu import (
    dense_pair_count,
    gathered_attention,
    gathered_pair_count,
    padding_bias,
    real_keys,
)
from surgeon.attention.base import (
    AttnContext,
    Variant,
    VariantParams,
    attention_from_keep,
    check_range,
    record_density,
    recorder_active,
)

NEG_INF = float("-inf")


@dataclass(frozen=True)
class TokenTopKParams(VariantParams):
    """n_init: leading keys always kept; n_local: most recent keys always kept (before the
    chunk, causal); top_k: voted keys per chunk; keep: if > 0, voted keys = ⌈keep · visible
    keys⌉ instead of top_k; chunk: query rows sharing one selection."""

    n_init: int = 128
    n_local: int = 512
    top_k: int = 2048
    keep: float = 0.0
    chunk: int = 64

    def __post_init__(self) -> None:
        check_range("n_init", self.n_init, 0, 1 << 30)
        check_range("n_local", self.n_local, 0, 1 << 30)
        check_range("top_k", self.top_k, 0, 1 << 30)
        check_range("keep", self.keep, 0.0, 1.0)
        check_range("chunk", self.chunk, 1, 1 << 20)


@dataclass(frozen=True)
class _Selection:
    idx: torch.Tensor  # [B, 1, ng, S] long key indices (−1 = empty), all before the chunk (causal)
    diag_start: Optional[torch.Tensor]  # [ng] first position of each chunk (causal), else None
    diag_len: int  # the chunk's own keys [diag_start, diag_start + diag_len) (causal), else 0


def select_tokens(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, p: TokenTopKParams) -> _Selection:
    """The selection of every query chunk.

    q [B,Hq,Nq,D], k [B,Hkv,Nk,D] → indices [B, 1, ceil(Nq/chunk), S] into the keys: ``n_init``
    init slots, the voted keys (best first), then the local window (−1 = empty slot). Causal:
    the local slots stop before the chunk and the chunk's own keys are the ``diag`` range.
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    c = p.chunk
    ng = (nq + c - 1) // c
    dev = q.device
    off = nk - nq
    first = off + torch.arange(ng, device=dev) * c  # [ng] first query position
    last = off + torch.clamp((torch.arange(ng, device=dev) + 1) * c, max=nq) - 1
    if ctx.causal:
        lim, end = first, last + 1
    else:
        lim = torch.full_like(first, nk)
        end = lim
    n_i = torch.clamp(lim, max=p.n_init)  # init size per chunk
    cand_hi = lim - p.n_local  # candidates [n_init, cand_hi)

    # --- voting over candidates
    real = real_keys(ctx.key_padding, b, nk, dev)
    j = torch.arange(nk, device=dev)
    cand = (j[None, :] >= p.n_init) & (j[None, :] < cand_hi[:, None])  # [ng, Nk]
    cand = cand[None] & real[:, None, :]  # [B, ng, Nk]
    if p.keep > 0:
        kcnt = torch.ceil(end.to(torch.float64) * p.keep - 1e-9).to(torch.long)  # [ng]
    else:
        kcnt = torch.full_like(end, p.top_k)
    kmax = int(min(int(kcnt.max().item()) if ng else 0, nk))
    if kmax > 0 and bool(cand.any()):
        qv = query_validity(ctx.key_padding, nq, nk, ctx.causal)
        qbar = pooled_queries(q, c, ctx.causal, qv)  # [B,Hq,ng,D]
        s_h = torch.matmul(qbar.view(b, hkv, g * ng, d), k.transpose(-1, -2)).view(b, hq, ng, nk)
        # chunks without candidates give NaN rows here; the mask below overwrites them
        vote = torch.softmax(s_h.masked_fill(~cand[:, None], NEG_INF), dim=-1).sum(dim=1)  # [B, ng, Nk]
        vote = vote.masked_fill(~cand, NEG_INF)
        val, order = torch.sort(vote, dim=-1, descending=True, stable=True)
        val, order = val[..., :kmax], order[..., :kmax]
        ok = (val > NEG_INF) & (torch.arange(kmax, device=dev)[None, :] < kcnt[:, None])[None]
        top = torch.where(ok, order, torch.full_like(order, -1))
    else:
        top = torch.full((b, ng, 0), -1, dtype=torch.long, device=dev)

    # --- init and local parts (the local part stops at ``lim``; causal chunks add their own keys)
    ii = torch.arange(p.n_init, device=dev)
    init = torch.where(ii[None, :] < n_i[:, None], ii[None, :], torch.full_like(ii[None, :], -1))  # [ng, n_init]
    lo = torch.maximum(n_i, lim - p.n_local)  # [ng]
    ll = lo[:, None] + torch.arange(p.n_local, device=dev)[None, :]
    local = torch.where(ll < lim[:, None], ll, torch.full_like(ll, -1))  # [ng, n_local]
    idx = torch.cat([init[None].expand(b, ng, -1), top, local[None].expand(b, ng, -1)], dim=-1)
    if ctx.causal:
        return _Selection(idx=idx[:, None], diag_start=first, diag_len=c)
    return _Selection(idx=idx[:, None], diag_start=None, diag_len=0)


def selection_keep(sel: _Selection, nq: int, nk: int, chunk: int) -> torch.Tensor:
    """Selection → bool keep mask [B, 1, Nq, Nk] (reference use only; the causal mask is applied
    by the caller's dense-allowed mask)."""
    idx = sel.idx[:, 0]  # [B, ng, S]
    b, ng, s = idx.shape
    m = torch.zeros(b, ng, nk + 1, dtype=torch.bool, device=idx.device)
    m.scatter_(-1, torch.where(idx >= 0, idx, torch.full_like(idx, nk)), True)
    m = m[:, :, :nk]
    if sel.diag_start is not None:
        j = torch.arange(nk, device=idx.device)[None, :]
        ds = sel.diag_start[:, None]
        m = m | ((j >= ds) & (j < ds + sel.diag_len))[None]
    return m.repeat_interleave(chunk, dim=1)[:, :nq][:, None]


class TokenTopK(Variant):
    name = "token_topk"
    lowering_module = "surgeon.attention.token_topk.lowering"
    Params = TokenTopKParams
    family = "sparse"
    description = ("TokenSelect token-level selection: per query chunk, init + soft-voted top-k keys "
                   "(per-head softmax of fingerprint·key, summed over heads) + local window")

    def reference(self, q, k, v, ctx: AttnContext, p: TokenTopKParams, block_mask=None):
        sel = self.select(q, k, ctx, p)
        out = attention_from_keep(q, k, v, ctx, selection_keep(sel, q.shape[2], k.shape[2], p.chunk))
        self._record(q, k, ctx, p, sel)
        return out

    def _gather(self, q, k, v, ctx: AttnContext, p: TokenTopKParams, block_mask=None):
        sel = self.select(q, k, ctx, p)
        nk = k.shape[2]
        out = gathered_attention(q, k, v, sel.idx, group=p.chunk, scale=ctx.scale,
                                 key_bias=padding_bias(ctx.key_padding, q.dtype), diag_start=sel.diag_start,
                                 diag_len=sel.diag_len, q_offset=nk - q.shape[2])
        self._record(q, k, ctx, p, sel)
        return out

    def _density(self, q, k, ctx: AttnContext, p: TokenTopKParams, sel: _Selection) -> float:
        b, nq, nk = q.shape[0], q.shape[2], k.shape[2]
        real = real_keys(ctx.key_padding, b, nk, q.device)
        kept = gathered_pair_count(sel.idx, p.chunk, nq, nk, real, diag_start=sel.diag_start,
                                   diag_len=sel.diag_len, q_offset=nk - nq)
        dense = dense_pair_count(nq, nk, ctx.causal, ctx.key_padding, q.device).sum(dim=1).expand(b)
        return float(kept.sum().item()) / max(float(dense.sum().item()), 1.0)

    def _record(self, q, k, ctx: AttnContext, p: TokenTopKParams, sel: _Selection) -> None:
        if recorder_active():
            d = self._density(q, k, ctx, p, sel) if ctx.attn_mask is None else \
                self.achieved_density(q, k, None, ctx, p)
            record_density(ctx.site, self.name, self._requested(p, k.shape[2], d), d)

    # -- what subclasses (token_topp) change: the selection and what it asked for ----------------
    def select(self, q, k, ctx: AttnContext, p: TokenTopKParams) -> _Selection:
        """The chunks' selected key positions (see :func:`select_tokens`)."""
        return select_tokens(q, k, ctx, p)

    def _requested(self, p: TokenTopKParams, nk: int, achieved: float) -> float:
        return p.keep if p.keep > 0 else min(1.0, (p.n_init + p.top_k + p.n_local) / max(nk, 1))

    def fast_paths(self):
        return {"gather": self._gather}

    def fast_available(self, name: str, q, ctx: AttnContext, p: VariantParams) -> bool:
        return not ctx.modulated and ctx.attn_mask is None

    def keep_mask(self, q, k, v, ctx: AttnContext, p: TokenTopKParams, block_mask=None) -> torch.Tensor:
        b, hq, nq, _ = q.shape
        keep = selection_keep(self.select(q, k, ctx, p), nq, k.shape[2], p.chunk)
        return keep.expand(b, hq, nq, k.shape[2])

    def requested_density(self, p: TokenTopKParams) -> float:
        # with an absolute top_k the fraction depends on the length (recorded per call instead)
        return float(p.keep) if p.keep > 0 else 1.0

    def achieved_density(self, q, k, v, ctx: AttnContext, p: TokenTopKParams, block_mask=None) -> float:
        if ctx.attn_mask is not None:
            return super().achieved_density(q, k, v, ctx, p, block_mask)
        return self._density(q, k, ctx, p, self.select(q, k, ctx, p))

    # -- test-matrix hooks ------------------------------------------------------------
    def degenerate_params(self, n: int) -> TokenTopKParams:
        return TokenTopKParams(n_init=4, n_local=8, top_k=n, chunk=16)

    def example_params(self, n: int, hq: int) -> TokenTopKParams:
        return TokenTopKParams(n_init=4, n_local=8, top_k=max(1, math.ceil(n / 8)), chunk=16)

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"n_init": 2, "n_local": 4, "top_k": 4, "chunk": 8})
