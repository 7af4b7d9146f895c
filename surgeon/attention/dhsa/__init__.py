"""``dhsa``: Dynamic Hierarchical Sparse Attention with fixed chunks (methods.md §5).

The boundary predictor of DHSA is trained; this variant uses the [PROPOSED] training-free
fallback of fixed chunks of ``chunk`` tokens (key chunks by position, query chunks by row, the
block grid of :mod:`surgeon.kernels.geometry`).

* Length-normalised chunk representations, per head: k̂_c = Σ_{t∈c} k_t / √|c| over the
  chunk's real keys (so the partial last chunk and padded chunks are handled by |c|), and
  q̂_c likewise over the query chunk. Causal: q̂ pools the ``chunk`` rows *ending at the
  chunk's first row* (causal-safe choice shared with ``block_topk``; pooling the chunk's own
  rows would let a later token change earlier outputs). A positive scale of q̂ never changes
  a row's ranking, so q̂ is computed as a mean.
* Chunk similarity S_c = Q̂ K̂^T per query head (GQA mapping), causal at chunk level.
* Upsampling S_t[i, j] = S_c[c(i), c(j)] and "per query token keep the top-N_b keys by S_t":
  S_t is constant over each (query chunk, key chunk) pair, so every query of a chunk ranks
  the same and the token-level top-N_b is a choice of whole key chunks. Ties inside the
  chunk that holds the N_b-th key are broken by keeping that chunk *whole* (the tokens are
  tied; any split would be arbitrary), so a row keeps the best-ranked chunks until their real
  keys reach N_b. Ties between chunks go to the lower chunk index.
* Always kept [PROPOSED]: ``sink_chunks`` leading chunks and ``local_chunks`` chunks ending
  at the query's own (diagonal) chunk; also (causal) every chunk crossing the causal
  boundary, whose representation contains keys after some of the chunk's queries. They
  count toward N_b (they rank first).
* Budget: N_b = ``budget_tokens``, or ⌈budget · visible⌉ with visible = the keys the query
  chunk can see (causal: up to its last position; non-causal: Nk), so the budget never
  depends on tokens after the chunk. ``budget = 1`` is dense attention.

Fast paths: ``blocksparse`` (the shared block gather kernel of
:func:`surgeon.kernels.dispatch.block_sparse_attention`, fastest on the CPU) and
``gather`` (whole chunks gathered per (query chunk, head) by
:func:`surgeon.kernels.gather_cpu.gathered_attention` on the CPU flash kernel, with the chunks
crossing the causal boundary as a causal block merged by log-sum-exp). Neither builds Nq×Nk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.kernels.dispatch import block_sparse_attention
from surgeon.kernels.geometry import (
    block_geometry,
    block_mask_density,
    block_pair_counts,
    num_blocks,
    pooled_queries,
    query_validity,
    sink_local_blocks,
    upsample_block_mask,
)
from surgeon.kernels.gather_cpu import gathered_attention, padding_bias
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
class DHSAParams(VariantParams):
    """chunk: tokens per chunk; budget: per-token key budget N_b as a fraction of the keys the
    query can see; budget_tokens: N_b in tokens (overrides budget when > 0); sink_chunks /
    local_chunks: chunks always kept."""

    chunk: int = 64
    budget: float = 0.15
    budget_tokens: int = 0
    sink_chunks: int = 1
    local_chunks: int = 1

    def __post_init__(self) -> None:
        check_range("chunk", self.chunk, 1, 1 << 20)
        check_range("budget", self.budget, 0.0, 1.0, lo_open=True)
        check_range("budget_tokens", self.budget_tokens, 0, 1 << 30)
        check_range("sink_chunks", self.sink_chunks, 0, 1 << 30)
        check_range("local_chunks", self.local_chunks, 0, 1 << 30)


def chunk_reps(k: torch.Tensor, chunk: int, key_padding) -> tuple[torch.Tensor, torch.Tensor]:
    """Length-normalised key chunk representations Σk/√|c| over real keys:
    [B,Hkv,Nk,D] → ([B,Hkv,nkc,D], real-key counts [B,nkc] float)."""
    b, h, nk, d = k.shape
    nc = num_blocks(nk, chunk)
    tail = nc * chunk - nk
    w = torch.ones(b, nk, dtype=k.dtype, device=k.device) if key_padding is None else key_padding.to(k.dtype)
    ks = torch.cat([k, k.new_zeros(b, h, tail, d)], dim=2)
    ws = torch.cat([w, w.new_zeros(b, tail)], dim=1).view(b, 1, nc, chunk, 1)
    s = (ks.view(b, h, nc, chunk, d) * ws).sum(dim=3)
    cnt = ws.sum(dim=3)[:, 0, :, 0]  # [B, nc]
    return s / cnt.clamp_min(1.0).sqrt()[:, None, :, None], cnt


def select_chunks(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, p: DHSAParams) -> torch.Tensor:
    """Selected key chunks per (query chunk, head): bool [B, Hq, nqc, nkc].

    q [B,Hq,Nq,D], k [B,Hkv,Nk,D].
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    c = p.chunk
    geo = block_geometry(nq, nk, c, c, ctx.causal, q.device)
    qhat = pooled_queries(q, c, ctx.causal, query_validity(ctx.key_padding, nq, nk, ctx.causal))
    khat, cnt = chunk_reps(k, c, ctx.key_padding)
    nqc, nkc = geo.nqb, geo.nkb
    s = torch.matmul(qhat.view(b, hkv, g * nqc, d), khat.transpose(-1, -2)).view(b, hq, nqc, nkc)
    forced = (sink_local_blocks(geo, p.sink_chunks, p.local_chunks) | geo.partial) & geo.allowed
    s = s.masked_fill(~(geo.allowed & (cnt > 0)[:, None, None, :]), NEG_INF)
    s = s.masked_fill(forced, float("inf"))
    visible = (geo.q_last + 1) if ctx.causal else torch.full_like(geo.q_last, nk)
    if p.budget_tokens > 0:
        nb = torch.full_like(visible, p.budget_tokens).to(torch.float64)
    else:
        nb = torch.ceil(visible.to(torch.float64) * p.budget - 1e-9)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    sizes = cnt.to(torch.float64)[:, None, None, :].expand(b, hq, nqc, nkc).gather(-1, order)
    before = sizes.cumsum(dim=-1) - sizes  # real keys in better-ranked chunks
    take = (before < nb[None, None, :, None]) & (s.gather(-1, order) > NEG_INF)
    sel = torch.zeros_like(take).scatter_(-1, order, take)
    return sel | forced


def chunk_gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor,
                           ctx: AttnContext, chunk: int) -> torch.Tensor:
    """Attention over selected key chunks with :func:`gathered_attention`: the chunks before
    the causal boundary are gathered whole per (query chunk, head), the chunks crossing it run
    as a contiguous range under the causal mask. q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D|Dv],
    sel bool [B,Hq,nqc,nkc] → [B,Hq,Nq,Dv]."""
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    geo = block_geometry(nq, nk, chunk, chunk, ctx.causal, q.device)
    nkc = geo.nkb
    tail = nkc * chunk - nk
    bias = padding_bias(ctx.key_padding, q.dtype)
    if tail:
        k = torch.cat([k, k.new_zeros(b, hkv, tail, k.shape[3])], dim=2)
        v = torch.cat([v, v.new_zeros(b, hkv, tail, v.shape[3])], dim=2)
        bias = torch.zeros(b, nk, dtype=q.dtype, device=q.device) if bias is None else bias
        bias = torch.cat([bias, bias.new_full((b, tail), NEG_INF)], dim=1)
    jb = torch.arange(nkc, device=q.device)
    past = sel & geo.allowed & ~geo.partial
    cnt = int(past.sum(dim=-1).max().item()) if past.numel() else 0
    blocks = torch.sort(torch.where(past, jb, -1), dim=-1).values[..., nkc - cnt:]  # [B,Hq,nqc,cnt]
    diag_start, diag_len = None, 0
    n_part = geo.partial.sum(dim=-1)
    if ctx.causal and bool((n_part > 0).any()):
        diag_start = torch.where(geo.partial, jb, nkc).amin(dim=-1).clamp(max=nkc - 1) * chunk
        diag_len = int(n_part.max().item()) * chunk
    return gathered_attention(q, k, v, blocks, group=chunk, unit=chunk, scale=ctx.scale, key_bias=bias,
                              diag_start=diag_start, diag_len=diag_len, q_offset=nk - nq)


class DHSA(Variant):
    name = "dhsa"
    lowering_module = "surgeon.attention.dhsa.lowering"
    Params = DHSAParams
    family = "sparse"
    description = ("DHSA with fixed chunks: length-normalised chunk similarity picks whole key chunks "
                   "up to a per-token budget, plus sink and local chunks")

    def reference(self, q, k, v, ctx: AttnContext, p: DHSAParams, block_mask=None):
        sel = select_chunks(q, k, ctx, p)
        keep = upsample_block_mask(sel, q.shape[2], k.shape[2], p.chunk, p.chunk)
        out = attention_from_keep(q, k, v, ctx, keep)
        self._record(q, k, ctx, p, sel)
        return out

    def _gather(self, q, k, v, ctx: AttnContext, p: DHSAParams, block_mask=None):
        sel = select_chunks(q, k, ctx, p)
        out = chunk_gather_attention(q, k, v, sel, ctx, p.chunk)
        self._record(q, k, ctx, p, sel)
        return out

    def _blocksparse(self, q, k, v, ctx: AttnContext, p: DHSAParams, block_mask=None):
        sel = select_chunks(q, k, ctx, p)
        out = block_sparse_attention(q, k, v, sel, q_block=p.chunk, k_block=p.chunk, causal=ctx.causal,
                                     scale=ctx.scale, key_padding=ctx.key_padding)
        self._record(q, k, ctx, p, sel)
        return out

    def _record(self, q, k, ctx: AttnContext, p: DHSAParams, sel: torch.Tensor) -> None:
        if recorder_active():
            counts = block_pair_counts(q.shape[2], k.shape[2], p.chunk, p.chunk, ctx.causal, ctx.key_padding,
                                       q.device)
            req = p.budget if p.budget_tokens == 0 else min(1.0, p.budget_tokens / max(k.shape[2], 1))
            record_density(ctx.site, self.name, req, block_mask_density(sel, counts))

    def fast_paths(self):
        return {"blocksparse": self._blocksparse, "gather": self._gather}

    def fast_available(self, name: str, q, ctx: AttnContext, p: VariantParams) -> bool:
        return not ctx.modulated and ctx.attn_mask is None

    def keep_mask(self, q, k, v, ctx: AttnContext, p: DHSAParams, block_mask=None) -> torch.Tensor:
        return upsample_block_mask(select_chunks(q, k, ctx, p), q.shape[2], k.shape[2], p.chunk, p.chunk)

    def requested_density(self, p: DHSAParams) -> float:
        # with budget_tokens the fraction depends on the length (recorded per call instead)
        return float(p.budget) if p.budget_tokens == 0 else 1.0

    def achieved_density(self, q, k, v, ctx: AttnContext, p: DHSAParams, block_mask=None) -> float:
        if ctx.attn_mask is not None:
            return super().achieved_density(q, k, v, ctx, p, block_mask)
        counts = block_pair_counts(q.shape[2], k.shape[2], p.chunk, p.chunk, ctx.causal, ctx.key_padding, q.device)
        return block_mask_density(select_chunks(q, k, ctx, p), counts)

    # -- test-matrix hooks ------------------------------------------------------------
    def degenerate_params(self, n: int) -> DHSAParams:
        return DHSAParams(chunk=16, budget=1.0)

    def example_params(self, n: int, hq: int) -> DHSAParams:
        return DHSAParams(chunk=16, budget=0.3, sink_chunks=1, local_chunks=1)

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"chunk": 8, "budget": 0.3, "sink_chunks": 1, "local_chunks": 1})
