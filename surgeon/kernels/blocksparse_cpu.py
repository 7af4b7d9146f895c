"""Block-sparse attention on the CPU: geometry, selection helpers and gather kernels.

Shared by the ``block_topk``, ``reuse``, ``window_sink``, ``delta`` and ``delta_sparse``
variants. Everything here is plain torch (no compilation) and never materialises an
Nq×Nk score matrix for all heads at once.

Conventions (see :mod:`surgeon.attention.base`): q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D], query head h
reads KV head ``h // (Hq // Hkv)``; for causal sites the queries are the last Nq of the Nk
positions, so query row i sits at position ``off + i`` with ``off = Nk - Nq`` (the same
offset convention is used for the non-causal block/window geometry).

Block grids: query blocks of ``q_block`` rows (``nqb = ceil(Nq / q_block)``) and key blocks of
``k_block`` keys (``nkb = ceil(Nk / k_block)``); the last block of either may be ragged.
A block mask is bool [B, H, nqb, nkb] with H = Hq.

The gather kernel (:func:`block_sparse_attention`) works query-block-chunk by chunk: it gathers
the selected key/value blocks of every (batch, head, query block) into one padded
[rows, S·k_block, D] matrix (S = the largest selection count in the chunk; missing slots are
masked), computes scores and values with one ``bmm`` each, and applies token-level causal
and padding masks only where they can matter (the last slots, which hold the partial
diagonal blocks because slots are sorted by key-block index). When every head of a KV group
uses the same blocks (DELTA's unified page set, shared masks) the group's heads are stacked
into one matrix so their K/V gather is shared.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from surgeon.errors import BadInput

NEG_INF = float("-inf")

# Chunking of the gather kernel (measured at 8192 tokens, SmolLM2 shape, fp32): chunks of 1–4
# query blocks with ≤ 2M score elements run alike single-threaded; 8–16 blocks per chunk are
# 1.4–2× slower (the score slab leaves the cache). Two blocks per chunk halves the number of
# parallel regions and gives an even batch count for two threads.
_CHUNK_SCORE_ELEMS = 1 << 21
_MAX_CHUNK_QBLOCKS = 2


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


# --------------------------------------------------------------------------- gather kernel

def _plan_chunks(smax: list[int], rows_per_qb: int, k_block: int) -> list[tuple[int, int, int]]:
    """Greedy chunking of query blocks into [(start, stop, slots)].

    A chunk's score matrix (rows × slots·k_block) stays under ``_CHUNK_SCORE_ELEMS`` (so it
    stays in cache), it spans at most ``_MAX_CHUNK_QBLOCKS`` query blocks, and padding every
    block to the chunk's largest slot count may add at most ~1/8 of its work.
    """
    chunks = []
    i, n = 0, len(smax)
    while i < n:
        j, s, work = i + 1, smax[i], smax[i]
        while j < n and j - i < _MAX_CHUNK_QBLOCKS:
            s2 = max(s, smax[j])
            if (j + 1 - i) * rows_per_qb * s2 * k_block > _CHUNK_SCORE_ELEMS:
                break
            if (j + 1 - i) * s2 * 8 > (work + smax[j]) * 9:
                break
            j, s, work = j + 1, s2, work + smax[j]
        chunks.append((i, j, s))
        i = j
    return chunks


def triton_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_block: int, k_block: int) -> bool:
    """True for CUDA inputs the Triton block-sparse kernel supports (square blocks of 16–128,
    float16/bfloat16/float32, head dim ≤ 256). CPU tensors always use the gather kernel here —
    the Triton interpreter is for the kernels' tests, not for the op."""
    if q.device.type != "cuda" or q_block != k_block:
        return False
    from surgeon.kernels.triton_common import kernel_supports

    return kernel_supports(q, k, v, q_block)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    q_block: int,
    k_block: int,
    causal: bool,
    scale: float,
    key_padding: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention restricted to the key blocks of ``block_mask`` (gather + bmm kernel).

    q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D|Dv], block_mask bool [B|1,Hq|1,nqb,nkb],
    key_padding bool [B,Nk] (True = real) → out [B,Hq,Nq,Dv]. Token-level causal and padding
    masks apply inside kept blocks; rows with no kept, allowed key give 0. Equals
    ``attention_from_keep(q, k, v, ctx, upsample_block_mask(block_mask, ...))``.

    CUDA tensors go to the Triton kernel (:func:`surgeon.kernels.triton_blocksparse.blocksparse_attention`,
    same semantics) when it supports them (:func:`triton_eligible`); this is how block_topk,
    reuse, dhsa and delta_sparse (square blocks) select it automatically. window_sink's exact
    token band is not a block pattern: it keeps its own band path.
    """
    if triton_eligible(q, k, v, q_block, k_block):
        from surgeon.kernels.triton_blocksparse import blocksparse_attention

        return blocksparse_attention(q, k, v, block_mask, scale, causal, key_padding, block=q_block)
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    nqb, nkb = num_blocks(nq, q_block), num_blocks(nk, k_block)
    dev = q.device
    geo = block_geometry(nq, nk, q_block, k_block, causal, dev)
    bm = block_mask.to(torch.bool).expand(b, hq, nqb, nkb) & geo.allowed
    kvalid = None  # [B, nkb, k_block] real-key flags, when some key is padding (or a block is ragged)
    if (key_padding is not None and not bool(key_padding.all())) or nkb * k_block != nk:
        kv_ = key_padding.to(torch.bool) if key_padding is not None else torch.ones(b, nk, dtype=torch.bool, device=dev)
        kvalid = torch.cat([kv_, kv_.new_zeros(b, nkb * k_block - nk)], dim=1).view(b, nkb, k_block)
        bm = bm & kvalid.any(dim=-1)[:, None, None, :]  # all-padding blocks contribute nothing
    # shared K/V gathers when every head of a KV group uses the same blocks
    grouped = g > 1 and bool(torch.equal(bm, bm[:, ::g].repeat_interleave(g, dim=1)))
    hh = hkv if grouped else hq
    m_rows = g * q_block if grouped else q_block
    bmh = bm[:, ::g] if grouped else bm  # [B, hh, nqb, nkb]

    # slots sorted by key-block index with unused slots (-1) first, so the blocks that cross
    # the causal diagonal are always the last slots
    kb_idx = torch.arange(nkb, device=dev)
    slots = torch.sort(torch.where(bmh, kb_idx, -1), dim=-1).values  # [B, hh, nqb, nkb]
    counts = bmh.sum(dim=-1)  # [B, hh, nqb]
    smax = counts.amax(dim=(0, 1)).tolist()
    head_kv = torch.arange(hh, device=dev) if grouped else torch.arange(hq, device=dev) // g
    base = ((torch.arange(b, device=dev)[:, None] * hkv + head_kv[None, :]) * nkb)[:, :, None, None]
    flat_all = base + slots.clamp_min(0)  # index into the flattened [B*Hkv*nkb] block list
    # column masks are needed where a slot is unused (a (batch, head, block) with fewer blocks
    # than its chunk's slot count) or a kept block holds padding keys
    cmin = counts.amin(dim=(0, 1)).tolist()
    pad_l = [False] * nqb
    if kvalid is not None:
        part_pad = ~kvalid.all(dim=-1)  # [B, nkb] blocks holding a padding key
        pad_l = (bmh & part_pad[:, None, None, :]).any(dim=3).any(dim=0).any(dim=0).tolist()

    # causal tails: the last n_partial slots may cross the diagonal
    n_partial = int(geo.partial.sum(dim=-1).max().item()) if causal and nqb else 0
    row_in_block = torch.arange(m_rows, device=dev) % q_block
    qpos_all = geo.q_first[:, None] + row_in_block[None, :]  # [nqb, m_rows]
    t_k = torch.arange(k_block, device=dev)
    uniform_tail: list[bool] = []
    tbias_all = None
    if n_partial:
        tails = slots[..., nkb - n_partial:]  # [B, hh, nqb, n_partial]
        uniform_tail = (tails == tails[:1, :1]).all(dim=-1).all(dim=0).all(dim=0).tolist()
        kpos = (tails[0, 0].clamp_min(0)[..., None] * k_block + t_k).flatten(-2)  # [nqb, n_partial*k_block]
        bad = kpos[:, None, :] > qpos_all[:, :, None]  # [nqb, m_rows, n_partial*k_block]
        tbias_all = torch.zeros(bad.shape, dtype=q.dtype, device=dev).masked_fill_(bad, NEG_INF)

    # query-block-major layouts, so a chunk's rows (block, batch, head) are one contiguous slab
    qpad = nqb * q_block - nq
    qs = q
    if qpad:
        qs = torch.cat([qs, qs.new_zeros(b, hq, qpad, d)], dim=2)
    if grouped:
        src = qs.view(b, hkv, g, nqb, q_block, d).permute(3, 0, 1, 2, 4, 5)
    else:
        src = qs.view(b, hq, nqb, q_block, d).permute(2, 0, 1, 3, 4)
    qs = q.new_empty((nqb, b, hh, m_rows, d))
    torch.mul(src, scale, out=qs.view(src.shape))  # pre-scaled, [nqb, B, hh, m_rows, D]
    slots_q = slots.permute(2, 0, 1, 3).contiguous()  # [nqb, B, hh, nkb]
    flat_q = flat_all.permute(2, 0, 1, 3).contiguous()
    kpad = nkb * k_block - nk
    kk, vv = k, v
    if kpad:
        kk = torch.cat([k, k.new_zeros(b, hkv, kpad, d)], dim=2)
        vv = torch.cat([v, v.new_zeros(b, hkv, kpad, dv)], dim=2)
    kflat = kk.reshape(b * hkv * nkb, k_block, d)
    vflat = vv.reshape(b * hkv * nkb, k_block, dv)

    # the output in its final layout, viewed per (batch, head row-group, query block)
    out = q.new_empty((b, hq, nqb * q_block, dv))
    out_blocks = (out.view(b, hkv, g, nqb, q_block, dv).permute(3, 0, 1, 2, 4, 5) if grouped
                  else out.view(b, hq, nqb, q_block, dv).permute(2, 0, 1, 3, 4))  # [nqb, B, hh, ...]
    bidx = torch.arange(b, device=dev)[None, :, None, None]
    for c0, c1, s in _plan_chunks(smax, b * hh * m_rows, k_block):
        if s == 0:
            out_blocks[c0:c1] = 0.0
            continue
        cq = c1 - c0
        r = cq * b * hh
        flat = flat_q[c0:c1, :, :, nkb - s:].reshape(-1)
        kg = kflat.index_select(0, flat).view(r, s * k_block, d)
        vg = vflat.index_select(0, flat).view(r, s * k_block, dv)
        sc = torch.bmm(qs[c0:c1].view(r, m_rows, d), kg.transpose(1, 2))  # [r, m_rows, s*k_block]
        # masks are additive 0/-inf biases: add_ is far cheaper than masked_fill_ on score slices
        maybe_empty = causal
        if min(cmin[c0:c1]) < s or any(pad_l[c0:c1]):
            maybe_empty = True
            idx = slots_q[c0:c1, :, :, nkb - s:]
            colok = (idx >= 0)[..., None].expand(cq, b, hh, s, k_block)
            if kvalid is not None:
                colok = colok & kvalid[bidx, idx.clamp_min(0)]
            colbias = torch.zeros(colok.shape, dtype=sc.dtype, device=dev).masked_fill_(~colok, NEG_INF)
            sc.add_(colbias.view(r, 1, s * k_block))
        if n_partial:
            tsl = min(s, n_partial)
            tail = sc.view(cq, b, hh, m_rows, s * k_block)[..., (s - tsl) * k_block:]
            if all(uniform_tail[c0:c1]):
                tail.add_(tbias_all[c0:c1, None, None, :, (n_partial - tsl) * k_block:])
            else:
                kpos = slots_q[c0:c1, :, :, nkb - tsl:].clamp_min(0)[..., None] * k_block + t_k
                bad = kpos.flatten(-2)[..., None, :] > qpos_all[c0:c1][:, None, None, :, None]
                tail.add_(torch.zeros(bad.shape, dtype=sc.dtype, device=dev).masked_fill_(bad, NEG_INF))
        o = torch.bmm(torch.softmax(sc, dim=-1), vg)
        if maybe_empty:
            o.nan_to_num_(nan=0.0)  # rows with no allowed key: softmax of all -inf is NaN → 0
        out_blocks[c0:c1] = o.view(out_blocks[c0:c1].shape)
    return out[:, :, :nq]


# --------------------------------------------------------------------------- band kernel

def band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sink_tokens: int,
    window: int,
    causal: bool,
    scale: float,
    key_padding: Optional[torch.Tensor] = None,
    chunk: Optional[int] = None,
) -> torch.Tensor:
    """Sliding-window + sink attention over contiguous key slices (no gather).

    q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D|Dv] → [B,Hq,Nq,Dv]. Query row i (position p = Nk−Nq+i)
    keeps key j when j < sink_tokens, or (causal) p − window < j ≤ p, or (non-causal)
    |p − j| < window; padding keys are dropped. Works on ``chunk`` query rows at a time with the
    heads of each KV group stacked, so K/V are read once per group. ``chunk`` defaults to
    window/4 clamped to [64, 256] (a chunk computes window + chunk keys per row).
    """
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    off = nk - nq
    dev = q.device
    if chunk is None:
        chunk = min(256, max(64, window // 4))
    out = q.new_zeros(b, hkv, g, nq, dv)
    qg = (q * scale).view(b, hkv, g, nq, d)
    kp = None if key_padding is None or bool(key_padding.all()) else key_padding.to(torch.bool)
    for r0 in range(0, nq, chunk):
        r1 = min(nq, r0 + chunk)
        p0, p1 = off + r0, off + r1 - 1
        lo = max(0, p0 - window + 1)
        hi = min(nk - 1, p1 if causal else p1 + window - 1)
        hi = max(hi, lo - 1)
        ns = min(sink_tokens, lo, nk)
        # sinks after the band only matter without causality
        tail = (hi + 1, min(sink_tokens, nk)) if not causal and sink_tokens > hi + 1 else (0, 0)
        segs = [(0, ns), (lo, hi + 1), tail]
        segs = [(a, z) for a, z in segs if z > a]
        if not segs:
            continue
        kidx = torch.cat([torch.arange(a, z, device=dev) for a, z in segs])
        if len(segs) == 1:
            ks, vs = k[:, :, segs[0][0]:segs[0][1]], v[:, :, segs[0][0]:segs[0][1]]
        else:
            ks = torch.cat([k[:, :, a:z] for a, z in segs], dim=2)
            vs = torch.cat([v[:, :, a:z] for a, z in segs], dim=2)
        c = r1 - r0
        qc = qg[:, :, :, r0:r1].reshape(b, hkv, g * c, d)
        sc = torch.matmul(qc, ks.transpose(-1, -2)).view(b, hkv, g, c, -1)
        ppos = torch.arange(p0, p1 + 1, device=dev)[:, None]
        j = kidx[None, :]
        ok = (j < sink_tokens) | ((j > ppos - window) & (j < ppos + window))
        if causal:
            ok = ok & (j <= ppos)
        bad = ~ok  # [c, W']
        if kp is not None:
            bad = bad[None] | ~kp[:, kidx][:, None, :]  # [B, c, W']
        bias = torch.zeros(bad.shape, dtype=sc.dtype, device=dev).masked_fill_(bad, NEG_INF)
        sc.add_(bias.view(-1, 1, 1, c, bias.shape[-1]))  # additive mask: cheaper than masked_fill_
        o = torch.matmul(torch.softmax(sc, dim=-1).view(b, hkv, g * c, -1), vs)
        o.nan_to_num_(nan=0.0)  # rows with no kept key: softmax of all -inf is NaN → 0
        out[:, :, :, r0:r1] = o.view(b, hkv, g, c, dv)
    return out.view(b, hq, nq, dv)


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
