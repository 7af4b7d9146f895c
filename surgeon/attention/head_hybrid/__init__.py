"""``head_hybrid``: DuoAttention inside one site — each KV group dense, streaming or sparse.

DuoAttention (methods.md §14e) splits KV heads into "retrieval" heads (full attention) and
"streaming" heads (sink + recent window); whole layers are too coarse (issue 14). Here one op
gives every KV group (query heads ``g·G … g·G + G − 1``, G = Hq/Hkv) its own kind, from
``kinds`` (one entry per KV group, or one entry for all groups):

* ``dense``: exact attention;
* ``streaming``: ``window_sink`` — key j kept when j < ``sink_tokens`` or inside the
  ``window`` ending at the query (non-causal: |p − j| < window);
* ``sparse``: ``block_topp`` (default; ``p``, ``block_size``, ``stride``, ``sink_blocks``,
  ``local_blocks``) or ``block_topk`` (``keep`` instead of ``p``) with those parameters —
  the selection of a head never depends on other heads, so it equals the selection the
  sparse variant makes for the same head at a site of its own.

Reference: one token keep mask per query head and ``attention_from_keep``. Fast path
``split``: each kind runs its own kernel on its heads only (SDPA, the band kernel, the
block-sparse kernel) and the outputs are put back in head order. Density: the mean over query
heads of each head's kept/dense pairs (every head has the same dense pair count).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import torch

from surgeon.errors import BadInput
from surgeon.kernels.blocksparse_cpu import band_attention
from surgeon.kernels.dispatch import block_sparse_attention
from surgeon.kernels.geometry import block_mask_density, block_pair_counts, upsample_block_mask
from surgeon.attention.base import (
    AttnContext,
    Variant,
    VariantParams,
    attention_from_keep,
    check_range,
    record_density,
    recorder_active,
)

KINDS = ("dense", "streaming", "sparse")
SPARSE_KINDS = ("block_topp", "block_topk")


@dataclass(frozen=True)
class HeadHybridParams(VariantParams):
    """kinds: per KV group "dense" | "streaming" | "sparse" (one entry: all groups; empty: all
    dense); sink_tokens / window: the streaming heads' pattern; sparse: "block_topp" or
    "block_topk"; p (block_topp) / keep (block_topk), block_size, stride, sink_blocks,
    local_blocks: the sparse heads' parameters."""

    kinds: tuple[str, ...] = ()
    sink_tokens: int = 64
    window: int = 256
    sparse: str = "block_topp"
    p: float = 0.95
    keep: float = 0.3
    block_size: int = 64
    stride: int = 16
    sink_blocks: int = 1
    local_blocks: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.kinds, str):
            raise BadInput(f"kinds={self.kinds!r} is not a list", "give one kind per KV group, e.g. [dense, streaming]")
        for i, kd in enumerate(self.kinds):
            if kd not in KINDS:
                raise BadInput(f"kinds[{i}]={kd!r} is not a head kind", f"use one of: {', '.join(KINDS)}")
        if self.sparse not in SPARSE_KINDS:
            raise BadInput(f"sparse={self.sparse!r} is not a sparse head variant",
                           f"use one of: {', '.join(SPARSE_KINDS)}")
        check_range("sink_tokens", self.sink_tokens, 0, 1 << 30)
        check_range("window", self.window, 1, 1 << 30)
        check_range("p", self.p, 0.0, 1.0, lo_open=True)
        check_range("keep", self.keep, 0.0, 1.0, lo_open=True)
        check_range("block_size", self.block_size, 1, 1 << 20)
        check_range("stride", self.stride, 1, 1 << 20)
        check_range("sink_blocks", self.sink_blocks, 0, 1 << 30)
        check_range("local_blocks", self.local_blocks, 0, 1 << 30)

    def window_params(self):
        from surgeon.attention.window_sink import WindowSinkParams

        return WindowSinkParams(sink_tokens=self.sink_tokens, window=self.window)

    def sparse_params(self):
        """(variant name, its params) for the sparse heads."""
        if self.sparse == "block_topk":
            from surgeon.attention.block_topk import BlockTopKParams

            return "block_topk", BlockTopKParams(keep=self.keep, block_size=self.block_size,
                                                 sink_blocks=self.sink_blocks, local_blocks=self.local_blocks)
        from surgeon.attention.block_topp import BlockTopPParams

        return "block_topp", BlockTopPParams(p=self.p, block_size=self.block_size, stride=self.stride,
                                             sink_blocks=self.sink_blocks, local_blocks=self.local_blocks)


def group_kinds(p: HeadHybridParams, hkv: int) -> list[str]:
    """The kind of each KV group [Hkv] (BadInput when ``kinds`` does not fit the site)."""
    if not p.kinds:
        return ["dense"] * hkv
    if len(p.kinds) == 1:
        return [p.kinds[0]] * hkv
    if len(p.kinds) != hkv:
        raise BadInput(f"kinds has {len(p.kinds)} entries but the site has {hkv} KV heads",
                       "give one kind per KV group (or one kind for all)")
    return list(p.kinds)


def _heads(kinds: list[str], kind: str, g: int) -> tuple[list[int], list[int]]:
    groups = [i for i, kd in enumerate(kinds) if kd == kind]
    return [h for gi in groups for h in range(gi * g, (gi + 1) * g)], groups


def _sub_ctx(ctx: AttnContext, n_groups: int) -> AttnContext:
    return dataclasses.replace(ctx, kv_heads=n_groups)


def sparse_selection(q, k, ctx: AttnContext, p: HeadHybridParams) -> torch.Tensor:
    """Block selection of the sparse variant for the given heads: bool [B, H, nqb, nkb]."""
    from surgeon.attention.registry import get_variant

    name, sp = p.sparse_params()
    return get_variant(name).select(q, k, ctx, sp)


class HeadHybrid(Variant):
    name = "head_hybrid"
    lowering_module = "surgeon.attention.head_hybrid.lowering"
    Params = HeadHybridParams
    family = "sparse"
    description = ("DuoAttention-style head split in one op: each KV group dense, streaming (sink + window) "
                   "or sparse (block_topp / block_topk)")

    def keep_mask(self, q, k, v, ctx: AttnContext, p: HeadHybridParams, block_mask=None) -> torch.Tensor:
        from surgeon.attention.window_sink import window_keep

        b, hq, nq, _ = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        g = hq // hkv
        kinds = group_kinds(p, hkv)
        keep = torch.ones(b, hq, nq, nk, dtype=torch.bool, device=q.device)
        sh, _ = _heads(kinds, "streaming", g)
        if sh:
            keep[:, sh] = window_keep(nq, nk, ctx.causal, p.window_params(), q.device)[:, 0]
        ph, pg = _heads(kinds, "sparse", g)
        if ph:
            sel = sparse_selection(q[:, ph], k[:, pg], _sub_ctx(ctx, len(pg)), p)
            keep[:, ph] = upsample_block_mask(sel, nq, nk, p.block_size, p.block_size)
        return keep

    def reference(self, q, k, v, ctx: AttnContext, p: HeadHybridParams, block_mask=None):
        out = attention_from_keep(q, k, v, ctx, self.keep_mask(q, k, v, ctx, p))
        if recorder_active():
            d = self.achieved_density(q, k, v, ctx, p)
            record_density(ctx.site, self.name, d, d)
        return out

    def _split(self, q, k, v, ctx: AttnContext, p: HeadHybridParams, block_mask=None):
        from surgeon.attention.dense import sdpa

        b, hq, nq, _ = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        kinds = group_kinds(p, hkv)
        out = q.new_empty(b, hq, nq, v.shape[3])
        parts: dict[str, tuple[list[int], list[int]]] = {kd: _heads(kinds, kd, g) for kd in KINDS}
        for kd, (heads, groups) in parts.items():
            if not heads:
                continue
            if len(heads) == hq:
                qs, ks, vs = q, k, v
            else:
                qs, ks, vs = q[:, heads], k[:, groups], v[:, groups]
            sub = _sub_ctx(ctx, len(groups))
            if kd == "dense":
                o = sdpa(qs, ks, vs, sub)
            elif kd == "streaming":
                o = band_attention(qs, ks, vs, sink_tokens=p.sink_tokens, window=p.window, causal=ctx.causal,
                                   scale=ctx.scale, key_padding=ctx.key_padding)
            else:
                sel = sparse_selection(qs, ks, sub, p)
                o = block_sparse_attention(qs, ks, vs, sel, q_block=p.block_size, k_block=p.block_size,
                                           causal=ctx.causal, scale=ctx.scale, key_padding=ctx.key_padding)
            if len(heads) == hq:
                out = o
            else:
                out[:, heads] = o
        if recorder_active():
            d = self.achieved_density(q, k, v, ctx, p)
            record_density(ctx.site, self.name, d, d)
        return out

    def fast_paths(self):
        return {"split": self._split}

    def fast_available(self, name: str, q, ctx: AttnContext, p: VariantParams) -> bool:
        return not ctx.modulated and ctx.attn_mask is None

    def requested_density(self, p: HeadHybridParams) -> float:
        # streaming windows and top-p budgets are not fractions: the density follows the length
        return 1.0

    def achieved_density(self, q, k, v, ctx: AttnContext, p: HeadHybridParams, block_mask=None) -> float:
        if ctx.attn_mask is not None:
            return super().achieved_density(q, k, v, ctx, p, block_mask)
        from surgeon.attention.window_sink import window_density

        hq, hkv = q.shape[1], k.shape[1]
        g = hq // hkv
        kinds = group_kinds(p, hkv)
        nq, nk = q.shape[2], k.shape[2]
        total = 0.0
        for kd in KINDS:
            heads, groups = _heads(kinds, kd, g)
            if not heads:
                continue
            if kd == "dense":
                d = 1.0
            elif kd == "streaming":
                d = window_density(nq, nk, ctx.causal, p.window_params(), ctx.key_padding, q.device)
            else:
                sel = sparse_selection(q[:, heads], k[:, groups], _sub_ctx(ctx, len(groups)), p)
                counts = block_pair_counts(nq, nk, p.block_size, p.block_size, ctx.causal, ctx.key_padding, q.device)
                d = block_mask_density(sel, counts)
            total += d * len(heads)
        return total / hq

    def selection_overhead(self, p: HeadHybridParams) -> float:
        """The sparse heads' estimator work, as a fraction of the site's dense QKᵀ work."""
        if not p.kinds:
            return 0.0
        from surgeon.attention.registry import get_variant

        name, sp = p.sparse_params()
        share = sum(kd == "sparse" for kd in p.kinds) / len(p.kinds)
        return share * get_variant(name).selection_overhead(sp)

    # -- test-matrix hooks (the shared matrix runs with 2 KV groups) ------------------------
    def degenerate_params(self, n: int) -> HeadHybridParams:
        # streaming with a window of the whole sequence and block top-p with p = 1 are dense
        return HeadHybridParams(kinds=("streaming", "sparse"), sink_tokens=4, window=n, p=1.0, block_size=16,
                                stride=4)

    def example_params(self, n: int, hq: int) -> HeadHybridParams:
        return HeadHybridParams(kinds=("streaming", "sparse"), sink_tokens=4, window=max(1, n // 6), p=0.6,
                                block_size=16, stride=4)

    def small_example_params(self, hq: int) -> HeadHybridParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"kinds": ["streaming", "sparse"], "sink_tokens": 2, "window": 6, "p": 0.6,
                                 "block_size": 4, "stride": 2})
