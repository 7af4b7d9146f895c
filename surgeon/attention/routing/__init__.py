"""``routing``: BiFormer bi-level routing attention as a training-free approximation (methods.md §12).

Tokens: ``n_extra`` leading tokens (CLS, registers) followed by a ``grid_h × grid_w`` grid in
row-major order (the grid is inferred as a square when both sizes are 0, or from one size).
The grid is split into ``n_win × n_win`` regions; token (y, x) lies in region
(⌊y·n_win/H⌋, ⌊x·n_win/W⌋), which equals BiFormer's partition when n_win divides H and W and
spreads the remainder otherwise (BiFormer pads instead).

Non-causal (encoders; needs Nq == Nk):
1. Region descriptors: mean of the region's real queries Q^r and real keys K^r per head.
2. Affinity A^r = Σ_h (Q^r_h · scale) K^r_{g(h)}^T — one routing shared by all heads, as in
   BiFormer where the dot product runs over all channels (for GQA the KV head of each query
   head is used). Regions without a real key are never routed to.
3. Each region keeps its top-``topk`` regions (ties toward the lower region index); its
   tokens attend to the tokens of the kept regions (token attention, per head).
Extra tokens attend to everything and every token attends to them.

Causal sites: a region descriptor would mix future tokens into earlier outputs, so routing
is done per query token instead: token i scores region r with Σ_h q_{h,i} · K^r_{g(h)}(i) · scale,
where K^r(i) is the mean of the region's real keys at positions ≤ i, keeps its top-``topk``
regions that hold such a key, and the token-level causal mask applies. This is our
causal-correct extension; routing is meant for encoders (no fast path for causal sites).

``topk = n_win²`` is dense attention. Not included: LePE / the depth-wise conv (a trained
part of BiFormer), key/value downsampling.

Fast path ``gather`` (non-causal only): the queries of each region (padded to the largest
region) attend to the extra tokens plus the tokens of their routed regions, gathered once
per KV head (:func:`surgeon.kernels.gather_cpu.gathered_attention`); extra-token queries run
dense SDPA. Causal sites run the reference (it holds one head-summed Nq×Nk routing matrix).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from surgeon.errors import BadInput
from surgeon.kernels.geometry import query_validity
from surgeon.kernels.gather_cpu import gathered_attention, padding_bias, real_keys
from surgeon.attention.base import (
    AttnContext,
    Variant,
    VariantParams,
    allowed_mask,
    attention_from_keep,
    check_range,
    record_density,
    recorder_active,
)
from surgeon.attention.dense import sdpa

NEG_INF = float("-inf")


@dataclass(frozen=True)
class RoutingParams(VariantParams):
    """grid_h/grid_w: token grid (0 = infer); n_extra: leading non-grid tokens (CLS...);
    n_win: regions per side; topk: regions each region (or causal token) attends to."""

    grid_h: int = 0
    grid_w: int = 0
    n_extra: int = 0
    n_win: int = 7
    topk: int = 4

    def __post_init__(self) -> None:
        check_range("grid_h", self.grid_h, 0, 1 << 20)
        check_range("grid_w", self.grid_w, 0, 1 << 20)
        check_range("n_extra", self.n_extra, 0, 1 << 30)
        check_range("n_win", self.n_win, 1, 1 << 10)
        check_range("topk", self.topk, 1, self.n_win * self.n_win)


@dataclass(frozen=True)
class _Grid:
    h: int
    w: int
    n_extra: int
    n_reg: int
    reg: torch.Tensor  # [Nk] long region of each position, −1 for extra tokens
    onehot: torch.Tensor  # [Nk, R] membership (float, extras all zero)


def grid_of(nk: int, p: RoutingParams, device: torch.device, dtype: torch.dtype) -> _Grid:
    """The token grid of a length-``nk`` sequence (BadInput when the parameters do not fit)."""
    n = nk - p.n_extra
    if n <= 0:
        raise BadInput(f"routing: {nk} tokens leave no grid after n_extra={p.n_extra}",
                       "lower n_extra or route a site with a token grid")
    h, w = p.grid_h, p.grid_w
    if h == 0 and w == 0:
        h = w = math.isqrt(n)
        if h * h != n:
            raise BadInput(f"routing: {n} grid tokens are not a square", "set grid_h and grid_w (and n_extra)")
    elif h == 0 or w == 0:
        given = h or w
        if n % given:
            raise BadInput(f"routing: {n} grid tokens are not a multiple of {given}",
                           "set grid_h, grid_w and n_extra to match the site's token layout")
        h, w = (n // given, given) if h == 0 else (given, n // given)
    if h * w != n:
        raise BadInput(f"routing: grid {h}x{w} has {h * w} tokens but the site has {n} (+{p.n_extra} extra)",
                       "set grid_h, grid_w and n_extra to match the site's token layout")
    if p.n_win > min(h, w):
        raise BadInput(f"routing: n_win={p.n_win} is out of range for a {h}x{w} grid",
                       f"use n_win in [1, {min(h, w)}]")
    t = torch.arange(n, device=device)
    reg = (t // w) * p.n_win // h * p.n_win + (t % w) * p.n_win // w
    reg = torch.cat([torch.full((p.n_extra,), -1, dtype=torch.long, device=device), reg])
    r = p.n_win * p.n_win
    onehot = (reg[:, None] == torch.arange(r, device=device)[None, :]).to(dtype)
    return _Grid(h, w, p.n_extra, r, reg, onehot)


def _top_regions(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """scores [..., R] (−inf = never) → bool [..., R], top-k with ties to the lower index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return (ranks < topk) & (scores > NEG_INF)


def route_regions(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, p: RoutingParams, grid: _Grid) -> torch.Tensor:
    """Non-causal routing: bool [B, R, R] (query region → kept key regions)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    if nq != nk:
        raise BadInput(f"routing: a non-causal site needs as many queries as keys (got {nq} and {nk})",
                       "route self-attention sites only")
    qv = query_validity(ctx.key_padding, nq, nk, False)
    qw = grid.onehot[None] * (qv.to(q.dtype)[:, :, None] if qv is not None else 1.0)  # [B|1, N, R]
    kw = grid.onehot[None] * real_keys(ctx.key_padding, b, nk, k.device).to(k.dtype)[:, :, None]
    qr = torch.einsum("bhnd,bnr->bhrd", q, qw.expand(b, nq, grid.n_reg)) / qw.sum(1).clamp_min(1.0)[:, None, :, None]
    kcnt = kw.sum(1)  # [B, R]
    kr = torch.einsum("bhnd,bnr->bhrd", k, kw) / kcnt.clamp_min(1.0)[:, None, :, None]
    a = torch.einsum("bkgrd,bksd->brs", qr.view(b, hkv, g, grid.n_reg, d) * ctx.scale, kr)
    a = a.masked_fill((kcnt == 0)[:, None, :], NEG_INF)
    return _top_regions(a, p.topk)


def route_tokens(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, p: RoutingParams, grid: _Grid) -> torch.Tensor:
    """Causal routing: bool [B, Nq, R] (query token → kept key regions). Materialises one
    [B, Nq, Nk] head-summed score matrix (reference use)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    zs = torch.einsum("bknd,bkmd->bnm", q.view(b, hkv, g, nq, d).sum(2), k)  # Σ_h q_h·k_g(h)
    qpos = torch.arange(nk - nq, nk, device=q.device)[:, None]
    m = (torch.arange(nk, device=q.device)[None, :] <= qpos)[None] & real_keys(ctx.key_padding, b, nk, q.device)[:, None, :]
    mf = m.to(q.dtype)
    num = torch.matmul(zs * mf, grid.onehot)  # [B, Nq, R]
    cnt = torch.matmul(mf, grid.onehot)
    s = (num / cnt.clamp_min(1.0) * ctx.scale).masked_fill(cnt == 0, NEG_INF)
    return _top_regions(s, p.topk)


def routing_keep(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, p: RoutingParams) -> torch.Tensor:
    """Bool keep mask [B, 1, Nq, Nk] (before dense masking; reference use only)."""
    nq, nk = q.shape[2], k.shape[2]
    grid = grid_of(nk, p, q.device, q.dtype)
    greg = grid.reg.clamp_min(0)
    if ctx.causal:
        sel = route_tokens(q, k, ctx, p, grid)  # [B, Nq, R]
        keep = sel[:, :, greg]
    else:
        sel = route_regions(q, k, ctx, p, grid)  # [B, R, R]
        keep = sel[:, greg][:, :, greg]
    qpos = torch.arange(nk - nq, nk, device=q.device)
    keep = keep | (grid.reg < 0)[None, None, :] | (grid.reg[qpos] < 0)[None, :, None]
    return keep[:, None]


class Routing(Variant):
    name = "routing"
    lowering_module = "surgeon.attention.routing.lowering"
    Params = RoutingParams
    family = "sparse"
    description = ("BiFormer bi-level routing (training-free): each grid region attends to the tokens of "
                   "its top-k regions by pooled q·k; extra leading tokens stay dense")

    def reference(self, q, k, v, ctx: AttnContext, p: RoutingParams, block_mask=None):
        keep = routing_keep(q, k, ctx, p)
        out = attention_from_keep(q, k, v, ctx, keep)
        if recorder_active():
            allow = allowed_mask(ctx, q.shape[0], q.shape[2], k.shape[2], q.device)
            d = float((keep & allow).sum().item()) / max(float(allow.sum().item()), 1.0)
            record_density(ctx.site, self.name, self.requested_density(p), d)
        return out

    def _gather(self, q, k, v, ctx: AttnContext, p: RoutingParams, block_mask=None):
        """Region gather (non-causal): each region's queries attend to the extra tokens and the
        tokens of its routed regions; extra-token queries run dense SDPA."""
        b, hq, nq, d = q.shape
        nk, dv = k.shape[2], v.shape[3]
        dev = q.device
        grid = grid_of(nk, p, dev, q.dtype)
        sel = route_regions(q, k, ctx, p, grid)  # [B, R, R]
        r = grid.n_reg
        greg = grid.reg[grid.n_extra:]
        order = torch.sort(greg, stable=True).indices + grid.n_extra  # token positions, region-major
        sizes = torch.bincount(greg, minlength=r)
        t = int(sizes.max().item())
        starts = torch.cumsum(sizes, 0) - sizes
        slot = torch.arange(t, device=dev)
        tok = torch.where(slot[None, :] < sizes[:, None],
                          order[(starts[:, None] + slot[None, :]).clamp(max=order.numel() - 1)],
                          torch.full((r, t), -1, dtype=torch.long, device=dev))  # [R, T]
        # routed regions of each region, ascending (−1 = none)
        ar = torch.arange(r, device=dev).expand(b, r, r)
        top = torch.sort(torch.where(sel, ar, torch.full_like(ar, r)), dim=-1).values[..., : p.topk]
        top = torch.where(top < r, top, torch.full_like(top, -1))  # [B, R, topk]
        keys = torch.where(top[..., None] >= 0, tok[top.clamp_min(0)], torch.full((1,), -1, dtype=torch.long, device=dev))
        keys = keys.flatten(-2)  # [B, R, topk·T]
        extra = torch.arange(grid.n_extra, device=dev).expand(b, r, grid.n_extra)
        idx = torch.cat([extra, keys], dim=-1)[:, None]  # [B, 1, R, S]
        qg = q[:, :, tok.clamp_min(0).flatten()]  # [B, Hq, R·T, D]
        og = gathered_attention(qg, k, v, idx, group=t, scale=ctx.scale,
                                key_bias=padding_bias(ctx.key_padding, q.dtype))
        out = q.new_zeros(b, hq, nq, dv)
        flat = tok.flatten()
        live = flat >= 0
        out[:, :, flat[live]] = og[:, :, live]
        if grid.n_extra:
            ctx_x = AttnContext(causal=False, scale=ctx.scale, kv_heads=ctx.kv_heads, key_padding=ctx.key_padding)
            out[:, :, : grid.n_extra] = sdpa(q[:, :, : grid.n_extra], k, v, ctx_x)
        if recorder_active():
            real = real_keys(ctx.key_padding, b, nk, dev).to(torch.float64)
            kcnt = torch.matmul(real, grid.onehot.to(torch.float64))  # [B, R]
            n_x = real[:, : grid.n_extra].sum(-1)  # [B]
            per_region = n_x[:, None] + (sel.to(torch.float64) * kcnt[:, None, :]).sum(-1)  # [B, R]
            kept = (per_region * sizes.to(torch.float64)[None]).sum() + grid.n_extra * real.sum()
            dense = float(nq) * real.sum()
            record_density(ctx.site, self.name, self.requested_density(p), float(kept / dense.clamp_min(1.0)))
        return out

    def fast_paths(self):
        return {"gather": self._gather}

    def fast_available(self, name: str, q, ctx: AttnContext, p: VariantParams) -> bool:
        return not ctx.modulated and ctx.attn_mask is None and not ctx.causal

    def keep_mask(self, q, k, v, ctx: AttnContext, p: RoutingParams, block_mask=None) -> torch.Tensor:
        b, hq, nq, _ = q.shape
        return routing_keep(q, k, ctx, p).expand(b, hq, nq, k.shape[2])

    def requested_density(self, p: RoutingParams) -> float:
        return float(p.topk) / float(p.n_win * p.n_win)

    # -- test-matrix hooks ------------------------------------------------------------
    @staticmethod
    def _layout(n: int) -> tuple[int, int, int]:
        """(n_extra, grid_h, grid_w) for a test length n: 8 rows, a few extra tokens."""
        n_extra = n % 8 + (8 if n >= 40 else 0)
        return n_extra, 8, max(1, (n - n_extra) // 8)

    def degenerate_params(self, n: int) -> RoutingParams:
        x, h, w = self._layout(n)
        return RoutingParams(grid_h=h, grid_w=w, n_extra=x, n_win=4, topk=16)

    def example_params(self, n: int, hq: int) -> RoutingParams:
        x, h, w = self._layout(n)
        return RoutingParams(grid_h=h, grid_w=w, n_extra=x, n_win=4, topk=4)

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        # 4 extra tokens + a 4-row grid (4x7 at 32 keys, 4x5 at 24), 16 regions, 4 kept
        return self.params_from({"grid_h": 4, "n_extra": 4, "n_win": 4, "topk": 4})
