"""``block_topp``: block-sparse attention over the fewest key blocks that cover a mass p.

FlexPrefill-style adaptive selection (methods.md §14b; threshold per head as in XAttention
§14c): per query head and query block, the key blocks are ranked by an *estimated* attention
mass and the block keeps the fewest of them whose cumulative estimated mass, together with the
mass of its forced blocks, reaches ``p`` (``head_p`` per query head, from calibration). The
budget therefore follows the input and the head instead of being a fixed k.

The estimator (:func:`estimate_block_mass`) [PROPOSED — our design, documented because the
peers' estimators are either pooled (FlexPrefill's block path, fooled by vertical stripes and
slashes that mean pooling averages away) or use rows the block's earlier queries must not see]:

* sampled queries: for query block i, the rows ``i·bs − t·stride`` (t = 0 … ⌈bs/stride⌉ − 1,
  rows ≥ 0; every ``stride``-th row of the ``bs`` rows *ending at the block's first row*) —
  causal-safe: the block's own later rows never influence its selection. Non-causal: every
  ``stride``-th row of the block itself. Padding queries are skipped.
* exact per-key logits, no key pooling: each sampled row's softmax over the keys it may see
  (causal: keys at or before its position; real keys only), summed per key block, averaged over
  the block's sampled rows. A single strong key (a vertical stripe, a sink) or a diagonal
  (slash) that crosses a block is seen at its true weight — nothing is averaged before the
  softmax, which is what fools mean pooling (issue 14: "must not be fooled by mean pooling").
  It is XAttention's strided sampling with exact block sums instead of antidiagonal logit sums.
  Cost: ⌈bs/stride⌉/bs of the dense QKᵀ (1/16 at the defaults), no PV.
* mass on the diagonal block of block i is estimated by rows in block i−1, so their own
  neighbourhood lands on key block i−1: that block's mass is overestimated for block i (it
  ranks high), a conservative bias (more of the recent past is kept) [PROPOSED].

Selection (:func:`topp_block_mask`), per (batch, query head, query block):

* forced blocks — the first ``sink_blocks`` key blocks, the ``local_blocks`` blocks ending at
  the diagonal block and (causal) every block crossing the causal boundary, as ``block_topk``;
* candidates: the other allowed blocks holding a real key, ranked by estimated mass (ties toward
  the lower block index); keep candidates while forced mass + mass of the better candidates is
  below ``p · total`` (so the kept set is the smallest prefix reaching p);
* budget bounds: kept blocks (forced included) ≥ max(``min_blocks``, ⌈min_fraction·n_allowed⌉),
  ≤ max(⌈max_fraction·n_allowed⌉, forced);
* ``p ≥ 1`` keeps every allowed block; a block with no sampled row (no evidence) keeps every
  allowed block; query blocks whose last position is below ``dense_below`` keep every allowed
  block (FlexPrefill's dense fallback for short inputs, made per block so it stays causal).

The op returns the selection as a block mask (for ``reuse``), like ``block_topk``. Fast path
``gather``: the block-sparse CPU kernel (Triton on CUDA) on the chosen blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from surgeon.attention.block_topk import BlockTopK
from surgeon.kernels.geometry import (
    block_geometry,
    block_pair_counts,
    num_blocks,
    query_validity,
    real_blocks,
    select_top,
    sink_local_blocks,
)
from surgeon.attention.base import AttnContext, VariantParams, check_head_list, check_range, per_head_values

NEG_INF = float("-inf")
# Upper bound on the score elements one estimator chunk holds (16 MiB in fp32).
_EST_CHUNK_ELEMS = 1 << 22


@dataclass(frozen=True)
class BlockTopPParams(VariantParams):
    """p: estimated attention mass each query block must cover, (0, 1]; head_p: optional
    per-query-head p (overrides p; from calibration); block_size: tokens per query/key block;
    stride: the estimator samples every ``stride``-th query row; sink_blocks / local_blocks:
    forced leading / diagonal-ending key blocks; min_blocks, min_fraction: minimum kept blocks
    (forced included); max_fraction: cap on kept blocks as a fraction of the allowed ones;
    dense_below: query blocks ending before this position attend densely."""

    p: float = 0.95
    head_p: Optional[tuple[float, ...]] = None
    block_size: int = 64
    stride: int = 16
    sink_blocks: int = 1
    local_blocks: int = 1
    min_blocks: int = 0
    min_fraction: float = 0.0
    max_fraction: float = 1.0
    dense_below: int = 0

    def __post_init__(self) -> None:
        check_range("p", self.p, 0.0, 1.0, lo_open=True)
        check_range("block_size", self.block_size, 1, 1 << 20)
        check_range("stride", self.stride, 1, 1 << 20)
        check_range("sink_blocks", self.sink_blocks, 0, 1 << 30)
        check_range("local_blocks", self.local_blocks, 0, 1 << 30)
        check_range("min_blocks", self.min_blocks, 0, 1 << 30)
        check_range("min_fraction", self.min_fraction, 0.0, 1.0)
        check_range("max_fraction", self.max_fraction, 0.0, 1.0, lo_open=True)
        check_range("dense_below", self.dense_below, 0, 1 << 40)
        check_head_list("head_p", self.head_p, "p")


def head_masses(p: BlockTopPParams, hq: int, device: torch.device) -> torch.Tensor:
    """Per-query-head p [Hq] float64 (``head_p`` or ``p`` repeated)."""
    return per_head_values("head_p", p.head_p, p.p, hq, device, "p")


def sample_rows(nq: int, block_size: int, stride: int, causal: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimator's sampled query rows: (rows [nqb, T] long clamped to [0, Nq), ok [nqb, T]).

    Causal: rows ``i·bs − t·stride``; non-causal: ``i·bs + t·stride`` (inside the block);
    T = ⌈bs / stride⌉. ``ok`` is False for rows outside the range."""
    nqb = num_blocks(nq, block_size)
    t = torch.arange(math.ceil(block_size / stride), device=device)
    first = torch.arange(nqb, device=device) * block_size
    if causal:
        rows = first[:, None] - t[None, :] * stride
        ok = rows >= 0
    else:
        rows = first[:, None] + t[None, :] * stride
        ok = rows < torch.clamp(first + block_size, max=nq)[:, None]
    return rows.clamp(0, max(nq - 1, 0)), ok


def estimate_block_mass(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, block_size: int,
                        stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated attention mass per key block (see module doc).

    q [B,Hq,Nq,D], k [B,Hkv,Nk,D] → (mass [B,Hq,nqb,nkb] float64, each row summing to 1 or 0;
    evidence [B,1,nqb] bool: the block had a sampled row that sees a key). Logits are
    ``q·k·scale`` in q's dtype; the explicit attn_mask is not used (as in ``block_topk``).
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    dev = q.device
    nqb, nkb = num_blocks(nq, block_size), num_blocks(nk, block_size)
    rows, ok = sample_rows(nq, block_size, stride, ctx.causal, dev)  # [nqb, T]
    t = rows.shape[1]
    qv = query_validity(ctx.key_padding, nq, nk, ctx.causal)
    okb = ok[None].expand(b, nqb, t)
    if qv is not None:
        okb = okb & qv[:, rows]
    kreal = (torch.ones(b, nk, dtype=torch.bool, device=dev) if ctx.key_padding is None
             else ctx.key_padding.to(device=dev, dtype=torch.bool).expand(b, nk))
    kpos = torch.arange(nk, device=dev)
    off = nk - nq
    mass = torch.zeros(b, hq, nqb, nkb, dtype=torch.float64, device=dev)
    live = torch.zeros(b, 1, nqb, dtype=torch.bool, device=dev)
    step = max(1, min(8, _EST_CHUNK_ELEMS // max(1, b * hq * t * nk)))
    for c0 in range(0, nqb, step):
        c1 = min(nqb, c0 + step)
        rc = rows[c0:c1]
        # causal: keys after the chunk's last sampled position are never seen; stop there
        kend = min(nk, num_blocks(off + int(rc.max().item()) + 1, block_size) * block_size) if ctx.causal else nk
        nkb_c = num_blocks(kend, block_size)
        r = rc.reshape(-1)  # [cb*T]
        qs = (q[:, :, r] * ctx.scale).view(b, hkv, g * r.numel(), d)
        z = torch.matmul(qs, k[:, :, :kend].transpose(-1, -2)).view(b, hq, c1 - c0, t, kend)
        if ctx.key_padding is not None:
            z.masked_fill_(~kreal[:, None, None, None, :kend], NEG_INF)
        if ctx.causal:  # only keys after the chunk's earliest sampled position can be in a row's future
            kmin = min(kend, off + int(rc.min().item()) + 1)
            fut = kpos[None, None, kmin:kend] > (off + rc)[:, :, None]  # [cb, T, kend-kmin]
            z[..., kmin:kend].masked_fill_(fut, NEG_INF)
        mx = z.amax(dim=-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        e = z.sub_(mx).exp_()  # unnormalised probabilities, 0 where not seen
        nfull = kend // block_size
        blk = e[..., :nfull * block_size].view(b, hq, c1 - c0, t, nfull, block_size).sum(dim=-1)
        if nfull != nkb_c:  # ragged last key block
            blk = torch.cat([blk, e[..., nfull * block_size:].sum(dim=-1, keepdim=True)], dim=-1)
        den = blk.sum(dim=-1, keepdim=True)
        seen = okb[:, None, c0:c1, :, None] & (den > 0)  # [B,Hq,cb,T,1]; den > 0 is the same for all heads
        blk = torch.where(seen, blk / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(blk))
        blk = blk.to(torch.float64).sum(dim=3)
        cnt = seen[:, 0, :, :, 0].sum(dim=-1).to(torch.float64)  # [B, cb]
        mass[:, :, c0:c1, :nkb_c] = blk / cnt.clamp_min(1.0)[:, None, :, None]
        live[:, 0, c0:c1] = cnt > 0
    return mass, live


def topp_counts(mass: torch.Tensor, allowed: torch.Tensor, forced: torch.Tensor, candidate: torch.Tensor,
                p: torch.Tensor) -> torch.Tensor:
    """Top-p candidate counts: [B,H,R] long, the fewest candidates (best first, ties toward the
    lower index) whose mass plus the forced mass reaches ``p_h · total``.

    mass [B,H,R,C] float64 ≥ 0; allowed/forced [R,C]; candidate [B,H|1,R|1,C] bool (already
    allowed, not forced); p [H] float64 (p ≥ 1: every candidate)."""
    forced = forced & allowed
    total = (mass * allowed).sum(dim=-1)
    mf = (mass * forced).sum(dim=-1)
    vals = torch.where(candidate, mass, torch.full_like(mass, -1.0))
    sv = torch.sort(vals, dim=-1, descending=True, stable=True).values
    is_c = sv >= 0
    sc = sv.clamp_min(0.0)
    cum = torch.cat([torch.zeros_like(sc[..., :1]), torch.cumsum(sc, dim=-1)[..., :-1]], dim=-1)  # exclusive
    need = (mf[..., None] + cum < p[None, :, None, None] * total[..., None]) & is_c
    n = need.sum(dim=-1)
    n_all = is_c.sum(dim=-1)
    return torch.where((p >= 1.0)[None, :, None].expand_as(n), n_all, n)


def topp_block_mask(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, p: BlockTopPParams,
                    masses: torch.Tensor) -> torch.Tensor:
    """The block_topp selection: bool [B, Hq, nqb, nkb]. ``masses`` [Hq] float64 per-head p."""
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    bs = p.block_size
    geo = block_geometry(nq, nk, bs, bs, ctx.causal, q.device)
    mass, live = estimate_block_mass(q, k, ctx, bs, p.stride)
    forced = sink_local_blocks(geo, p.sink_blocks, p.local_blocks) | geo.partial
    has_real = real_blocks(ctx.key_padding, b, nk, bs, q.device)[:, None, None, :]  # [B,1,1,nkb]
    cand = geo.allowed & ~forced & has_real
    n_p = topp_counts(mass, geo.allowed, forced, cand, masses)  # [B,Hq,nqb]
    n_cand = cand.sum(dim=-1).expand_as(n_p)
    dense_blk = (geo.q_last < p.dense_below)[None, None, :] | ~live  # [B|1,1,nqb]
    n_p = torch.where(dense_blk, n_cand, n_p)
    n_forced = forced.sum(dim=-1)  # [nqb]
    n_allowed = geo.allowed.sum(dim=-1).to(torch.float64)
    lo = torch.clamp(torch.ceil(n_allowed * p.min_fraction - 1e-9).to(torch.long), min=p.min_blocks)
    hi = torch.maximum(torch.ceil(n_allowed * p.max_fraction - 1e-9).to(torch.long), n_forced)
    kept = torch.minimum(torch.maximum(n_forced + n_p, lo), hi)
    kept = torch.where(dense_blk, n_forced + n_cand, kept)
    return select_top(mass, geo.allowed, forced, has_real, kept)


class BlockTopP(BlockTopK):
    """block_topk's machinery (reference, gather fast path, density accounting) with the
    selection by estimated mass (:func:`topp_block_mask`): only the selection differs."""

    name = "block_topp"
    lowering_module = "surgeon.attention.block_topp.lowering"
    Params = BlockTopPParams
    family = "sparse"
    description = ("adaptive block-sparse attention: per head and query block, the fewest key blocks whose "
                   "estimated mass (sampled queries, exact per-key softmax) reaches p; returns the block mask")
    produces_block_mask = True

    def select(self, q, k, ctx: AttnContext, p: BlockTopPParams) -> torch.Tensor:
        """Selected blocks, bool [B, Hq, nqb, nkb]."""
        return topp_block_mask(q, k, ctx, p, head_masses(p, q.shape[1], q.device))

    def _requested(self, p: BlockTopPParams, achieved: float) -> float:
        return achieved  # adaptive: the budget is whatever the mass needed, so requested = achieved

    def requested_density(self, p: BlockTopPParams) -> float:
        # no fixed budget: the density follows the input (recorded per call)
        return 1.0

    def kernel_density(self, q, k, v, ctx: AttnContext, p: BlockTopPParams, block_mask=None) -> float:
        """Score work of the CPU gather kernel as it runs, per dense pair: every (batch, head) of
        a chunk of query blocks is padded to the chunk's largest kept-block count (the
        per-head imbalance an adaptive budget creates), whole blocks are computed. ≥ the
        achieved density; what a planner should cost for the ``gather`` path."""
        from surgeon.kernels.blocksparse_cpu import _plan_chunks

        b, hq, nq, _ = q.shape
        nk = k.shape[2]
        bs = p.block_size
        geo = block_geometry(nq, nk, bs, bs, ctx.causal, q.device)
        sel = self.select(q, k, ctx, p) & geo.allowed
        smax = sel.sum(dim=-1).amax(dim=(0, 1)).tolist()
        work = sum((c1 - c0) * s for c0, c1, s in _plan_chunks(smax, b * hq * bs, bs)) * b * hq * bs * bs
        dense = block_pair_counts(nq, nk, bs, bs, ctx.causal, ctx.key_padding, q.device)
        return float(work) / max(float(dense.expand(b, -1, -1).sum().item()) * hq, 1.0)

    def selection_overhead(self, p: BlockTopPParams) -> float:
        """Estimator work as a fraction of dense QKᵀ work (sampled rows / all rows)."""
        return math.ceil(p.block_size / p.stride) / p.block_size

    # -- test-matrix hooks ------------------------------------------------------------
    def degenerate_params(self, n: int) -> BlockTopPParams:
        return BlockTopPParams(p=1.0, block_size=16, stride=4)

    def example_params(self, n: int, hq: int) -> BlockTopPParams:
        return BlockTopPParams(p=0.6, block_size=16, stride=4, sink_blocks=1, local_blocks=1)

    def small_example_params(self, hq: int) -> BlockTopPParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"p": 0.6, "block_size": 4, "stride": 2, "sink_blocks": 1, "local_blocks": 1})
