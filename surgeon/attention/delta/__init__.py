"""``delta`` / ``delta_sparse``: DELTA's Δ-layer page selection and page-subset attention,
adapted to prefill (methods.md §3).

DELTA (decode) splits layers into full layers, Δ-layers (dense attention plus page
selection) and sparse layers (attention over the last Δ-layer's pages). Here, for prefill:

``delta`` (the Δ-layer, a planner): dense attention, plus a page selection per query block of
``q_block`` rows. Pages are ``page_size`` keys. A block's page score is
``score(page) = Σ_{r∈R} Σ_{t∈page} max_h p_h(r, t)`` with ``p_h(r, ·)`` the dense attention
probabilities of query row r in head h (all query heads: DELTA's unified head selection) and
R the block's scoring rows. Forced pages: the first ``sink_pages`` pages and every page
overlapping the block's own span or the ``recent_pages·page_size`` keys before it (DELTA's
recency window, measured from the block's first query). The block keeps the top
``⌈keep · n_allowed⌉`` allowed pages, forced pages included (they get +inf, as in DELTA);
pages with no real key are never picked by top-k; ties go to the lower page index (DELTA
breaks ties the same way with a −1e−7·index bias). The selection is one page set per
(batch, query block), repeated over the Hq heads of the returned mask
[B, Hq, ceil(Nq/q_block), ceil(Nk/page_size)].

Scoring rows R (our prefill adaptation): causal — the ``score_queries`` rows ending at the
block's first row (so a block's pages never depend on a token after any of its rows; all
rows of the block have seen them); non-causal — the block's first ``score_queries`` rows.
Padded query rows are skipped. Decode DELTA scores with the single current query; this is
its nearest causal analogue for a block of queries.

``delta_sparse`` (a sparse layer): attends only to the incoming page mask ∪ its own sink and
recent pages (same definitions), with token-level causal/padding masks inside kept pages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from surgeon.attention.block_consumer import BlockMaskConsumer
from surgeon.kernels.geometry import (
    NEG_INF,
    block_geometry,
    check_block_mask,
    keep_counts,
    num_blocks,
    query_validity,
    real_blocks,
    recent_blocks,
    select_top,
)
from surgeon.attention.base import (
    AttnContext,
    Variant,
    VariantParams,
    attention_from_keep,
    check_range,
)
from surgeon.attention.dense import sdpa

# rows × keys × heads held at once while scoring pages
_SCORE_CHUNK_ELEMS = 1 << 22
_SCORE_CHUNK_QBLOCKS = 4
# keep fraction of the stand-in Δ-layer selection made by ``DeltaSparse.make_block_mask``
_PLANNER_KEEP = 0.25


def _check_pages(page_size: int, q_block: int, sink_pages: int, recent_pages: int) -> None:
    check_range("page_size", page_size, 1, 1 << 20)
    check_range("q_block", q_block, 1, 1 << 20)
    check_range("sink_pages", sink_pages, 0, 1 << 30)
    check_range("recent_pages", recent_pages, 0, 1 << 30)


@dataclass(frozen=True)
class DeltaParams(VariantParams):
    """keep: kept fraction of allowed pages per query block, (0, 1]; page_size: keys per page;
    q_block: query rows sharing one page set; sink_pages: leading pages always kept;
    recent_pages: pages before each query block always kept; score_queries: query rows per
    block whose probabilities score the pages."""

    keep: float = 0.15
    page_size: int = 16
    q_block: int = 64
    sink_pages: int = 1
    recent_pages: int = 8
    score_queries: int = 16

    def __post_init__(self) -> None:
        check_range("keep", self.keep, 0.0, 1.0, lo_open=True)
        _check_pages(self.page_size, self.q_block, self.sink_pages, self.recent_pages)
        check_range("score_queries", self.score_queries, 1, 1 << 20)


@dataclass(frozen=True)
class DeltaSparseParams(VariantParams):
    """page_size / q_block: the Δ-layer's; sink_pages, recent_pages: pages always added."""

    page_size: int = 16
    q_block: int = 64
    sink_pages: int = 1
    recent_pages: int = 8

    def __post_init__(self) -> None:
        _check_pages(self.page_size, self.q_block, self.sink_pages, self.recent_pages)


def page_scores(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, page_size: int, q_block: int,
                score_queries: int) -> torch.Tensor:
    """DELTA page scores per query block: [B, nqb, npages] (float, ≥ 0).

    q [B,Hq,Nq,D], k [B,Hkv,Nk,D]. Computes dense probabilities only for the scoring rows,
    in chunks of rows (never Nq×Nk for all heads).
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    dev = q.device
    nqb, npg = num_blocks(nq, q_block), num_blocks(nk, page_size)
    sq = score_queries
    first = torch.arange(nqb, device=dev) * q_block
    if ctx.causal:
        rows = first[:, None] - sq + 1 + torch.arange(sq, device=dev)[None, :]
        in_range = rows >= 0
    else:
        rows = first[:, None] + torch.arange(sq, device=dev)[None, :]
        in_range = (rows < nq) & (rows < (first[:, None] + q_block))
    rows = rows.clamp(0, nq - 1)  # [nqb, sq]
    weight = in_range.to(q.dtype)[None].expand(b, nqb, sq)
    qv = query_validity(ctx.key_padding, nq, nk, ctx.causal)
    if qv is not None:
        weight = weight * qv[:, rows].to(q.dtype)
    kp = None if ctx.key_padding is None or bool(ctx.key_padding.all()) else ctx.key_padding.to(torch.bool)
    off = nk - nq
    out = q.new_zeros(b, nqb, npg)
    # a few query blocks per chunk: bounded memory, and a short causal tail to mask
    step = max(1, min(_SCORE_CHUNK_QBLOCKS, _SCORE_CHUNK_ELEMS // max(b * hq * sq * nk, 1)))
    qs = q * ctx.scale
    for c0 in range(0, nqb, step):
        c1 = min(nqb, c0 + step)
        r = rows[c0:c1].reshape(-1)  # [cr]
        cr = r.numel()
        rpos = r + off
        # causal: keys after the chunk's last scoring row get probability 0; skip them
        ke = min(nk, int(rpos.max().item()) + 1) if ctx.causal else nk
        if ke <= 0:
            continue
        npc = num_blocks(ke, page_size)
        qr = qs[:, :, r].reshape(b, hkv, g * cr, d)
        z = torch.matmul(qr, k[:, :, :ke].transpose(-1, -2)).view(b, hq, cr, ke)
        if ctx.causal:  # only keys after the earliest row can be in a row's future
            k0 = max(0, int(rpos.min().item()) + 1)
            if k0 < ke:
                bad = torch.arange(k0, ke, device=dev)[None, :] > rpos[:, None]
                z[..., k0:].add_(torch.zeros(bad.shape, dtype=z.dtype, device=dev).masked_fill_(bad, NEG_INF))
        if kp is not None:
            pb = torch.zeros(b, 1, 1, ke, dtype=z.dtype, device=dev).masked_fill_(~kp[:, None, None, :ke], NEG_INF)
            z.add_(pb)
        if ctx.attn_mask is not None:
            am = ctx.attn_mask.expand(b, hq, nq, nk)[:, :, r, :ke]
            z = z.masked_fill(~am, NEG_INF) if am.dtype == torch.bool else z + am
        ph = torch.softmax(z, dim=-1)  # rows with no allowed key are NaN: probabilities 0
        if ctx.attn_mask is not None:  # masks may differ per head: clean before the head max
            ph.nan_to_num_(nan=0.0)
        pr = ph.amax(dim=1).nan_to_num_(nan=0.0)  # max over heads of p_h: [B, cr, ke]
        pr.mul_(weight[:, c0:c1].reshape(b, cr, 1))
        if npc * page_size > ke:
            pr = torch.cat([pr, pr.new_zeros(b, cr, npc * page_size - ke)], dim=2)
        out[:, c0:c1, :npc] = pr.view(b, c1 - c0, sq, npc, page_size).sum(dim=(2, 4))
    return out


def delta_page_mask(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, keep: float, page_size: int,
                    q_block: int, sink_pages: int, recent_pages: int, score_queries: int) -> torch.Tensor:
    """The Δ-layer's page selection: bool [B, Hq, nqb, npages] (same pages for every head)."""
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    geo = block_geometry(nq, nk, q_block, page_size, ctx.causal, q.device)
    scores = page_scores(q, k, ctx, page_size, q_block, score_queries)[:, None]  # [B,1,nqb,npg]
    has_real = real_blocks(ctx.key_padding, b, nk, page_size, q.device)
    forced = recent_blocks(geo, sink_pages, recent_pages * page_size)
    kcnt = keep_counts(torch.tensor([keep], device=q.device), geo.allowed.sum(dim=-1))  # [1, nqb]
    sel = select_top(scores, geo.allowed, forced, has_real[:, None, None, :], kcnt[None])
    return sel.expand(b, hq, geo.nqb, geo.nkb).contiguous()


class Delta(Variant):
    name = "delta"
    lowering_module = "surgeon.attention.delta.lowering"
    Params = DeltaParams
    family = "dense"  # a Δ-layer attends densely; its sparsity shows in the layers it plans for
    description = "DELTA Δ-layer: dense attention plus per-query-block page selection for delta_sparse layers"
    produces_block_mask = True

    def select(self, q, k, ctx: AttnContext, p: DeltaParams) -> torch.Tensor:
        return delta_page_mask(q, k, ctx, p.keep, p.page_size, p.q_block, p.sink_pages, p.recent_pages,
                               p.score_queries)

    def reference(self, q, k, v, ctx: AttnContext, p: DeltaParams, block_mask=None):
        return attention_from_keep(q, k, v, ctx), self.select(q, k, ctx, p)

    def _sdpa(self, q, k, v, ctx: AttnContext, p: DeltaParams, block_mask=None):
        return sdpa(q, k, v, ctx), self.select(q, k, ctx, p)

    def fast_paths(self):
        return {"sdpa": self._sdpa}

    def fast_available(self, name: str, q, ctx: AttnContext, p: VariantParams) -> bool:
        return not ctx.modulated

    def block_mask_shape(self, q, k, p: DeltaParams) -> tuple:
        return (q.shape[0], q.shape[1], (q.shape[2] + p.q_block - 1) // p.q_block,
                (k.shape[2] + p.page_size - 1) // p.page_size)

    def degenerate_params(self, n: int) -> DeltaParams:
        return DeltaParams(keep=1.0, page_size=8, q_block=16, recent_pages=2, score_queries=8)

    def example_params(self, n: int, hq: int) -> DeltaParams:
        return DeltaParams(keep=0.3, page_size=8, q_block=16, sink_pages=1, recent_pages=2, score_queries=8)

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"keep": 0.4, "page_size": 4, "q_block": 8, "sink_pages": 1,
                                 "recent_pages": 1, "score_queries": 4})


class DeltaSparse(BlockMaskConsumer):
    name = "delta_sparse"
    lowering_module = "surgeon.attention.delta.lowering"
    Params = DeltaSparseParams
    family = "sparse"
    description = "DELTA sparse layer: attention over the last Δ-layer's pages plus sink and recent pages"

    def effective_mask(self, q, k, ctx: AttnContext, p: DeltaSparseParams, block_mask) -> torch.Tensor:
        """Incoming page mask ∪ sink/recent pages, bool [B, Hq, nqb, npages]."""
        b, hq, nq, _ = q.shape
        nk = k.shape[2]
        geo = block_geometry(nq, nk, p.q_block, p.page_size, ctx.causal, q.device)
        bm = check_block_mask(block_mask, b, hq, geo.nqb, geo.nkb, self.name, "page_size and q_block")
        return bm | recent_blocks(geo, p.sink_pages, p.recent_pages * p.page_size)

    def blocks(self, p: DeltaSparseParams) -> tuple[int, int]:
        return p.q_block, p.page_size

    # -- test-matrix hooks ------------------------------------------------------------
    def degenerate_params(self, n: int) -> DeltaSparseParams:
        # a recency window covering the whole sequence: every page is kept
        return DeltaSparseParams(page_size=8, q_block=16, sink_pages=1, recent_pages=num_blocks(n, 8))

    def example_params(self, n: int, hq: int) -> DeltaSparseParams:
        return DeltaSparseParams(page_size=8, q_block=16, sink_pages=1, recent_pages=2)

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"page_size": 4, "q_block": 8, "sink_pages": 0, "recent_pages": 1})

    def make_block_mask(self, q, k, v, ctx: AttnContext, p: DeltaSparseParams) -> Optional[torch.Tensor]:
        """A stand-in Δ-layer selection (keep 0.25) on the same q/k."""
        return delta_page_mask(q, k, ctx, _PLANNER_KEEP, p.page_size, p.q_block, p.sink_pages, p.recent_pages,
                               score_queries=min(16, p.q_block))
