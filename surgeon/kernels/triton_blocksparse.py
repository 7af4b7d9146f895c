"""Block-sparse attention (forward): a Triton kernel over per-head key-block index lists.

Semantics (defined by :func:`blocksparse_attention_reference`): query row r (position
``r + Nk - Nq``) of query block ``i = r // block`` attends to key t iff

* ``block_mask[b, h, i, t // block]`` is True,
* ``key_padding[b, t]`` is True (when given),
* ``t <= r + Nk - Nq`` (when causal: token-level mask, queries are the last Nq of Nk keys),

with softmax over the attended keys of ``q·k * scale``; a row with no attended key outputs 0.
Query head h reads KV head ``h // (Hq // Hkv)`` (GQA). Query blocks and key blocks have the same
size ``block``; ``nqb = ceil(Nq / block)``, ``nkb = ceil(Nk / block)``.

The kernel (one program per (query block, batch·head)) loops over the selected key blocks of
its row with the FlashAttention online-softmax recurrence, so its cost is proportional to the
number of selected blocks, and it never materialises a score matrix. Variable counts per row
(including zero) are supported; causal key blocks entirely after a query block are dropped
before launch. float32 inputs use IEEE float32 dot products (no TF32) so that they match the
reference closely; float16/bfloat16 accumulate in float32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from surgeon.errors import BadInput
from surgeon.kernels.geometry import causal_block_bounds
from surgeon.kernels.triton_common import (
    HAS_TRITON,
    LOG2E,
    block_mask_to_indices,
    cdiv,
    check_attention_inputs,
    dot_options,
    launch,
    masked_softmax_ref,
    padding_bias,
    ref_dtype,
    require_runnable,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from surgeon.kernels.triton_common import _attend_tile

__all__ = [
    "block_mask_to_indices",
    "blocksparse_attention",
    "blocksparse_attention_from_indices",
    "blocksparse_attention_reference",
    "check_block_mask",
]


def check_block_mask(block_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """Validate a block mask against q [B,Hq,Nq,D], k [B,Hkv,Nk,D]; returns it as bool
    [B,Hq,nqb,nkb] (batch and head dims of size 1 are broadcast)."""
    b, hq, nq, _ = q.shape
    want = (b, hq, cdiv(nq, block), cdiv(k.shape[2], block))
    if block_mask.dim() != 4 or block_mask.shape[2:] != want[2:] or any(
        s not in (1, w) for s, w in zip(block_mask.shape[:2], want[:2])
    ):
        raise BadInput(
            f"block_mask has shape {tuple(block_mask.shape)}, expected {want} for block={block}",
            "pass bool [B, Hq, ceil(Nq/block), ceil(Nk/block)]",
        )
    if block_mask.device != q.device:
        raise BadInput("block_mask is on another device than q", "move it to q's device")
    return block_mask.to(torch.bool).expand(want)


def blocksparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    scale: Optional[float],
    causal: bool,
    key_padding: Optional[torch.Tensor] = None,
    block: int = 64,
) -> torch.Tensor:
    """Plain-torch definition of block-sparse attention (materialises Nq×Nk per head).

    q [B,Hq,Nq,D], k [B,Hkv,Nk,D], v [B,Hkv,Nk,Dv], block_mask bool [B,Hq,nqb,nkb],
    scale (None → D**-0.5), key_padding bool [B,Nk] (True = real token) → out [B,Hq,Nq,Dv] in
    q's dtype (computed in float32, or float64 for float64 inputs). Small shapes only.
    """
    check_attention_inputs(q, k, v, causal, key_padding, block, kernel=False)
    bm = check_block_mask(block_mask, q, k, block)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    cd = ref_dtype(q)
    dev = q.device
    qblk = torch.arange(nq, device=dev) // block
    kblk = torch.arange(nk, device=dev) // block
    allow = torch.ones(nq, nk, dtype=torch.bool, device=dev)
    if causal:
        allow = allow & (torch.arange(nk, device=dev)[None, :] <= torch.arange(nk - nq, nk, device=dev)[:, None])
    out = torch.zeros(b, hq, nq, v.shape[3], dtype=cd, device=dev)
    for bi in range(b):
        row_allow = allow if key_padding is None else allow & key_padding[bi].to(torch.bool)[None, :]
        for h in range(hq):
            keep = row_allow & bm[bi, h][qblk][:, kblk]
            z = (q[bi, h].to(cd) @ k[bi, h // group].to(cd).T) * scale
            out[bi, h] = masked_softmax_ref(z, keep) @ v[bi, h // group].to(cd)
    return out.to(q.dtype)


if HAS_TRITON:

    @triton.jit
    def _blocksparse_fwd_kernel(
        Q, K, V, O, IDX, CNT, BIAS,
        sqb, sqh, sqn, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        sob, soh, son, sod,
        sib, sih, siq, sik,
        scb, sch, scq,
        sbb,
        HQ, GROUP, NQB, NQ, NK, D, DV, Q_OFF,
        qk_scale,
        CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # Heavier (later) query blocks first: better load balance for causal masks.
        pid_m = NQB - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // HQ).to(tl.int64)
        h = (pid_bh % HQ).to(tl.int64)
        hk = h // GROUP
        offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
            mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D),
            other=0.0,
        )
        qpos = offs_m + Q_OFF
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_DV], tl.float32)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        bias_base = BIAS + b * sbb
        idx_base = IDX + b * sib + h * sih + pid_m * siq
        cnt = tl.load(CNT + b * scb + h * sch + pid_m * scq)
        for t in range(0, cnt):
            kb = tl.load(idx_base + t * sik)
            start = kb * BLOCK
            stop = tl.minimum(start + BLOCK, NK)
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, qpos, k_base, v_base, bias_base, start, stop,
                skn, skd, svn, svd, D, DV, qk_scale,
                BLOCK, BLOCK_D, BLOCK_DV, HAS_BIAS, CAUSAL, PREC, UPCAST,
            )
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(
            O + b * sob + h * soh + offs_m[:, None] * son + offs_dv[None, :] * sod,
            out.to(O.dtype.element_ty),
            mask=(offs_m[:, None] < NQ) & (offs_dv[None, :] < DV),
        )


def blocksparse_attention_from_indices(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    scale: float,
    causal: bool,
    key_padding: Optional[torch.Tensor] = None,
    block: int = 64,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run the block-sparse kernel on index lists.

    q [B,Hq,Nq,D], k [B,Hkv,Nk,D], v [B,Hkv,Nk,Dv] (float16/bfloat16/float32, CUDA or CPU under
    ``TRITON_INTERPRET=1``); kv_idx int32 [B,Hq,nqb,max_k] (key-block indices, ascending, only
    the first ``kv_cnt`` of each row are read), kv_cnt int32 [B,Hq,nqb]; key_padding bool
    [B,Nk]; ``out`` an optional preallocated [B,Hq,Nq,Dv] tensor of q's dtype.
    Returns out [B,Hq,Nq,Dv]. Causal masking is token-level wherever a selected key block reaches
    past a query (see the module docstring).
    """
    check_attention_inputs(q, k, v, causal, key_padding, block, kernel=True)
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    nqb = cdiv(nq, block)
    if kv_idx.dim() != 4 or kv_idx.shape[:3] != (b, hq, nqb) or kv_cnt.shape != (b, hq, nqb):
        raise BadInput(
            f"kv_idx {tuple(kv_idx.shape)} / kv_cnt {tuple(kv_cnt.shape)} do not match [B,Hq,nqb]={(b, hq, nqb)}",
            "build them with block_mask_to_indices on a [B,Hq,ceil(Nq/block),ceil(Nk/block)] mask",
        )
    require_runnable(q)
    if out is None:
        out = torch.empty(b, hq, nq, dv, dtype=q.dtype, device=q.device)
    elif out.shape != (b, hq, nq, dv) or out.dtype != q.dtype or out.device != q.device:
        raise BadInput(f"out has shape {tuple(out.shape)} / {out.dtype}, expected {(b, hq, nq, dv)} / {q.dtype}",
                       "pass a matching tensor or out=None")
    if nq == 0 or b * hq == 0:
        return out
    idx = kv_idx.to(device=q.device, dtype=torch.int32)
    cnt = kv_cnt.to(device=q.device, dtype=torch.int32)
    bias = padding_bias(key_padding, q.device)
    block_d = max(16, triton.next_power_of_2(d))
    block_dv = max(16, triton.next_power_of_2(dv))
    grid = (nqb, b * hq)
    args = (
        q, k, v, out, idx, cnt, bias,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *idx.stride(), *cnt.stride(),
        bias.stride(0),
        hq, hq // hkv, nqb, nq, nk, d, dv, nk - nq,
        float(scale) * LOG2E,
    )
    consts = dict(
        CAUSAL=bool(causal), HAS_BIAS=key_padding is not None,
        BLOCK=block, BLOCK_D=block_d, BLOCK_DV=block_dv, **dot_options(q.dtype),
    )
    launch(_blocksparse_fwd_kernel, grid, args, consts, block, max(block_d, block_dv), q.dtype)
    return out


def blocksparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    scale: Optional[float],
    causal: bool,
    key_padding: Optional[torch.Tensor] = None,
    block: int = 64,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Block-sparse attention with the Triton kernel (same semantics as the reference).

    q [B,Hq,Nq,D], k [B,Hkv,Nk,D], v [B,Hkv,Nk,Dv] (float16/bfloat16/float32; CUDA, or CPU under
    ``TRITON_INTERPRET=1``); block_mask bool [B|1,Hq|1,ceil(Nq/block),ceil(Nk/block)];
    scale (None → D**-0.5); key_padding bool [B,Nk] (True = real token); ``out`` optional
    preallocated [B,Hq,Nq,Dv]. Returns out [B,Hq,Nq,Dv] in q's dtype.
    Converts the mask to index lists (one host sync for the longest row); use
    :func:`blocksparse_attention_from_indices` to reuse index lists across calls.
    """
    check_attention_inputs(q, k, v, causal, key_padding, block, kernel=True)
    bm = check_block_mask(block_mask, q, k, block)
    require_runnable(q)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    if causal:
        future, _ = causal_block_bounds(q.shape[2], k.shape[2], block, q.device)
        bm = bm & ~future
    idx, cnt = block_mask_to_indices(bm)
    return blocksparse_attention_from_indices(q, k, v, idx, cnt, scale, causal, key_padding, block, out)
