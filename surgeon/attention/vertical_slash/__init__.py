"""``vertical_slash``: MInference's vertical-slash pattern, per head, estimated causally.

MInference (methods.md §13g, §14f) keeps, per head, the top vertical columns (keys that every
query attends: sinks, separators) and the top slash diagonals (fixed query−key offsets: local
and periodic patterns), estimated from the attention of the last 64 queries of the prompt.
Estimating from the prompt's last queries lets every token's output depend on the end of the
prompt — not causal. Our causal-safe version [PROPOSED]:

* queries are processed in blocks of ``block_size`` rows; block i's pattern is estimated from
  the ``last_q`` query rows *ending at the block's first row* (rows i·bs − t, t < last_q, ≥ 0;
  real queries only), i.e. the most recent queries that every row of the block may see, so a
  later token never changes an earlier output. Non-causal sites use the ``last_q`` rows ending
  at the block's last row.
* P = each estimator row's softmax over the keys it may see (causal: up to its position;
  real keys). Vertical score of key j: Σ_r P[r, j]; slash score of offset δ = pos − j:
  Σ_r P[r, pos_r − δ].
* per (batch, query head, query block): verticals = the first ``sink_tokens`` keys plus the
  top ``n_vertical`` other real keys the estimator rows could see (causal: keys at or before
  the block's first position); slashes = offsets 0 … ``local``−1 (non-causal: |δ| < local)
  plus the top ``n_slash`` other offsets (causal: 0 ≤ δ ≤ the block's last position). Ties go
  to the lower index (key position / offset + Nq − 1).
* row at position pos keeps key j when j is a vertical of its block or pos − j is one of its
  slashes (then the usual causal/padding masks). ``n_vertical`` and ``n_slash`` ≥ Nk (all
  offsets) is dense attention.

Fast path ``gather`` (:func:`vertical_slash_attention`): per query block, the vertical keys are
gathered once ([B,Hq,Kv,D]) and attended by the block's rows with one matmul; each row's slash
keys (pos − δ for the block's offsets) are gathered per row and scored by a batched dot
product; both parts share one softmax. Work per row ∝ (sink + n_vertical + local + n_slash),
not Nk. Estimation costs last_q / block_size of a dense QKᵀ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from surgeon.kernels.geometry import num_blocks, query_validity
from surgeon.kernels.gather_cpu import attend_lse, dense_pair_count, real_keys
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
_CHUNK_ELEMS = 1 << 22


@dataclass(frozen=True)
class VerticalSlashParams(VariantParams):
    """n_vertical: top key columns per head and query block (besides the sinks); n_slash: top
    diagonals (besides the local ones); last_q: estimator query rows per block; block_size:
    query rows sharing one pattern; sink_tokens: leading keys always kept; local: offsets
    0 … local−1 always kept (the local band)."""

    n_vertical: int = 128
    n_slash: int = 256
    last_q: int = 16
    block_size: int = 256
    sink_tokens: int = 4
    local: int = 64

    def __post_init__(self) -> None:
        check_range("n_vertical", self.n_vertical, 0, 1 << 30)
        check_range("n_slash", self.n_slash, 0, 1 << 30)
        check_range("last_q", self.last_q, 1, 1 << 20)
        check_range("block_size", self.block_size, 1, 1 << 20)
        check_range("sink_tokens", self.sink_tokens, 0, 1 << 30)
        check_range("local", self.local, 0, 1 << 30)


@dataclass(frozen=True)
class VSPattern:
    """Per-(batch, query head, query block) pattern: verticals [B,Hq,nqb,Nk] bool over key
    positions; slashes [B,Hq,nqb,Nk+Nq−1] bool over offset index o = pos − j + Nq − 1."""

    vertical: torch.Tensor
    slash: torch.Tensor


def estimator_rows(nq: int, block_size: int, last_q: int, causal: bool,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [nqb, last_q] long clamped to [0, Nq), ok [nqb, last_q] bool)."""
    nqb = num_blocks(nq, block_size)
    t = torch.arange(last_q, device=device)
    blk = torch.arange(nqb, device=device)
    end = blk * block_size if causal else torch.clamp((blk + 1) * block_size, max=nq) - 1
    rows = end[:, None] - t[None, :]
    return rows.clamp(0, max(nq - 1, 0)), rows >= 0


def vs_scores(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, p: VerticalSlashParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertical scores [B,Hq,nqb,Nk], slash scores [B,Hq,nqb,Nk+Nq−1]) in q's dtype."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    dev = q.device
    nqb = num_blocks(nq, p.block_size)
    no = nk + nq - 1
    rows, ok = estimator_rows(nq, p.block_size, p.last_q, ctx.causal, dev)
    t = rows.shape[1]
    qv = query_validity(ctx.key_padding, nq, nk, ctx.causal)
    okb = ok[None].expand(b, nqb, t)
    if qv is not None:
        okb = okb & qv[:, rows]
    kreal = real_keys(ctx.key_padding, b, nk, dev)
    kpos = torch.arange(nk, device=dev)
    off = nk - nq
    pos = off + rows  # [nqb, T]
    vsc = q.new_zeros(b, hq, nqb, nk)
    ssc = q.new_zeros(b, hq, nqb, no)
    o_ar = torch.arange(no, device=dev)
    step = max(1, min(8, _CHUNK_ELEMS // max(1, b * hq * t * nk)))
    for c0 in range(0, nqb, step):
        c1 = min(nqb, c0 + step)
        cb = c1 - c0
        rc = rows[c0:c1]
        kend = min(nk, off + int(rc.max().item()) + 1) if ctx.causal else nk
        r = rc.reshape(-1)
        qs = (q[:, :, r] * ctx.scale).view(b, hkv, g * r.numel(), d)
        z = torch.matmul(qs, k[:, :, :kend].transpose(-1, -2)).view(b, hq, cb, t, kend)
        if ctx.key_padding is not None:
            z.masked_fill_(~kreal[:, None, None, None, :kend], NEG_INF)
        if ctx.causal:
            kmin = min(kend, off + int(rc.min().item()) + 1)
            z[..., kmin:kend].masked_fill_(kpos[None, None, kmin:kend] > pos[c0:c1][:, :, None], NEG_INF)
        mx = z.amax(dim=-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        e = z.sub_(mx).exp_()
        den = e.sum(dim=-1, keepdim=True)
        okr = okb[:, None, c0:c1, :, None] & (den > 0)
        pr = e.mul_(torch.where(okr, 1.0 / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den)))
        vsc[:, :, c0:c1, :kend] = pr.sum(dim=3)
        # slash sums by a skew: row t sits at E − t (E = the window's last position), so
        # Σ_t P[t, E − t − δ] = X[E − δ] with X[x] = Σ_t P[t, x − t] (rows shifted right by t)
        w = kend + t
        pp = torch.nn.functional.pad(pr, (t, 0)).contiguous()  # [B,Hq,cb,T,kend+T]
        st = pp.stride()
        xs = pp.as_strided((b, hq, cb, t, w - 1), (st[0], st[1], st[2], w - 1, 1),
                           pp.storage_offset() + t).sum(dim=3)  # [B,Hq,cb,W-1], X[x]
        e_pos = off + rc[:, 0]  # [cb] position of row t = 0
        x = e_pos[:, None] - (o_ar[None, :] - (nq - 1))  # [cb, O]
        inside = (x >= 0) & (x < w - 1)
        got = torch.gather(xs, 3, x.clamp(0, w - 2)[None, None].expand(b, hq, cb, no))
        ssc[:, :, c0:c1] = got.masked_fill_(~inside[None, None], 0.0)
    return vsc, ssc


def select_top_k(scores: torch.Tensor, allowed: torch.Tensor, forced: torch.Tensor, candidate: torch.Tensor,
                 k: torch.Tensor) -> torch.Tensor:
    """``blocksparse_cpu.select_top`` (same result, ties toward the lower index) by a partial
    top-k instead of a full sort: the k-th value per row, everything above it, and the lowest
    indices among the entries equal to it. Shapes as ``select_top``."""
    forced = forced & allowed
    s = scores.masked_fill(~(allowed & candidate), NEG_INF).masked_fill(forced, float("inf"))
    n_forced = forced.sum(dim=-1)
    k_eff = torch.maximum(k, n_forced).clamp(max=s.shape[-1])  # [B,H,R]
    kmax = int(k_eff.max().item()) if k_eff.numel() else 0
    if kmax == 0:
        return torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    vals = torch.topk(s, kmax, dim=-1, largest=True, sorted=True).values
    kth = torch.gather(vals, -1, (k_eff - 1).clamp_min(0)[..., None])  # [B,H,R,1]
    above = s > kth
    tie = s == kth
    room = (k_eff - above.sum(dim=-1))[..., None]
    take = above | (tie & (torch.cumsum(tie.to(torch.int32), dim=-1) <= room))
    return take & (s > NEG_INF) & (k_eff > 0)[..., None]


def vs_pattern(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, p: VerticalSlashParams) -> VSPattern:
    """The selected verticals and slashes of every (batch, head, query block)."""
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    dev = q.device
    nqb = num_blocks(nq, p.block_size)
    vsc, ssc = vs_scores(q, k, ctx, p)
    blk = torch.arange(nqb, device=dev)
    q_first = (nk - nq) + blk * p.block_size
    q_last = (nk - nq) + torch.clamp((blk + 1) * p.block_size, max=nq) - 1
    j = torch.arange(nk, device=dev)
    allow_v = (j[None, :] <= q_first[:, None]) if ctx.causal else torch.ones(nqb, nk, dtype=torch.bool, device=dev)
    force_v = allow_v & (j[None, :] < p.sink_tokens)
    kreal = real_keys(ctx.key_padding, b, nk, dev)[:, None, None, :]
    kv = force_v.sum(dim=-1) + p.n_vertical  # [nqb]
    vert = select_top_k(vsc, allow_v, force_v, kreal, kv[None, None].expand(b, hq, nqb))
    delta = torch.arange(nk + nq - 1, device=dev) - (nq - 1)
    if ctx.causal:
        allow_s = (delta[None, :] >= 0) & (delta[None, :] <= q_last[:, None])
        force_s = allow_s & (delta[None, :] < p.local)
    else:
        allow_s = torch.ones(nqb, nk + nq - 1, dtype=torch.bool, device=dev)
        force_s = delta.abs()[None, :].expand(nqb, -1) < p.local
    ks = force_s.sum(dim=-1) + p.n_slash
    ones = torch.ones(1, 1, 1, nk + nq - 1, dtype=torch.bool, device=dev)
    slash = select_top_k(ssc, allow_s, force_s, ones, ks[None, None].expand(b, hq, nqb))
    return VSPattern(vertical=vert, slash=slash)


def pattern_keep(pat: VSPattern, nq: int, nk: int, block_size: int, r0: int = 0, r1: Optional[int] = None) -> torch.Tensor:
    """Token keep mask [B,Hq,r1−r0,Nk] of query rows r0 … r1−1 (default all; reference use)."""
    r1 = nq if r1 is None else r1
    dev = pat.vertical.device
    blk = torch.arange(r0, r1, device=dev) // block_size
    v = pat.vertical[:, :, blk]  # [B,H,R,Nk]
    s = pat.slash[:, :, blk]  # [B,H,R,O]
    pos = (nk - nq) + torch.arange(r0, r1, device=dev)
    o = pos[:, None] - torch.arange(nk, device=dev)[None, :] + (nq - 1)  # [R, Nk] in [0, O)
    return v | torch.gather(s, 3, o[None, None].expand(s.shape[0], s.shape[1], -1, -1))


# Row-gathered slash keys cost about this many times a matmul-scored key (measured on the CPU,
# SmolLM2 shape): a row chunk takes the union path unless its union is larger than this
# factor times the slash count.
_ROW_GATHER_COST = 8


def _choose_path(cost_prefix: int, cost_union: int, cost_rows: int) -> str:
    """The cheapest of the kernel's three equal computations for one row chunk."""
    if cost_prefix <= min(cost_union, cost_rows):
        return "prefix"
    return "union" if cost_union <= cost_rows else "rows"


def _softmax_rows(z: torch.Tensor) -> torch.Tensor:
    mx = z.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(z - mx)
    s = e.sum(dim=-1, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def vertical_slash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pat: VSPattern, *, block_size: int,
                             causal: bool, scale: float, key_padding: Optional[torch.Tensor] = None,
                             rows: int = 16) -> torch.Tensor:
    """Attention over each row's verticals ∪ slashes. q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D|Dv] →
    [B,Hq,Nq,Dv]; equals ``attention_from_keep`` with ``pattern_keep``.

    Rows are processed in chunks of ``rows``. A chunk's slash keys are, per head, the union of
    the key ranges [P0 − δ, P1 − δ] of its offsets (P0..P1 the chunk's positions); with the
    verticals they are gathered once and scored by one matmul under the exact token mask
    (vertical, or pos − j a slash). Per chunk the cheapest of three equal computations runs:
    that union gather; the contiguous visible prefix under the same mask (when the union covers
    most of it: no gather); or, for scattered offsets, each row's slash keys gathered (exact
    work, slower per key)."""
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    dev = q.device
    no = nk + nq - 1
    off = nk - nq
    kreal = real_keys(key_padding, b, nk, dev)
    kflat, vflat = k.reshape(b * hkv * nk, d), v.reshape(b * hkv * nk, dv)
    base = ((torch.arange(b, device=dev)[:, None] * hkv + torch.arange(hq, device=dev)[None, :] // g) * nk)[:, :, None]
    ar_k = torch.arange(nk, device=dev)
    ar_o = torch.arange(no, device=dev)
    out = q.new_zeros(b, hq, nq, dv)
    for i in range(num_blocks(nq, block_size)):
        r0, r1 = i * block_size, min(nq, (i + 1) * block_size)
        vm = pat.vertical[:, :, i] & kreal[:, None, :]  # [B,H,Nk]
        sm = pat.slash[:, :, i]  # [B,H,O]
        cs = torch.cat([sm.new_zeros(b, hq, 1, dtype=torch.int32), torch.cumsum(sm.to(torch.int32), dim=-1)], dim=-1)
        n_s = int(sm.sum(dim=-1).max().item())
        for a0 in range(r0, r1, rows):
            a1 = min(r1, a0 + rows)
            p0, p1 = off + a0, off + a1 - 1
            pos = off + torch.arange(a0, a1, device=dev)  # [R]
            # union of the slash ranges: some δ ∈ S with p0 − δ ≤ j ≤ p1 − δ
            lo = (p0 - ar_k + nq - 1).clamp(0, no)
            hi = (p1 - ar_k + nq).clamp(0, no)
            union = (cs[..., hi] - cs[..., lo]) > 0  # [B,H,Nk]
            keys = (union | vm) & kreal[:, None, :]
            if causal:
                keys = keys & (ar_k <= p1)
            n_u = int(keys.sum(dim=-1).max().item())
            n_v = int(vm.sum(dim=-1).max().item())
            qs = q[:, :, a0:a1] * scale  # [B,H,R,D]
            kend = min(nk, p1 + 1) if causal else nk
            cost_prefix = kend  # contiguous keys, no gather
            cost_union = 2 * n_u  # gathered keys, one matmul
            cost_rows = _ROW_GATHER_COST * n_s + 2 * n_v
            path = _choose_path(cost_prefix, cost_union, cost_rows)
            if path == "prefix":
                # the union covers most of the visible keys: score the contiguous prefix, mask exactly
                rr = a1 - a0
                o_idx = (pos[:, None] + (nq - 1)) - ar_k[None, :kend]  # [R, kend]
                m = torch.gather(sm, 2, o_idx.reshape(1, 1, -1).expand(b, hq, -1)).view(b, hq, rr, kend)
                m = (m | vm[:, :, None, :kend]) & kreal[:, None, None, :kend]
                if causal:
                    m = m & (ar_k[None, :kend] <= pos[:, None])
                bias = torch.zeros(m.shape, dtype=q.dtype, device=dev).masked_fill_(~m, NEG_INF)
                o, _ = attend_lse(q[:, :, a0:a1].reshape(b, hkv, g * rr, d), k[:, :, :kend], v[:, :, :kend],
                                  bias.view(b, hkv, g * rr, kend), scale, m.any(dim=-1).view(b, hkv, g * rr))
                out[:, :, a0:a1] = o.view(b, hq, rr, dv)
                continue
            if path == "union":
                idx = torch.sort(torch.where(keys, ar_k, nk), dim=-1).values[..., :n_u]  # [B,H,U]
                ok = idx < nk
                ic = idx.clamp(max=nk - 1)
                flat = (base + ic).reshape(-1)
                kg = kflat.index_select(0, flat).view(b, hq, n_u, d)
                vg = vflat.index_select(0, flat).view(b, hq, n_u, dv)
                o_idx = (pos[:, None] + (nq - 1)) - ic[:, :, None, :]  # [B,H,R,U] in [0, O)
                m = torch.gather(sm, 2, o_idx.clamp(0, no - 1).flatten(2)).view_as(o_idx)
                m = (m | torch.gather(vm, 2, ic)[:, :, None, :]) & ok[:, :, None, :]
                if causal:
                    m = m & (ic[:, :, None, :] <= pos[None, None, :, None])
                bias = torch.zeros(m.shape, dtype=q.dtype, device=dev).masked_fill_(~m, NEG_INF)
                out[:, :, a0:a1] = attend_lse(q[:, :, a0:a1], kg, vg, bias, scale, m.any(dim=-1))[0]
                continue
            # scattered offsets: verticals by matmul, each row's slash keys gathered
            kv_n = n_v
            vidx = torch.sort(torch.where(vm, ar_k, nk), dim=-1).values[..., :kv_n]
            vc = vidx.clamp(max=nk - 1)
            flat_v = (base + vc).reshape(-1)
            kvg = kflat.index_select(0, flat_v).view(b, hq, kv_n, d)
            vvg = vflat.index_select(0, flat_v).view(b, hq, kv_n, dv)
            okv = (vidx < nk)[:, :, None, :]
            if causal:
                okv = okv & (vidx[:, :, None, :] <= pos[None, None, :, None])
            zv = torch.matmul(qs, kvg.transpose(-1, -2)).masked_fill(~okv, NEG_INF)
            sidx = torch.sort(torch.where(sm, ar_o, no), dim=-1).values[..., :n_s]  # [B,H,Ks]
            key = pos[None, None, :, None] - (sidx[:, :, None, :] - (nq - 1))  # [B,H,R,Ks]
            kc = key.clamp(0, nk - 1)
            oks = (sidx[:, :, None, :] < no) & (key >= 0) & (key < nk)
            oks = oks & torch.gather(kreal[:, None, :].expand(b, hq, nk), 2, kc.flatten(2)).view_as(kc)
            oks = oks & ~torch.gather(vm, 2, kc.flatten(2)).view_as(kc)  # a vertical is counted once
            if causal:
                oks = oks & (key <= pos[None, None, :, None])
            flat_s = (base[:, :, :, None] + kc).reshape(-1)
            ksg = kflat.index_select(0, flat_s).view(b, hq, a1 - a0, n_s, d)
            vsg = vflat.index_select(0, flat_s).view(b, hq, a1 - a0, n_s, dv)
            zs = torch.matmul(ksg, qs[..., None])[..., 0].masked_fill(~oks, NEG_INF)
            pr = _softmax_rows(torch.cat([zv, zs], dim=-1))
            out[:, :, a0:a1] = torch.matmul(pr[..., :kv_n], vvg) + torch.matmul(pr[..., None, kv_n:], vsg)[..., 0, :]
    return out


def pattern_density(pat: VSPattern, nq: int, nk: int, block_size: int, causal: bool,
                    key_padding: Optional[torch.Tensor], rows: int = 256) -> float:
    """Kept pairs / dense pairs, counted exactly from the token pattern, ``rows`` query rows at
    a time (memory O(B·Hq·rows·Nk))."""
    b, hq = pat.vertical.shape[:2]
    dev = pat.vertical.device
    real = real_keys(key_padding, b, nk, dev)[:, None, None, :]
    kept = 0.0
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        keep = pattern_keep(pat, nq, nk, block_size, r0, r1) & real
        if causal:
            pos = (nk - nq) + torch.arange(r0, r1, device=dev)
            keep = keep & (torch.arange(nk, device=dev)[None, :] <= pos[:, None])
        kept += float(keep.sum().item())
    dense = dense_pair_count(nq, nk, causal, key_padding, dev).sum(dim=1).expand(b) * hq
    return kept / max(float(dense.sum().item()), 1.0)


class VerticalSlash(Variant):
    name = "vertical_slash"
    lowering_module = "surgeon.attention.vertical_slash.lowering"
    Params = VerticalSlashParams
    family = "sparse"
    description = ("MInference vertical-slash: per head and query block, top key columns and top diagonals "
                   "estimated (causally) from the queries just before the block")

    def reference(self, q, k, v, ctx: AttnContext, p: VerticalSlashParams, block_mask=None):
        pat = vs_pattern(q, k, ctx, p)
        out = attention_from_keep(q, k, v, ctx, pattern_keep(pat, q.shape[2], k.shape[2], p.block_size))
        self._record(q, k, ctx, p, pat)
        return out

    def _gather(self, q, k, v, ctx: AttnContext, p: VerticalSlashParams, block_mask=None):
        pat = vs_pattern(q, k, ctx, p)
        out = vertical_slash_attention(q, k, v, pat, block_size=p.block_size, causal=ctx.causal, scale=ctx.scale,
                                       key_padding=ctx.key_padding)
        self._record(q, k, ctx, p, pat)
        return out

    def _record(self, q, k, ctx: AttnContext, p: VerticalSlashParams, pat: VSPattern) -> None:
        if recorder_active():
            d = (pattern_density(pat, q.shape[2], k.shape[2], p.block_size, ctx.causal, ctx.key_padding)
                 if ctx.attn_mask is None else self.achieved_density(q, k, None, ctx, p))
            record_density(ctx.site, self.name, d, d)

    def fast_paths(self):
        return {"gather": self._gather}

    def fast_available(self, name: str, q, ctx: AttnContext, p: VariantParams) -> bool:
        return not ctx.modulated and ctx.attn_mask is None

    def keep_mask(self, q, k, v, ctx: AttnContext, p: VerticalSlashParams, block_mask=None) -> torch.Tensor:
        return pattern_keep(vs_pattern(q, k, ctx, p), q.shape[2], k.shape[2], p.block_size)

    def requested_density(self, p: VerticalSlashParams) -> float:
        return 1.0  # token budgets, not a fraction: the density follows the length (recorded per call)

    def achieved_density(self, q, k, v, ctx: AttnContext, p: VerticalSlashParams, block_mask=None) -> float:
        if ctx.attn_mask is not None:
            return super().achieved_density(q, k, v, ctx, p, block_mask)
        return pattern_density(vs_pattern(q, k, ctx, p), q.shape[2], k.shape[2], p.block_size, ctx.causal,
                               ctx.key_padding)

    def selection_overhead(self, p: VerticalSlashParams) -> float:
        """Estimator work as a fraction of dense QKᵀ work."""
        return min(1.0, p.last_q / p.block_size)

    # -- test-matrix hooks ------------------------------------------------------------
    def degenerate_params(self, n: int) -> VerticalSlashParams:
        return VerticalSlashParams(n_vertical=n, n_slash=2 * n, last_q=4, block_size=16, sink_tokens=2, local=4)

    def example_params(self, n: int, hq: int) -> VerticalSlashParams:
        return VerticalSlashParams(n_vertical=max(1, n // 16), n_slash=max(1, n // 16), last_q=4, block_size=16,
                                   sink_tokens=2, local=4)

    def small_example_params(self, hq: int) -> VerticalSlashParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"n_vertical": 3, "n_slash": 3, "last_q": 4, "block_size": 8, "sink_tokens": 1,
                                 "local": 2})
