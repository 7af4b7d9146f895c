"""``block_topk``: block-sparse attention over each query block's top-scoring key blocks.

The HeSS sparsification pattern (methods.md §1, [PROPOSED] there) and HyLRA's SELECT policy
(§2): queries and keys are mean-pooled in blocks of ``block_size`` tokens, block logits
``Q̄ K̄^T · scale`` are computed per query head (GQA mapping), and each query block keeps its
top ``⌈keep_h · n_allowed⌉`` key blocks. The op also returns the selection as a block mask
[B, Hq, nqb, nkb] so later layers can reuse it (``reuse``).

Choices made here (documented because the sources leave them open):

* "allowed" key blocks: for causal sites, the blocks at or before the query block's
  diagonal block (the block holding its last query position), i.e. every block holding a key
  some query of the block may see; ``n_allowed`` counts them. Non-causal: all key blocks.
* Forced blocks — the first ``sink_blocks`` blocks, the ``local_blocks`` blocks ending at the
  diagonal block, and (causal) every block that crosses the causal boundary — are always kept
  and count toward the ``⌈keep·n_allowed⌉`` budget (they get a +inf score before top-k, the
  convention of HyLRA and DELTA), so ``keep`` is the kept fraction of allowed blocks wherever
  it exceeds the forced blocks. The causal-boundary blocks are forced because their pooled
  key would otherwise let a future token change earlier outputs.
* Causal pooled query: the mean over the ``block_size`` query rows ending at the block's first
  row (see :func:`surgeon.kernels.geometry.pooled_queries`); non-causal: the block's
  own rows. Pooling ignores padded tokens; key blocks with no real key are never picked by
  top-k (only as forced blocks, harmless since token masks still apply).
* Ties are broken toward the lower block index.
* ``head_keep`` (HeSS water-filled per-head fractions) overrides ``keep``; it must have one
  entry per query head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from surgeon.errors import BadInput
from surgeon.kernels.dispatch import block_sparse_attention
from surgeon.kernels.geometry import (
    block_geometry,
    block_mask_density,
    block_pair_counts,
    keep_counts,
    pooled_keys,
    pooled_queries,
    query_validity,
    select_top,
    sink_local_blocks,
    upsample_block_mask,
)
from surgeon.attention.base import (
    AttnContext,
    Variant,
    VariantParams,
    attention_from_keep,
    check_head_list,
    check_range,
    per_head_values,
    record_density,
    recorder_active,
    repeat_kv,
)


@dataclass(frozen=True)
class BlockTopKParams(VariantParams):
    """keep: kept fraction of allowed key blocks per query block, (0, 1];
    block_size: tokens per query/key block; head_keep: optional per-query-head fractions
    (overrides keep); sink_blocks: leading key blocks always kept; local_blocks: key blocks
    ending at the diagonal block always kept (1 = the diagonal block only)."""

    keep: float = 0.15
    block_size: int = 64
    head_keep: Optional[tuple[float, ...]] = None
    sink_blocks: int = 1
    local_blocks: int = 1

    def __post_init__(self) -> None:
        check_range("keep", self.keep, 0.0, 1.0, lo_open=True)
        check_range("block_size", self.block_size, 1, 1 << 20)
        check_range("sink_blocks", self.sink_blocks, 0, 1 << 30)
        check_range("local_blocks", self.local_blocks, 0, 1 << 30)
        check_head_list("head_keep", self.head_keep, "keep fraction")


def head_fractions(p: BlockTopKParams, hq: int, device: torch.device) -> torch.Tensor:
    """Per-query-head keep fractions [Hq] float64 (``head_keep`` or ``keep`` repeated)."""
    return per_head_values("head_keep", p.head_keep, p.keep, hq, device, "keep fraction")


def topk_block_mask(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, fractions: torch.Tensor,
                    block_size: int, sink_blocks: int, local_blocks: int) -> torch.Tensor:
    """The block_topk selection: bool [B, Hq, nqb, nkb].

    q [B,Hq,Nq,D], k [B,Hkv,Nk,D]; ``fractions`` [Hq] keep fraction per query head.
    """
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    geo = block_geometry(nq, nk, block_size, block_size, ctx.causal, q.device)
    qv = query_validity(ctx.key_padding, nq, nk, ctx.causal)
    qbar = pooled_queries(q, block_size, ctx.causal, qv)  # [B,Hq,nqb,D]
    kbar, has_real = pooled_keys(k, block_size, ctx.key_padding)  # [B,Hkv,nkb,D], [B,nkb]
    logits = torch.matmul(qbar, repeat_kv(kbar, hq).transpose(-1, -2)) * ctx.scale  # [B,Hq,nqb,nkb]
    forced = sink_local_blocks(geo, sink_blocks, local_blocks) | geo.partial
    n_allowed = geo.allowed.sum(dim=-1)
    kcnt = keep_counts(fractions, n_allowed)  # [Hq, nqb]
    return select_top(logits, geo.allowed, forced, has_real[:, None, None, :], kcnt[None])


class BlockTopK(Variant):
    name = "block_topk"
    lowering_module = "surgeon.attention.block_topk.lowering"
    Params = BlockTopKParams
    family = "sparse"
    description = ("block-sparse attention: each query block keeps its top key blocks by pooled QK "
                   "(per-head budgets, sinks, local blocks); returns the block mask for reuse")
    produces_block_mask = True

    # -- semantics ------------------------------------------------------------------
    def select(self, q, k, ctx: AttnContext, p: BlockTopKParams) -> torch.Tensor:
        """Selected blocks, bool [B, Hq, nqb, nkb]."""
        return topk_block_mask(q, k, ctx, head_fractions(p, q.shape[1], q.device), p.block_size,
                               p.sink_blocks, p.local_blocks)

    def reference(self, q, k, v, ctx: AttnContext, p: BlockTopKParams, block_mask=None):
        sel = self.select(q, k, ctx, p)
        keep = upsample_block_mask(sel, q.shape[2], k.shape[2], p.block_size, p.block_size)
        out = attention_from_keep(q, k, v, ctx, keep)
        self._record(q, k, ctx, p, sel)
        return out, sel

    def _gather(self, q, k, v, ctx: AttnContext, p: BlockTopKParams, block_mask=None):
        sel = self.select(q, k, ctx, p)
        out = block_sparse_attention(q, k, v, sel, q_block=p.block_size, k_block=p.block_size,
                                     causal=ctx.causal, scale=ctx.scale, key_padding=ctx.key_padding)
        self._record(q, k, ctx, p, sel)
        return out, sel

    def _density(self, q, k, ctx: AttnContext, p: BlockTopKParams, sel: torch.Tensor) -> float:
        counts = block_pair_counts(q.shape[2], k.shape[2], p.block_size, p.block_size, ctx.causal,
                                   ctx.key_padding, q.device)
        return block_mask_density(sel, counts)

    def _requested(self, p: BlockTopKParams, achieved: float) -> float:
        """The density recorded as requested (block_topp: whatever the mass needed)."""
        return self.requested_density(p)

    def _record(self, q, k, ctx: AttnContext, p: BlockTopKParams, sel: torch.Tensor) -> None:
        if recorder_active():
            d = self._density(q, k, ctx, p, sel)
            record_density(ctx.site, self.name, self._requested(p, d), d)

    def fast_paths(self):
        return {"gather": self._gather}

    def fast_available(self, name: str, q, ctx: AttnContext, p: VariantParams) -> bool:
        return not ctx.modulated and ctx.attn_mask is None

    def keep_mask(self, q, k, v, ctx: AttnContext, p: BlockTopKParams, block_mask=None) -> torch.Tensor:
        return upsample_block_mask(self.select(q, k, ctx, p), q.shape[2], k.shape[2], p.block_size, p.block_size)

    def requested_density(self, p: BlockTopKParams) -> float:
        if p.head_keep is not None:
            return float(sum(p.head_keep) / len(p.head_keep))
        return float(p.keep)

    def achieved_density(self, q, k, v, ctx: AttnContext, p: BlockTopKParams, block_mask=None) -> float:
        if ctx.attn_mask is not None:
            return super().achieved_density(q, k, v, ctx, p, block_mask)
        return self._density(q, k, ctx, p, self.select(q, k, ctx, p))

    # -- test-matrix hooks ------------------------------------------------------------
    def degenerate_params(self, n: int) -> BlockTopKParams:
        return BlockTopKParams(keep=1.0, block_size=16)

    def example_params(self, n: int, hq: int) -> BlockTopKParams:
        return BlockTopKParams(keep=0.3, block_size=16, sink_blocks=1, local_blocks=1)

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"keep": 0.4, "block_size": 4, "sink_blocks": 1, "local_blocks": 1})
