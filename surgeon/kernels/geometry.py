"""Block geometry and block-selection helpers (pure torch, no kernels).

Block grids, pooled queries / keys, validity masks, top-k block selection, block pair counts
and densities, and block-mask checks: the plain functions shared by the CPU gather kernel
(:mod:`surgeon.kernels.blocksparse_cpu`), the Triton kernels (``triton_*.py``), the dispatcher
(:mod:`surgeon.kernels.dispatch`) and the sparse variants. Nothing here runs attention.

Conventions (see :mod:`surgeon.attention.base`): q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D], query head h
reads KV head ``h // (Hq // Hkv)``; for causal sites the queries are the last Nq of the Nk
positions, so query row i sits at position ``off + i`` with ``off = Nk - Nq`` (the same
offset convention is used for the non-causal block/window geometry).

Block grids: query blocks of ``q_block`` rows (``nqb = ceil(Nq / q_block)``) and key blocks of
``k_block`` keys (``nkb = ceil(Nk / k_block)``); the last block of either may be ragged.
A block mask is bool [B, H, nqb, nkb] with H = Hq.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from surgeon.errors import BadInput

NEG_INF = float("-inf")


def num_blocks(n: int, block: int) -> int:
    """ceil(n / block)."""
    return (n + block - 1) // block


@dataclass(frozen=True)
class BlockGeometry:
    """Block-level facts of one (Nq, Nk, q_block, k_block, causal) grid.

    Attributes (tensors on the device they were built for):
        q_first, q_last: [nqb] long, positions of the first / last query row of each block.
        allowed: [nqb, nkb] bool, key blocks that hold at least one key a query of the block
            may see (causal: block start ≤ the block's last query position; else all).
        partial: [nqb, nkb] bool, allowed blocks that hold a key after the block's first
            query position (they need the token-level causal mask; never set when not causal).
        diag: [nqb] long, the key block holding the block's last query position, clamped
            to [0, nkb-1] (the "own" block; for Nq == Nk it is the query block's index).
    """

    nq: int
    nk: int
    q_block: int
    k_block: int
    causal: bool
    q_first: torch.Tensor
    q_last: torch.Tensor
    allowed: torch.Tensor
    partial: torch.Tensor
    diag: torch.Tensor

    @property
    def nqb(self) -> int:
        return num_blocks(self.nq, self.q_block)

    @property
    def nkb(self) -> int:
        return num_blocks(self.nk, self.k_block)


def block_geometry(nq: int, nk: int, q_block: int, k_block: int, causal: bool,
                   device: torch.device) -> BlockGeometry:
    """Block grid geometry (see :class:`BlockGeometry`)."""
    nqb, nkb = num_blocks(nq, q_block), num_blocks(nk, k_block)
    off = nk - nq
    qb = torch.arange(nqb, device=device)
    q_first = off + qb * q_block
    q_last = off + torch.clamp((qb + 1) * q_block, max=nq) - 1
    k_start = torch.arange(nkb, device=device) * k_block
    k_end = torch.clamp(k_start + k_block, max=nk) - 1
    if causal:
        allowed = k_start[None, :] <= q_last[:, None]
        partial = allowed & (k_end[None, :] > q_first[:, None])
    else:
        allowed = torch.ones(nqb, nkb, dtype=torch.bool, device=device)
        partial = torch.zeros(nqb, nkb, dtype=torch.bool, device=device)
    diag = torch.clamp(torch.div(q_last, k_block, rounding_mode="floor"), 0, max(nkb - 1, 0))
    return BlockGeometry(nq, nk, q_block, k_block, causal, q_first, q_last, allowed, partial, diag)


def causal_block_bounds(nq: int, nk: int, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(future [nqb,nkb], partial [nqb,nkb]) for causal attention with queries at the last Nq of Nk.

    ``future``: every key of the key block is after every query of the query block (never
    attended). ``partial``: the key block reaches the first query of the query block (token-level
    mask needed; for Nq == Nk exactly the diagonal block).
    """
    nqb, nkb = num_blocks(nq, block), num_blocks(nk, block)
    off = nk - nq
    i = torch.arange(nqb, device=device)
    j = torch.arange(nkb, device=device)
    q_first = i * block + off
    q_last = torch.clamp(i * block + block, max=nq) - 1 + off
    k_first = j * block
    k_last = torch.clamp(j * block + block, max=nk) - 1
    future = k_first[None, :] > q_last[:, None]
    partial = ~future & (k_last[None, :] >= q_first[:, None])
    return future, partial


def sink_local_blocks(geo: BlockGeometry, sink_blocks: int, local_blocks: int) -> torch.Tensor:
    """Bool [nqb, nkb]: the first ``sink_blocks`` key blocks and the ``local_blocks`` blocks
    ending at each query block's diagonal block, restricted to allowed blocks."""
    kb = torch.arange(geo.nkb, device=geo.diag.device)
    forced = (kb < sink_blocks)[None, :].expand(geo.nqb, geo.nkb)
    d = geo.diag[:, None]
    forced = forced | ((kb[None, :] <= d) & (kb[None, :] > d - local_blocks))
    return forced & geo.allowed


def recent_blocks(geo: BlockGeometry, sink_blocks: int, recent_tokens: int) -> torch.Tensor:
    """Bool [nqb, nkb]: the first ``sink_blocks`` key blocks plus every key block that overlaps
    the positions ``[q_first − recent_tokens + 1, q_last + recent_tokens − 1]`` (the query
    block's own span widened by ``recent_tokens`` each side), restricted to allowed blocks; for
    causal grids "allowed" cuts the window to the block's own span and the ``recent_tokens``
    keys before it."""
    kb = torch.arange(geo.nkb, device=geo.diag.device)
    k_start = kb * geo.k_block
    k_end = torch.clamp(k_start + geo.k_block, max=geo.nk) - 1
    lo = geo.q_first - recent_tokens + 1
    hi = geo.q_last + recent_tokens - 1
    forced = (k_end[None, :] >= lo[:, None]) & (k_start[None, :] <= hi[:, None])
    forced = forced | (kb < sink_blocks)[None, :]
    return forced & geo.allowed


def query_validity(key_padding: Optional[torch.Tensor], nq: int, nk: int, causal: bool) -> Optional[torch.Tensor]:
    """Bool [B, Nq] real-query flags when they can be read from ``key_padding`` (self-attention:
    causal, or Nq == Nk), else None."""
    if key_padding is None or nk < nq or not (causal or nq == nk):
        return None
    return key_padding[:, nk - nq:].to(torch.bool)


def _window_sums(x: torch.Tensor, w: Optional[torch.Tensor], start: int, block: int,
                 nblk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sums of rows ``[start + i·block, start + (i+1)·block) ∩ [0, N)`` for i < nblk.

    x [B,H,N,D], w [B,N] (None = all ones) → (sums [B,H,nblk,D], weights [B|1,nblk]). The
    whole windows inside [0, N) are summed through a strided view (no copy without weights).
    """
    b, h, n, d = x.shape
    first = min(nblk, max(0, -(start // block)))  # first window starting at or after row 0
    last = max(first, min(nblk, (n - start) // block))  # windows before `last` end by row N
    sums = x.new_zeros(b, h, nblk, d)
    cnts = x.new_zeros(1 if w is None else b, nblk)
    if last > first:  # windows first .. last-1 lie inside [0, N)
        lo = start + first * block
        xv = x[:, :, lo:lo + (last - first) * block].view(b, h, last - first, block, d)
        if w is None:
            sums[:, :, first:last] = xv.sum(dim=3)
            cnts[:, first:last] = float(block)
        else:
            wv = w[:, lo:lo + (last - first) * block].view(b, 1, last - first, block, 1)
            sums[:, :, first:last] = (xv * wv).sum(dim=3)
            cnts[:, first:last] = wv.sum(dim=3)[:, 0, :, 0]
    for i in list(range(first)) + list(range(last, nblk)):  # clipped windows at the ends
        lo, hi = max(0, start + i * block), min(n, start + (i + 1) * block)
        if hi <= lo:
            continue
        if w is None:
            sums[:, :, i] = x[:, :, lo:hi].sum(dim=2)
            cnts[:, i] = float(hi - lo)
        else:
            sums[:, :, i] = (x[:, :, lo:hi] * w[:, None, lo:hi, None]).sum(dim=2)
            cnts[:, i] = w[:, lo:hi].sum(dim=1)
    return sums, cnts


def pooled_queries(q: torch.Tensor, q_block: int, causal: bool,
                   q_valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean-pooled query per query block: [B,H,Nq,D] → [B,H,nqb,D].

    Non-causal: the mean over the block's real queries. Causal: the mean over the real
    queries among the ``q_block`` rows *ending at the block's first row* (rows
    ``[qb·q_block − q_block + 1, qb·q_block]``), so a block's selection never depends on a
    token after any of its rows (our causal-safe choice; pooling the block's own rows would
    let a later token in the block change earlier rows' outputs). Blocks with no real
    query in their window pool to zeros.
    """
    nqb = num_blocks(q.shape[2], q_block)
    w = None if q_valid is None else q_valid.to(q.dtype)
    start = -(q_block - 1) if causal else 0
    s, cnt = _window_sums(q, w, start, q_block, nqb)
    return s / cnt.clamp_min(1.0)[:, None, :, None]


def pooled_keys(k: torch.Tensor, k_block: int, key_padding: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the real keys of each key block: [B,Hkv,Nk,D] → ([B,Hkv,nkb,D], has_real [B,nkb])."""
    b, _, nk, _ = k.shape
    nkb = num_blocks(nk, k_block)
    w = None if key_padding is None else key_padding.to(k.dtype)
    s, cnt = _window_sums(k, w, 0, k_block, nkb)
    return s / cnt.clamp_min(1.0)[:, None, :, None], (cnt > 0).expand(b, nkb)


def real_blocks(key_padding: Optional[torch.Tensor], b: int, nk: int, block: int,
                device: torch.device) -> torch.Tensor:
    """Bool [B, nblocks]: key blocks holding at least one real (non-padding) key."""
    nb = num_blocks(nk, block)
    if key_padding is None:
        return torch.ones(b, nb, dtype=torch.bool, device=device)
    kv = key_padding.to(torch.bool)
    kv = torch.cat([kv, kv.new_zeros(kv.shape[0], nb * block - nk)], dim=1)
    return kv.view(kv.shape[0], nb, block).any(dim=-1).expand(b, nb)


def keep_counts(fractions: torch.Tensor, n_allowed: torch.Tensor) -> torch.Tensor:
    """⌈fraction · n_allowed⌉ as long, robust to float round-off (0.15·20 gives 3, not 4).

    ``fractions`` [H] and ``n_allowed`` [nqb] → [H, nqb]."""
    x = fractions.to(torch.float64)[:, None] * n_allowed.to(torch.float64)[None, :]
    return torch.ceil(x - 1e-9).to(torch.long)


def select_top(scores: torch.Tensor, allowed: torch.Tensor, forced: torch.Tensor,
               candidate: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Top-k block selection with forced blocks.

    scores [B,H,R,C] float; allowed/forced [R,C] or broadcastable bool; candidate [B,1|H,1,C]
    bool (blocks eligible for top-k, e.g. holding a real key); k broadcastable to [B,H,R].
    Forced allowed blocks count toward k and are always kept (the HyLRA/DELTA convention:
    forced blocks get +inf score before top-k); remaining slots go to the highest-scoring
    eligible allowed blocks, ties broken toward lower block index. Returns bool [B,H,R,C].
    """
    forced = forced & allowed
    s = scores.masked_fill(~(allowed & candidate), NEG_INF)
    s = s.masked_fill(forced, float("inf"))
    n_forced = forced.sum(dim=-1)
    k_eff = torch.maximum(k, n_forced)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ar = torch.arange(s.shape[-1], device=s.device).expand_as(order)
    ranks.scatter_(-1, order, ar)
    return (ranks < k_eff[..., None]) & (s > NEG_INF)


def upsample_block_mask(block_mask: torch.Tensor, nq: int, nk: int, q_block: int, k_block: int) -> torch.Tensor:
    """Block mask [B,H,nqb,nkb] → token mask [B,H,Nq,Nk] (reference use only)."""
    m = block_mask.repeat_interleave(q_block, dim=2)[:, :, :nq]
    return m.repeat_interleave(k_block, dim=3)[:, :, :, :nk]


def block_pair_counts(nq: int, nk: int, q_block: int, k_block: int, causal: bool,
                      key_padding: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Number of (query, key) pairs dense attention uses inside each block: [B|1, nqb, nkb] float64."""
    nqb, nkb = num_blocks(nq, q_block), num_blocks(nk, k_block)
    kv = (torch.ones(1, nk, dtype=torch.float64, device=device) if key_padding is None
          else key_padding.to(device=device, dtype=torch.float64))
    bsz = kv.shape[0]
    kv = torch.cat([kv, kv.new_zeros(bsz, nkb * k_block - nk)], dim=1)
    if not causal:
        per_kb = kv.view(bsz, nkb, k_block).sum(-1)  # [B, nkb]
        rows = torch.clamp(nq - torch.arange(nqb, device=device) * q_block, max=q_block).to(torch.float64)
        return rows[None, :, None] * per_kb[:, None, :]
    # cum[b, j] = number of real keys at positions < j
    cum = torch.cat([kv.new_zeros(bsz, 1), kv.cumsum(dim=1)], dim=1)
    qpos = torch.arange(nq, device=device) + (nk - nq)
    kstart = torch.arange(nkb, device=device) * k_block
    kend = torch.clamp(kstart + k_block, max=nk)  # exclusive
    hi = torch.minimum(qpos[:, None] + 1, kend[None, :]).clamp_min(0)  # [Nq, nkb] exclusive end
    lo = kstart[None, :].expand_as(hi)
    hi = torch.maximum(hi, lo)
    per_q = cum[:, hi] - cum[:, lo]  # [B, Nq, nkb]
    pad = nqb * q_block - nq
    per_q = torch.cat([per_q, per_q.new_zeros(bsz, pad, nkb)], dim=1)
    return per_q.view(bsz, nqb, q_block, nkb).sum(dim=2)


def block_mask_density(block_mask: torch.Tensor, counts: torch.Tensor) -> float:
    """Kept pairs / dense pairs for a block mask [B,H,nqb,nkb] and counts [B|1,nqb,nkb]."""
    c = counts[:, None].expand(block_mask.shape[0], block_mask.shape[1], -1, -1)
    denom = float(c.sum().item())
    return float((c * block_mask.to(c.dtype)).sum().item()) / max(denom, 1.0)


def check_block_mask(block_mask: Optional[torch.Tensor], b: int, hq: int, nqb: int, nkb: int,
                     variant: str, block_desc: str) -> torch.Tensor:
    """Validate an incoming block mask and return it as bool [B, Hq, nqb, nkb] (broadcasting a
    batch or head dimension of 1)."""
    if block_mask is None:
        raise BadInput(f"{variant} needs the block mask of its anchor layer",
                       "rewrite with an anchor variant that produces block masks before this layer")
    shp = tuple(block_mask.shape)
    ok = (len(shp) == 4 and shp[0] in (1, b) and shp[1] in (1, hq) and shp[2] == nqb and shp[3] == nkb)
    if not ok:
        raise BadInput(f"{variant}: block mask has shape {list(shp)}, expected [{b}, {hq}, {nqb}, {nkb}]",
                       f"give {variant} the same {block_desc} as its anchor layer")
    return block_mask.to(torch.bool).expand(b, hq, nqb, nkb)
