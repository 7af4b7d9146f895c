"""``knn``: K-NN Context Attention (KCA, methods.md §13e), training-free.

Each query keeps its K highest logits ``z_ij = q_i·k_j · scale`` (+ a float ``attn_mask``)
among the keys dense attention allows it; the rest are masked before the softmax. With
``context_token`` a "context prompt" column is appended: the mean key k̄_i and mean value v̄_i
over the keys query i is allowed to see, with logit ``q_i·k̄_i · scale`` (no mask bias). For a
causal site that is the causal running mean over real keys at positions ≤ i (the spec's "mean
of all tokens" would leak future tokens); non-causal it is the mean over all real keys.

    O_i = softmax([z̃_i ; q_i·k̄_i·scale]) · [V ; v̄_i]

* K: ``top_k`` keys, or with ``top_k = 0`` ⌈frac · n_i⌉ with n_i the number of keys query i
  may see ([PROPOSED] K = ⌈0.5·N⌉; per-row n_i keeps causal rows at the same fraction and
  never depends on later tokens). K ≥ n_i keeps every key.
* Ties: every key whose logit equals the K-th largest is kept (so a row may keep more than
  K keys when logits tie exactly). The logits that drive selection are computed by one
  function on fixed query chunks for the reference and the fast path, so both make the
  same choices bit for bit.
* Degenerate: K ≥ N and ``context_token=False`` is dense attention.
* KCA's three cascaded stages belong to the trained few-shot model; a single attention
  site gets one stage. Modulation hooks (reference only): ``logit_fn`` edits the token
  logits, and the top-K is taken over the edited logits; ``prob_fn`` sees the token probabilities
  [B,Hq,Nq,Nk] (the context column is left as is), ``out_fn`` the final output.

Fast path ``chunked``: ``_ROWS`` query rows at a time, the selection logits against the keys
those rows can see ([B, Hkv, g·rows, span], never Nq×Nk for all rows), the per-row threshold by
``topk``, then the CPU flash kernel under the kept-key mask, merged with the context column
through the log-sum-exp. Top-K needs every logit, so the work stays O(N²): the path bounds
memory but is slower than dense SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from surgeon.errors import BadInput
from surgeon.kernels.gather_cpu import attend_lse, dense_pair_count, merge_lse
from surgeon.attention.base import (
    AttnContext,
    Variant,
    VariantParams,
    additive_mask,
    allowed_mask,
    check_range,
    record_density,
    recorder_active,
    repeat_kv,
)

NEG_INF = float("-inf")
# Query rows per selection chunk (fixed: the reference and the fast path must chunk alike).
_ROWS = 256


@dataclass(frozen=True)
class KNNParams(VariantParams):
    """top_k: keys kept per query (0 = use frac); frac: kept fraction of the keys a query may
    see when top_k = 0; context_token: append the mean-token key/value column."""

    top_k: int = 0
    frac: float = 0.5
    context_token: bool = True

    def __post_init__(self) -> None:
        check_range("top_k", self.top_k, 0, 1 << 30)
        check_range("frac", self.frac, 0.0, 1.0, lo_open=True)
        if not isinstance(self.context_token, bool):
            raise BadInput(f"context_token={self.context_token!r} is not a bool", "use true or false")


def _span(ctx: AttnContext, nq: int, nk: int, r1: int) -> int:
    """Keys a chunk of rows ending at row r1 (exclusive) can see: [0, span)."""
    return min(nk, nk - nq + r1) if ctx.causal else nk


def _chunk_logits(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, r0: int, r1: int) -> torch.Tensor:
    """Scaled logits (+ float attn_mask) of query rows [r0, r1) against the keys they can see:
    [B,Hq,r1−r0,span] (see :func:`_span`)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    c = r1 - r0
    ke = _span(ctx, nq, nk, r1)
    z = torch.matmul(q[:, :, r0:r1].reshape(b, hkv, g * c, d), k[:, :, :ke].transpose(-1, -2))
    z = z.view(b, hq, c, ke) * ctx.scale
    add = additive_mask(ctx)
    if add is not None:
        z = z + add.expand(*add.shape[:2], nq, nk)[:, :, r0:r1, :ke]
    return z


def _chunk_allowed(ctx: AttnContext, b: int, nq: int, nk: int, r0: int, r1: int, device) -> torch.Tensor:
    """Dense-allowed pairs of rows [r0, r1): bool [B, 1|Hq, r1−r0, span]."""
    ke = _span(ctx, nq, nk, r1)
    m = torch.ones(1, 1, r1 - r0, ke, dtype=torch.bool, device=device)
    if ctx.causal:
        qpos = torch.arange(nk - nq + r0, nk - nq + r1, device=device)[:, None]
        m = m & (torch.arange(ke, device=device)[None, :] <= qpos)[None, None]
    if ctx.key_padding is not None:
        m = m & ctx.key_padding.to(torch.bool)[:, None, None, :ke]
    if ctx.attn_mask is not None and ctx.attn_mask.dtype == torch.bool:
        am = ctx.attn_mask.expand(*ctx.attn_mask.shape[:2], nq, nk)
        m = m & am[:, :, r0:r1, :ke]
    return m.expand(b, m.shape[1], r1 - r0, ke)


def _threshold(zm: torch.Tensor, allow: torch.Tensor, p: KNNParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row K-th largest allowed logit and K: zm [B,Hq,c,S] (−inf where not allowed) →
    (thr [B,Hq,c,1], kk [B,Hq,c]); rows with K = 0 get thr = +inf."""
    n_allow = allow.sum(dim=-1)  # [B, 1|Hq, c]
    if p.top_k > 0:
        kk = torch.clamp(n_allow, max=p.top_k)
    else:
        kk = torch.ceil(n_allow.to(torch.float64) * p.frac - 1e-9).to(torch.long)
    kk = torch.minimum(kk, n_allow).expand(zm.shape[:-1])
    kmax = int(kk.max().item()) if kk.numel() else 0
    if kmax == 0:
        return torch.full((*zm.shape[:-1], 1), float("inf"), dtype=zm.dtype, device=zm.device), kk
    vals = torch.topk(zm, kmax, dim=-1, sorted=False).values  # the kmax largest, any order
    pos = kk > 0
    kmin = int(kk[pos].min().item()) if bool(pos.any()) else kmax
    # the kk-th largest of the row is the (kmax − kk)-th smallest (0-based) of ``vals``
    low = torch.topk(vals, kmax - kmin + 1, dim=-1, largest=False, sorted=True).values
    thr = low.gather(-1, (kmax - kk).clamp(0, kmax - kmin)[..., None])
    return torch.where((kk > 0)[..., None], thr, torch.full_like(thr, float("inf"))), kk


def _keep_chunk(z: torch.Tensor, allow: torch.Tensor, p: KNNParams) -> torch.Tensor:
    """Top-K keep mask of one chunk: z [B,Hq,c,S] logits, allow bool broadcastable → bool."""
    zm = z.masked_fill(~allow, NEG_INF)
    thr, _ = _threshold(zm, allow, p)
    return (zm >= thr) & allow


def knn_keep(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, p: KNNParams) -> torch.Tensor:
    """The selection as a bool keep mask [B,Hq,Nq,Nk] (reference use only)."""
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    out = torch.zeros(b, hq, nq, nk, dtype=torch.bool, device=q.device)
    for r0 in range(0, nq, _ROWS):
        r1 = min(nq, r0 + _ROWS)
        keep = _keep_chunk(_chunk_logits(q, k, ctx, r0, r1), _chunk_allowed(ctx, b, nq, nk, r0, r1, q.device), p)
        out[:, :, r0:r1, : keep.shape[-1]] = keep
    return out


def _context_kv(k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, nq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean key/value over the keys each query may see, without an N×N mask (causal running
    mean or plain mean; not for a bool attn_mask). → k̄ [B,Hkv,Nq,D], v̄ [B,Hkv,Nq,Dv],
    count [B,1,Nq,1]."""
    b, hkv, nk, d = k.shape
    w = (torch.ones(b, nk, dtype=k.dtype, device=k.device) if ctx.key_padding is None
         else ctx.key_padding.to(k.dtype).expand(b, nk))
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    wk = torch.where(w[:, None, :, None] > 0, k, zero)  # where, not a product: padding may hold inf
    wv = torch.where(w[:, None, :, None] > 0, v, zero)
    if ctx.causal:
        sel = torch.arange(nk - nq, nk, device=k.device)
        ks, vs, cnt = wk.cumsum(dim=2)[:, :, sel], wv.cumsum(dim=2)[:, :, sel], w.cumsum(dim=1)[:, sel]
    else:
        ks = wk.sum(dim=2, keepdim=True).expand(b, hkv, nq, d)
        vs = wv.sum(dim=2, keepdim=True).expand(b, hkv, nq, v.shape[3])
        cnt = w.sum(dim=1, keepdim=True).expand(b, nq)
    cnt = cnt[:, None, :, None]
    return ks / cnt.clamp_min(1.0), vs / cnt.clamp_min(1.0), cnt


def _finish(z: torch.Tensor, keep: torch.Tensor, zc: Optional[torch.Tensor], has_ctx: Optional[torch.Tensor]):
    """Masked softmax over the kept logits plus the optional context column.
    → (token probabilities [..., Nk], context probability [..., 1] or None)."""
    z = z.masked_fill(~keep, NEG_INF)
    mx = z.amax(dim=-1, keepdim=True)
    if zc is not None:
        zc = zc.masked_fill(~has_ctx, NEG_INF)
        mx = torch.maximum(mx, zc)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(z - mx)
    den = e.sum(dim=-1, keepdim=True)
    ec = None
    if zc is not None:
        ec = torch.exp(zc - mx)
        den = den + ec
    den = torch.where(den > 0, den, torch.ones_like(den))
    return e / den, (ec / den if ec is not None else None)


class KNN(Variant):
    name = "knn"
    lowering_module = "surgeon.attention.knn.lowering"
    Params = KNNParams
    family = "sparse"
    description = "K-NN context attention: per-query top-K keys by q·k plus a mean-token context column"

    def reference(self, q, k, v, ctx: AttnContext, p: KNNParams, block_mask=None):
        b, hq, nq, _ = q.shape
        nk = k.shape[2]
        kk, vv = repeat_kv(k, hq), repeat_kv(v, hq)
        z = torch.matmul(q, kk.transpose(-1, -2)) * ctx.scale
        add = additive_mask(ctx)
        if add is not None:
            z = z + add
        allow = allowed_mask(ctx, b, nq, nk, q.device)
        if ctx.logit_fn is not None:
            z = ctx.logit_fn(z)
            keep = _keep_chunk(z, allow, p)  # the edited logits are the ones ranked
        else:
            keep = knn_keep(q, k, ctx, p)  # chunked like the fast path: identical choices
        zc = has_ctx = None
        if p.context_token:
            w = allow.to(q.dtype)  # [B, 1|Hq, Nq, Nk]
            cnt = w.sum(dim=-1, keepdim=True)
            kbar = torch.matmul(w, kk) / cnt.clamp_min(1.0)
            vbar = torch.matmul(w, vv) / cnt.clamp_min(1.0)
            zc = (q * kbar).sum(dim=-1, keepdim=True) * ctx.scale
            has_ctx = cnt > 0
        pt, pc = _finish(z, keep & allow, zc, has_ctx)
        if ctx.prob_fn is not None:
            pt = ctx.prob_fn(pt)
        out = torch.matmul(pt, vv)
        if pc is not None:
            out = out + pc * vbar
        if ctx.out_fn is not None:
            out = ctx.out_fn(out, vv)
        self._record_keep(q, k, ctx, p, keep & allow)
        return out

    def _chunked(self, q, k, v, ctx: AttnContext, p: KNNParams, block_mask=None, *, fused: bool = True):
        """Query-chunked top-K attention: the selection logits of ``_ROWS`` query rows at a time
        ([B,Hkv, g·rows, span], never N×N for all rows), then the CPU flash kernel under the
        kept-key mask, merged with the context column through the log-sum-exp."""
        b, hq, nq, d = q.shape
        hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
        g = hq // hkv
        out = q.new_empty(b, hq, nq, dv)
        if p.context_token:
            kbar, vbar, cnt = _context_kv(k, v, ctx, nq)
        kept = 0.0
        for r0 in range(0, nq, _ROWS):
            r1 = min(nq, r0 + _ROWS)
            c = r1 - r0
            ke = _span(ctx, nq, nk, r1)
            allow = _chunk_allowed(ctx, b, nq, nk, r0, r1, q.device)
            zm = _chunk_logits(q, k, ctx, r0, r1).masked_fill_(~allow, NEG_INF)
            thr, kk = _threshold(zm, allow, p)
            keep = zm >= thr  # disallowed keys are −inf < thr
            if recorder_active():
                kept += float(keep.sum().item())
            mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~keep, NEG_INF)
            qc = q[:, :, r0:r1].reshape(b, hkv, g * c, d)
            o, lse = attend_lse(qc, k[:, :, :ke], v[:, :, :ke], mask.view(b, hkv, g * c, ke), ctx.scale,
                                (kk > 0).reshape(b, hkv, g * c), fused=fused)
            if p.context_token:
                zc = (qc.view(b, hkv, g, c, d) * kbar[:, :, None, r0:r1]).sum(-1).reshape(b, hkv, g * c) * ctx.scale
                zc = zc.masked_fill((cnt[:, :, r0:r1, 0] == 0).expand(b, g, c).reshape(b, 1, g * c), NEG_INF)
                vb = vbar[:, :, None, r0:r1].expand(b, hkv, g, c, dv).reshape(b, hkv, g * c, dv)
                o = merge_lse(o, lse, vb, zc)
            out[:, :, r0:r1] = o.view(b, hq, c, dv)
        if recorder_active():
            dense = float(dense_pair_count(nq, nk, ctx.causal, ctx.key_padding, q.device).sum().item())
            dense *= hq * (b if ctx.key_padding is None else 1)
            record_density(ctx.site, self.name, self.requested_density(p), kept / max(dense, 1.0))
        return out

    def _record_keep(self, q, k, ctx: AttnContext, p: KNNParams, keep: torch.Tensor) -> None:
        if recorder_active():
            allow = allowed_mask(ctx, q.shape[0], q.shape[2], k.shape[2], q.device)
            denom = float(allow.expand(keep.shape).sum().item())
            record_density(ctx.site, self.name, self.requested_density(p), float(keep.sum().item()) / max(denom, 1.0))

    def fast_paths(self):
        return {"chunked": self._chunked}

    def fast_available(self, name: str, q, ctx: AttnContext, p: VariantParams) -> bool:
        return not ctx.modulated and ctx.attn_mask is None

    def keep_mask(self, q, k, v, ctx: AttnContext, p: KNNParams, block_mask=None) -> torch.Tensor:
        """Kept token keys (the context column is not a key position and is not counted)."""
        return knn_keep(q, k, ctx, p)

    def requested_density(self, p: KNNParams) -> float:
        # an absolute top_k is a fraction only at a given length
        return float(p.frac) if p.top_k == 0 else 1.0

    # -- test-matrix hooks ------------------------------------------------------------
    def degenerate_params(self, n: int) -> KNNParams:
        return KNNParams(top_k=n, context_token=False)

    def example_params(self, n: int, hq: int) -> KNNParams:
        return KNNParams(top_k=0, frac=0.3, context_token=True)

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"top_k": 0, "frac": 0.3, "context_token": True})
