"""Block-sparse attention on the CPU: the gather kernel and the band kernel.

Shared by the ``block_topk``, ``reuse``, ``window_sink``, ``delta`` and ``delta_sparse``
variants. Everything here is plain torch (no compilation) and never materialises an
Nq×Nk score matrix for all heads at once.

Conventions (see :mod:`surgeon.attention.base`): q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D], query head h
reads KV head ``h // (Hq // Hkv)``; for causal sites the queries are the last Nq of the Nk
positions, so query row i sits at position ``off + i`` with ``off = Nk - Nq`` (the same
offset convention is used for the non-causal block/window geometry).

Block grids and block masks as in :mod:`surgeon.kernels.geometry` (which holds the geometry and
selection helpers); :mod:`surgeon.kernels.dispatch` chooses between this kernel and Triton's.

The gather kernel (:func:`block_sparse_attention_cpu`) works query-block-chunk by chunk: it gathers
the selected key/value blocks of every (batch, head, query block) into one padded
[rows, S·k_block, D] matrix (S = the largest selection count in the chunk; missing slots are
masked), computes scores and values with one ``bmm`` each, and applies token-level causal
and padding masks only where they can matter (the last slots, which hold the partial
diagonal blocks because slots are sorted by key-block index). When every head of a KV group
uses the same blocks (DELTA's unified page set, shared masks) the group's heads are stacked
into one matrix so their K/V gather is shared.
"""
from __future__ import annotations

from typing import Optional

import torch

from surgeon.kernels.geometry import NEG_INF, block_geometry, num_blocks

# Chunking of the gather kernel (measured at 8192 tokens, SmolLM2 shape, fp32): chunks of 1–4
# query blocks with ≤ 2M score elements run alike single-threaded; 8–16 blocks per chunk are
# 1.4–2× slower (the score slab leaves the cache). Two blocks per chunk halves the number of
# parallel regions and gives an even batch count for two threads.
_CHUNK_SCORE_ELEMS = 1 << 21
_MAX_CHUNK_QBLOCKS = 2


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


def block_sparse_attention_cpu(
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
    ``attention_from_keep(q, k, v, ctx, upsample_block_mask(block_mask, ...))``. Runs on any
    device; :func:`surgeon.kernels.dispatch.block_sparse_attention` is the entry point that
    picks the Triton kernel instead where it applies.
    """
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
