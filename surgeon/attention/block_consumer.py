"""Shared body of the variants that attend to an incoming block mask (``reuse``, ``delta_sparse``).

A consumer turns the mask an anchor produced (an explicit graph edge) plus its own forced blocks
into ``effective_mask`` [B, Hq, nqb, nkb], then attends to exactly those blocks: the reference
upsamples to a token mask, the ``gather`` fast path runs the block-sparse kernel (Triton on CUDA,
see :func:`surgeon.kernels.dispatch.block_sparse_attention`). Subclasses define
``effective_mask`` and ``blocks(p) → (q_block, k_block)``.
"""
from __future__ import annotations

import abc

import torch

from surgeon.attention.base import (
    AttnContext,
    Variant,
    VariantParams,
    attention_from_keep,
    record_density,
    recorder_active,
)
from surgeon.kernels.dispatch import block_sparse_attention
from surgeon.kernels.geometry import (
    block_mask_density,
    block_pair_counts,
    upsample_block_mask,
)


class BlockMaskConsumer(Variant):
    consumes_block_mask = True

    @abc.abstractmethod
    def blocks(self, p: VariantParams) -> tuple[int, int]:
        """(query block, key block) sizes of the incoming mask."""

    @abc.abstractmethod
    def effective_mask(self, q, k, ctx: AttnContext, p: VariantParams, block_mask) -> torch.Tensor:
        """The incoming mask ∪ the variant's forced blocks, bool [B, Hq, nqb, nkb]."""

    def _counts(self, q, k, ctx: AttnContext, p: VariantParams) -> torch.Tensor:
        qb, kb = self.blocks(p)
        return block_pair_counts(q.shape[2], k.shape[2], qb, kb, ctx.causal, ctx.key_padding, q.device)

    def reference(self, q, k, v, ctx: AttnContext, p: VariantParams, block_mask=None):
        bm = self.effective_mask(q, k, ctx, p, block_mask)
        out = attention_from_keep(q, k, v, ctx, self.keep_mask_from(bm, q, k, p))
        self._record(q, k, ctx, p, bm)
        return out

    def _gather(self, q, k, v, ctx: AttnContext, p: VariantParams, block_mask=None):
        bm = self.effective_mask(q, k, ctx, p, block_mask)
        qb, kb = self.blocks(p)
        out = block_sparse_attention(q, k, v, bm, q_block=qb, k_block=kb, causal=ctx.causal, scale=ctx.scale,
                                     key_padding=ctx.key_padding)
        self._record(q, k, ctx, p, bm)
        return out

    def _record(self, q, k, ctx: AttnContext, p: VariantParams, bm: torch.Tensor) -> None:
        if recorder_active():
            d = block_mask_density(bm, self._counts(q, k, ctx, p))
            record_density(ctx.site, self.name, d, d)

    def fast_paths(self):
        return {"gather": self._gather}

    def fast_available(self, name: str, q, ctx: AttnContext, p: VariantParams) -> bool:
        return not ctx.modulated and ctx.attn_mask is None

    def keep_mask_from(self, bm: torch.Tensor, q, k, p: VariantParams) -> torch.Tensor:
        qb, kb = self.blocks(p)
        return upsample_block_mask(bm, q.shape[2], k.shape[2], qb, kb)

    def keep_mask(self, q, k, v, ctx: AttnContext, p: VariantParams, block_mask=None) -> torch.Tensor:
        return self.keep_mask_from(self.effective_mask(q, k, ctx, p, block_mask), q, k, p)

    def requested_density(self, p: VariantParams) -> float:
        # the budget is the anchor's; a consumer requests whatever its anchor selected
        return 1.0

    def achieved_density(self, q, k, v, ctx: AttnContext, p: VariantParams, block_mask=None) -> float:
        if ctx.attn_mask is not None:
            return super().achieved_density(q, k, v, ctx, p, block_mask)
        return block_mask_density(self.effective_mask(q, k, ctx, p, block_mask), self._counts(q, k, ctx, p))

    def block_mask_shape(self, q, k, p: VariantParams) -> tuple:
        qb, kb = self.blocks(p)
        return (q.shape[0], q.shape[1], (q.shape[2] + qb - 1) // qb, (k.shape[2] + kb - 1) // kb)
