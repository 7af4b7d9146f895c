"""``pyramid``: PSA-style multi-level pooled KV attention (methods.md §6).

Per (query block, key block) pair a *level* f ∈ {0, 1, 2, 4, 8} is chosen: f = 1 attends the
key block's tokens at full resolution, f > 1 through its f-token mean-pooled keys and values,
0 skips it. The semantics are those of :mod:`surgeon.kernels.triton_pyramid` (which is also
this variant's GPU fast path):

* Pooled groups: a key block is split into groups of f consecutive tokens from its start; a
  group stands for its *real* tokens (not padding, position < Nk): k̄, v̄ are their means and
  the logit is ``q·k̄ · scale + ln c`` with c their count (c = f for full groups: PSA's ``+ln f``
  correction, so one pooled key carries the softmax mass of the f tokens it averages; the
  count form extends it to padding and a ragged last block). Empty groups are never attended.
* Causal (queries are the last Nq of the Nk positions; query blocks are row blocks): key
  blocks entirely after a query block are skipped; key blocks whose last key reaches the
  block's first query position (the diagonal block for Nq == Nk) always run at level 1 with
  the token-level causal mask. Every other allowed block lies entirely before all of the
  block's queries, so a pooled key never includes a future token.
* Block importance: deterministic pooled-QK logits ``q̄_i · k̄_j · scale`` per query head
  (GQA mapping) instead of PSA's softmax over randomly sampled queries/keys (a deliberate
  deviation: deterministic, reproducible, and the same estimator as ``block_topk``). q̄ pools
  the block's real queries; causal: the ``block_size`` rows ending at the block's first row
  (a later token must not change earlier outputs). Key blocks without a real key are never
  ranked.
* Level assignment (PSA ``topk`` mode): per query-block row the allowed key blocks are ranked
  by importance (forced diagonal blocks first, ties toward the lower block index); with n the
  number of allowed blocks of the row, rank r gets level f when
  ``⌈lo·n⌉ ≤ r < ⌈hi·n⌉`` for the interval (f, lo, hi); ranks in no interval are skipped.
  The default is PSA's preset {1: [0, .05], 2: [.05, .15], 4: [.15, .25], 8: [.25, .5],
  skip: [.5, 1]}. ``((1, 0, 1),)`` is dense attention.
* Not implemented: the similarity cap (``use_sim_mask``), ``thresholdbound`` mode, kernel
  alignment rounding of interval lengths, Gilbert token reordering, warm-up steps.
* Modulation hooks edit per-token logits/probabilities, which pooled keys do not have: the
  reference refuses a modulated context. A bool ``attn_mask`` is honoured exactly at level 1
  and lets a pooled group through only if it allows every real token of the group; a float
  ``attn_mask`` is refused.
* Density (requested and achieved) is cost-weighted: a level-f block counts 1/f of its dense
  pairs; ``keep_mask`` marks every pair whose key reaches the query at any level.

Fast paths: ``gather`` (CPU; per (query block, head) one gathered list of pooled and
full-resolution keys from a bank of all levels, in units of one level-8 group, with the
``+ln c`` biases as a row-broadcast mask on the CPU flash kernel and the causal-boundary blocks
as a causal block merged by log-sum-exp; never Nq×Nk) and ``triton`` (CUDA only: the kernel of
:mod:`surgeon.kernels.triton_pyramid` on this variant's levels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from surgeon.errors import BadInput
from surgeon.kernels.geometry import (
    causal_block_bounds,
    block_pair_counts,
    num_blocks,
    pooled_keys,
    pooled_queries,
    query_validity,
    upsample_block_mask,
)
from surgeon.kernels.gather_cpu import gathered_attention
from surgeon.attention.base import (
    AttnContext,
    Variant,
    VariantParams,
    check_range,
    masked_softmax,
    record_density,
    recorder_active,
    repeat_kv,
)

NEG_INF = float("-inf")
LEVELS = (1, 2, 4, 8)
PSA_PRESET = ((1, 0.0, 0.05), (2, 0.05, 0.15), (4, 0.15, 0.25), (8, 0.25, 0.5))


@dataclass(frozen=True)
class PyramidParams(VariantParams):
    """block_size: tokens per query/key block (a multiple of the largest level used);
    intervals: ((level, lo, hi), ...) rank-fraction intervals, sorted and non-overlapping,
    level ∈ {1, 2, 4, 8}; ranks in no interval are skipped."""

    block_size: int = 64
    intervals: tuple[tuple[float, float, float], ...] = PSA_PRESET

    def __post_init__(self) -> None:
        check_range("block_size", self.block_size, 1, 1 << 20)
        if not isinstance(self.intervals, tuple) or len(self.intervals) == 0:
            raise BadInput("intervals is empty", "give ((level, lo, hi), ...), e.g. ((1, 0.0, 1.0),) for dense")
        prev_hi = 0.0
        for i, iv in enumerate(self.intervals):
            if not isinstance(iv, tuple) or len(iv) != 3:
                raise BadInput(f"intervals[{i}]={iv!r} is not a (level, lo, hi) triple",
                               "give each interval as [level, lo, hi]")
            f, lo, hi = iv
            if isinstance(f, bool) or f not in LEVELS:
                raise BadInput(f"intervals[{i}] level={f!r} is out of range", f"use a level in {list(LEVELS)}")
            check_range(f"intervals[{i}].lo", lo, 0.0, 1.0)
            check_range(f"intervals[{i}].hi", hi, 0.0, 1.0)
            if not hi > lo:
                raise BadInput(f"intervals[{i}]=({f}, {lo}, {hi}) is empty", "use lo < hi")
            if lo < prev_hi - 1e-12:
                raise BadInput(f"intervals[{i}] starts at {lo}, before the previous interval ends ({prev_hi})",
                               "sort the intervals by lo and make them non-overlapping")
            prev_hi = hi
            if self.block_size % int(f):
                raise BadInput(f"block_size={self.block_size} is not a multiple of level {int(f)}",
                               f"use a block_size that is a multiple of {max(int(x[0]) for x in self.intervals)}")

    def levels_used(self) -> tuple[int, ...]:
        return tuple(sorted({1} | {int(iv[0]) for iv in self.intervals}))


@dataclass(frozen=True)
class _Geometry:
    future: torch.Tensor  # [nqb, nkb] bool: key block entirely after the query block
    partial: torch.Tensor  # [nqb, nkb] bool: reaches the block's first query (forced level 1)


def _geometry(nq: int, nk: int, bs: int, causal: bool, device: torch.device) -> _Geometry:
    nqb, nkb = num_blocks(nq, bs), num_blocks(nk, bs)
    if not causal:
        z = torch.zeros(nqb, nkb, dtype=torch.bool, device=device)
        return _Geometry(z, z)
    future, partial = causal_block_bounds(nq, nk, bs, device)
    return _Geometry(future, partial)


def assign_levels(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, p: PyramidParams) -> torch.Tensor:
    """Level per (query block, key block, head): int8 [B, Hq, nqb, nkb] in {0,1,2,4,8},
    with the causal rule already applied. q [B,Hq,Nq,D], k [B,Hkv,Nk,D]."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    bs = p.block_size
    geo = _geometry(nq, nk, bs, ctx.causal, q.device)
    nqb, nkb = geo.future.shape
    qbar = pooled_queries(q, bs, ctx.causal, query_validity(ctx.key_padding, nq, nk, ctx.causal))
    kbar, has_real = pooled_keys(k, bs, ctx.key_padding)
    s = torch.matmul(qbar.view(b, hkv, g * nqb, d), kbar.transpose(-1, -2)).view(b, hq, nqb, nkb) * ctx.scale
    allowed = ~geo.future
    s = s.masked_fill(~(allowed & has_real[:, None, None, :]), NEG_INF)
    s = s.masked_fill(geo.partial, float("inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(nkb, device=q.device).expand_as(order))
    n = allowed.sum(dim=-1).to(torch.float64)  # [nqb]
    lv = torch.zeros(b, hq, nqb, nkb, dtype=torch.int8, device=q.device)
    for f, lo, hi in p.intervals:
        a = torch.ceil(n * lo - 1e-9).to(torch.long)[:, None]
        z = torch.ceil(n * hi - 1e-9).to(torch.long)[:, None]
        lv = torch.where((ranks >= a) & (ranks < z), torch.full_like(lv, int(f)), lv)
    lv = torch.where(s > NEG_INF, lv, torch.zeros_like(lv))
    lv = torch.where(geo.partial, torch.ones_like(lv), lv)
    return torch.where(geo.future, torch.zeros_like(lv), lv)


@dataclass(frozen=True)
class _Bank:
    """All levels' keys side by side: bank index m ↦ (level, key block, position)."""

    k: torch.Tensor  # [B, Hkv, M, D]
    v: torch.Tensor  # [B, Hkv, M, Dv]
    bias: torch.Tensor  # [B, M]: ln(count), −inf for empty groups (0 for real level-1 keys)
    level: torch.Tensor  # [M] long
    block: torch.Tensor  # [M] long key block
    pos: torch.Tensor  # [M] long position of the group's last token
    start: dict[int, int]  # level → first bank index
    npad: int


def build_bank(k: torch.Tensor, v: torch.Tensor, key_padding: Optional[torch.Tensor], bs: int,
               levels: tuple[int, ...]) -> _Bank:
    """Pooled keys/values of every level in ``levels`` concatenated along the key axis.

    k [B,Hkv,Nk,D], v [B,Hkv,Nk,Dv]; pooling over real tokens is accumulated in float32 at
    least (float64 stays float64)."""
    b, hkv, nk, d = k.shape
    dv = v.shape[3]
    dev = k.device
    npad = num_blocks(nk, bs) * bs
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    real = torch.zeros(b, npad, dtype=torch.bool, device=dev)
    real[:, :nk] = True if key_padding is None else key_padding.to(torch.bool)
    w = real.to(acc)
    ks = torch.zeros(b, hkv, npad, d, dtype=acc, device=dev)
    vs = torch.zeros(b, hkv, npad, dv, dtype=acc, device=dev)
    ks[:, :, :nk] = k.to(acc)
    vs[:, :, :nk] = v.to(acc)
    ks = torch.where(w[:, None, :, None] > 0, ks, torch.zeros((), dtype=acc, device=dev))
    vs = torch.where(w[:, None, :, None] > 0, vs, torch.zeros((), dtype=acc, device=dev))
    kk, vv, bias, lvl, blk, pos, start = [], [], [], [], [], [], {}
    m = 0
    for f in levels:
        ng = npad // f
        cnt = w.view(b, ng, f).sum(-1)
        kf = ks.view(b, hkv, ng, f, d).sum(3) / cnt.clamp_min(1.0)[:, None, :, None]
        vf = vs.view(b, hkv, ng, f, dv).sum(3) / cnt.clamp_min(1.0)[:, None, :, None]
        kk.append(kf.to(k.dtype))
        vv.append(vf.to(v.dtype))
        bias.append(torch.where(cnt > 0, torch.log(cnt.clamp_min(1.0)), torch.full_like(cnt, NEG_INF)))
        gi = torch.arange(ng, device=dev)
        lvl.append(torch.full((ng,), f, dtype=torch.long, device=dev))
        blk.append((gi * f) // bs)
        pos.append(gi * f + f - 1)
        start[f] = m
        m += ng
    return _Bank(torch.cat(kk, 2), torch.cat(vv, 2), torch.cat(bias, 1).to(k.dtype), torch.cat(lvl),
                 torch.cat(blk), torch.cat(pos), start, npad)


def _check_ctx(ctx: AttnContext) -> None:
    if ctx.modulated:
        raise BadInput("pyramid attends pooled keys, which per-token modulation hooks cannot edit",
                       "compose the modulation with a token-level variant (e.g. block_topk) instead of pyramid")
    if ctx.attn_mask is not None and ctx.attn_mask.dtype != torch.bool:
        raise BadInput("pyramid cannot pool a float attn_mask",
                       "use a bool attn_mask at this site, or another variant")


def pyramid_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lv: torch.Tensor, ctx: AttnContext,
                      bs: int, levels: tuple[int, ...]) -> torch.Tensor:
    """Plain-torch pyramid attention over all levels' keys at once (reference use only).

    q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D|Dv], lv int8 [B,Hq,nqb,nkb] → out [B,Hq,Nq,Dv].
    """
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    bank = build_bank(k, v, ctx.key_padding, bs, levels)
    z = torch.matmul(q, repeat_kv(bank.k, hq).transpose(-1, -2)) * ctx.scale + bank.bias[:, None, None, :]
    rows_lv = lv.repeat_interleave(bs, dim=2)[:, :, :nq].to(torch.long)  # [B,Hq,Nq,nkb]
    keep = rows_lv[..., bank.block] == bank.level  # [B,Hq,Nq,M]
    keep = keep & (bank.bias > NEG_INF)[:, None, None, :]
    if ctx.causal:
        qpos = torch.arange(nk - nq, nk, device=q.device)
        keep = keep & (bank.pos[None, :] <= qpos[:, None])
    if ctx.attn_mask is not None:
        am = ctx.attn_mask.to(torch.bool).expand(*ctx.attn_mask.shape[:2], nq, nk)
        am = torch.cat([am, am.new_ones(*am.shape[:3], bank.npad - nk)], dim=-1)
        pooled = [am.view(*am.shape[:3], bank.npad // f, f).all(-1) for f in levels]
        keep = keep & torch.cat(pooled, dim=-1)
    pr = masked_softmax(z, keep)
    return torch.matmul(pr, repeat_kv(bank.v, hq))


def pyramid_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lv: torch.Tensor, ctx: AttnContext,
                   bs: int, levels: tuple[int, ...], *, fused: bool = True) -> torch.Tensor:
    """Pyramid attention with one gathered key list per (query block, head) — pooled levels
    and the full-resolution blocks before the block — plus, causal, the blocks crossing the
    causal boundary as a contiguous token range under the causal mask.

    Same contract as :func:`pyramid_reference`; never materialises Nq×Nk scores."""
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    bank = build_bank(k, v, ctx.key_padding, bs, levels)
    nkb = lv.shape[-1]
    geo = _geometry(nq, nk, bs, ctx.causal, q.device)
    jb = torch.arange(nkb, device=q.device)
    unit = bs // max(levels)  # gather unit: one level-max pooled block
    parts = []
    for f in sorted(levels, reverse=True):
        sel = (lv == f) & ~geo.partial
        cnt = int(sel.sum(dim=-1).max().item()) if sel.numel() else 0
        if cnt == 0:
            continue
        blocks = torch.sort(torch.where(sel, jb, -1), dim=-1).values[..., nkb - cnt:]  # [B,Hq,nqb,cnt]
        per = max(levels) // f  # units per level-f block
        u = (bank.start[f] + blocks * (bs // f)) // unit
        tok = u[..., None] + torch.arange(per, device=q.device)
        tok = torch.where(blocks[..., None] >= 0, tok, torch.full_like(tok, -1))
        parts.append(tok.flatten(-2))
    idx = torch.cat(parts, dim=-1) if parts else torch.full((b, hq, lv.shape[2], 0), -1, dtype=torch.long,
                                                            device=q.device)
    diag_start, diag_len = None, 0
    n_part = geo.partial.sum(dim=-1)  # [nqb]
    if ctx.causal and bool((n_part > 0).any()):
        first = torch.where(geo.partial, jb, nkb).amin(dim=-1).clamp(max=nkb - 1)
        diag_start = first * bs
        diag_len = int(n_part.max().item()) * bs
    return gathered_attention(q, bank.k, bank.v, idx, group=bs, unit=unit, scale=ctx.scale, key_bias=bank.bias,
                              diag_start=diag_start, diag_len=diag_len, q_offset=nk - nq, fused=fused)


class Pyramid(Variant):
    name = "pyramid"
    lowering_module = "surgeon.attention.pyramid.lowering"
    Params = PyramidParams
    family = "sparse"
    description = ("PSA pyramid attention: key blocks attended at full resolution, through 2/4/8x "
                   "mean-pooled K/V (+ln f logit correction), or skipped, by importance rank")

    def reference(self, q, k, v, ctx: AttnContext, p: PyramidParams, block_mask=None):
        _check_ctx(ctx)
        lv = assign_levels(q, k, ctx, p)
        out = pyramid_reference(q, k, v, lv, ctx, p.block_size, p.levels_used())
        self._record(q, k, ctx, p, lv)
        return out

    def _gather(self, q, k, v, ctx: AttnContext, p: PyramidParams, block_mask=None):
        lv = assign_levels(q, k, ctx, p)
        out = pyramid_gather(q, k, v, lv, ctx, p.block_size, p.levels_used())
        self._record(q, k, ctx, p, lv)
        return out

    def _triton(self, q, k, v, ctx: AttnContext, p: PyramidParams, block_mask=None):
        from surgeon.kernels.triton_pyramid import pyramid_attention

        lv = assign_levels(q, k, ctx, p)
        out = pyramid_attention(q, k, v, lv, ctx.scale, ctx.causal, ctx.key_padding, block=p.block_size)
        self._record(q, k, ctx, p, lv)
        return out

    def fast_paths(self):
        return {"gather": self._gather, "triton": self._triton}

    def fast_available(self, name: str, q, ctx: AttnContext, p: VariantParams) -> bool:
        if ctx.modulated or ctx.attn_mask is not None:
            return False
        if name == "triton":
            if q.device.type != "cuda":  # the interpreter is for kernel tests, not the op
                return False
            from surgeon.kernels.triton_common import BLOCK_SIZES, KERNEL_DTYPES, MAX_HEAD_DIM, kernels_runnable

            return (kernels_runnable(q) and q.dtype in KERNEL_DTYPES and p.block_size in BLOCK_SIZES
                    and q.shape[-1] <= MAX_HEAD_DIM)
        return True

    def _density(self, q, k, ctx: AttnContext, p: PyramidParams, lv: torch.Tensor) -> float:
        counts = block_pair_counts(q.shape[2], k.shape[2], p.block_size, p.block_size, ctx.causal,
                                   ctx.key_padding, q.device)  # [B|1, nqb, nkb]
        w = torch.where(lv > 0, 1.0 / lv.to(torch.float64).clamp_min(1.0), torch.zeros((), dtype=torch.float64))
        c = counts[:, None].expand(lv.shape[0], lv.shape[1], -1, -1)
        return float((c * w).sum().item()) / max(float(c.sum().item()), 1.0)

    def _record(self, q, k, ctx: AttnContext, p: PyramidParams, lv: torch.Tensor) -> None:
        if recorder_active():
            record_density(ctx.site, self.name, self.requested_density(p), self._density(q, k, ctx, p, lv))

    def keep_mask(self, q, k, v, ctx: AttnContext, p: PyramidParams, block_mask=None) -> torch.Tensor:
        """Pairs whose key reaches the query at any level (pooled ones included)."""
        lv = assign_levels(q, k, ctx, p)
        return upsample_block_mask(lv > 0, q.shape[2], k.shape[2], p.block_size, p.block_size)

    def requested_density(self, p: PyramidParams) -> float:
        """Cost-weighted: a level-f block costs 1/f of a full block."""
        return float(min(1.0, sum((hi - lo) / f for f, lo, hi in p.intervals)))

    def achieved_density(self, q, k, v, ctx: AttnContext, p: PyramidParams, block_mask=None) -> float:
        """Cost-weighted kept fraction: Σ dense pairs of each block / its level, over dense pairs."""
        return self._density(q, k, ctx, p, assign_levels(q, k, ctx, p))

    # -- test-matrix hooks ------------------------------------------------------------
    def degenerate_params(self, n: int) -> PyramidParams:
        return PyramidParams(block_size=16, intervals=((1, 0.0, 1.0),))

    def example_params(self, n: int, hq: int) -> PyramidParams:
        return PyramidParams(block_size=16, intervals=((1, 0.0, 0.15), (2, 0.15, 0.3), (4, 0.3, 0.45),
                                                       (8, 0.45, 0.6)))

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"block_size": 8,
                                 "intervals": [[1, 0.0, 0.3], [2, 0.3, 0.5], [4, 0.5, 0.7], [8, 0.7, 0.9]]})
