"""``reuse``: block-sparse attention over an earlier layer's block selection (HyLRA REUSE).

methods.md §2: a REUSE(a) layer skips its own selection and attends, with its own q/k/v, to
the key blocks that anchor layer ``a`` selected. The anchor's op (``block_topk``) returns its
block mask [B, Hq, nqb, nkb]; this op takes it as its ``block_mask`` input (an explicit graph
edge). The first ``sink_blocks`` key blocks and the ``local_blocks`` blocks ending at each query
block's diagonal block are always added (HyLRA's must-select first/last blocks); token-level
causal and padding masks still apply inside kept blocks. ``block_size`` must equal the
anchor's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.kernels.geometry import block_geometry, check_block_mask, num_blocks, sink_local_blocks
from surgeon.attention.base import AttnContext, VariantParams, check_range
from surgeon.attention.block_consumer import BlockMaskConsumer
from surgeon.attention.block_topk import topk_block_mask

# keep fraction of the stand-in anchor selection made by ``make_block_mask`` (tests, demos)
_ANCHOR_KEEP = 0.3


@dataclass(frozen=True)
class ReuseParams(VariantParams):
    """block_size: tokens per block (the anchor's); sink_blocks: leading key blocks always
    kept; local_blocks: key blocks ending at the diagonal block always kept."""

    block_size: int = 64
    sink_blocks: int = 1
    local_blocks: int = 1

    def __post_init__(self) -> None:
        check_range("block_size", self.block_size, 1, 1 << 20)
        check_range("sink_blocks", self.sink_blocks, 0, 1 << 30)
        check_range("local_blocks", self.local_blocks, 0, 1 << 30)


class Reuse(BlockMaskConsumer):
    name = "reuse"
    lowering_module = "surgeon.attention.reuse.lowering"
    Params = ReuseParams
    family = "sparse"
    description = "block-sparse attention over an anchor layer's block mask (HyLRA REUSE) plus sinks/local blocks"

    def effective_mask(self, q, k, ctx: AttnContext, p: ReuseParams, block_mask) -> torch.Tensor:
        """Incoming mask ∪ sink/local blocks, bool [B, Hq, nqb, nkb]."""
        b, hq, nq, _ = q.shape
        nk = k.shape[2]
        nqb, nkb = num_blocks(nq, p.block_size), num_blocks(nk, p.block_size)
        bm = check_block_mask(block_mask, b, hq, nqb, nkb, self.name, "block_size")
        geo = block_geometry(nq, nk, p.block_size, p.block_size, ctx.causal, q.device)
        return bm | sink_local_blocks(geo, p.sink_blocks, p.local_blocks)

    def blocks(self, p: ReuseParams) -> tuple[int, int]:
        return p.block_size, p.block_size

    # -- test-matrix hooks ------------------------------------------------------------
    def degenerate_params(self, n: int) -> ReuseParams:
        # sink blocks covering the whole sequence: the effective mask is all-True
        return ReuseParams(block_size=16, sink_blocks=num_blocks(n, 16))

    def example_params(self, n: int, hq: int) -> ReuseParams:
        return ReuseParams(block_size=16, sink_blocks=1, local_blocks=1)

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"block_size": 4, "sink_blocks": 1, "local_blocks": 0})

    def make_block_mask(self, q, k, v, ctx: AttnContext, p: ReuseParams):
        """A stand-in anchor selection: block_topk with keep 0.3 on the same q/k."""
        frac = torch.full((q.shape[1],), _ANCHOR_KEEP, dtype=torch.float64, device=q.device)
        return topk_block_mask(q, k, ctx, frac, p.block_size, p.sink_blocks, p.local_blocks)
