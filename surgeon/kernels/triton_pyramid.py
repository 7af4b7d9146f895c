"""Pyramid attention (PSA-style multi-level pooled KV, forward): Triton kernel and reference.

Semantics (defined by :func:`pyramid_attention_reference`; methods.md §6). ``levels`` int8
[B,Hq,nqb,nkb] gives, per (query block i, key block j), a level f in {0, 1, 2, 4, 8}:

* f = 0: the key block is skipped;
* f = 1: its tokens are attended at full resolution (logit ``q·k * scale``);
* f > 1: its tokens are split into groups of f consecutive tokens starting at the block's
  start; a group stands for its *real* tokens (``key_padding`` True and position < Nk): the
  pooled key/value are the mean of their k/v, and the logit is ``q·k̄ * scale + ln c`` with
  c the number of real tokens in the group (c = f for full groups, so ``+ ln f`` as in PSA;
  the count form is our extension to padding and to a last partial block). Groups with c = 0
  are never attended.

Causal (queries are the last Nq of Nk keys; for prefill Nq == Nk): key blocks entirely after
a query block are skipped whatever their level; key blocks that reach the query block's first
query (for Nq == Nk: the diagonal block) always run at level 1 — even where ``levels`` says 0
or a pooled level — with a token-level causal mask; all other blocks use their level.
Softmax runs over all attended keys of a row; a row with none outputs 0. GQA: query head h
reads KV head ``h // (Hq // Hkv)``.

The kernel (one program per (query block, batch·head)) loops over the row's non-skipped key
blocks with the FlashAttention online-softmax recurrence across levels. Pooled K/V are
precomputed per call by :func:`build_pyramid` (7/8 of K/V's size in extra memory) together with
log2-count biases. A level-f tile holds ``max(block/f, 16)`` pooled keys (tl.dot needs ≥ 16;
extra lanes are masked).
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
    "LEVELS",
    "build_pyramid",
    "check_levels",
    "effective_levels",
    "pyramid_attention",
    "pyramid_attention_reference",
]

LEVELS = (0, 1, 2, 4, 8)
POOLED = (2, 4, 8)


def check_levels(levels: torch.Tensor, q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """Validate ``levels`` against q [B,Hq,Nq,D], k [B,Hkv,Nk,D]; returns int8 [B,Hq,nqb,nkb]
    (batch and head dims of size 1 are broadcast)."""
    b, hq, nq, _ = q.shape
    want = (b, hq, cdiv(nq, block), cdiv(k.shape[2], block))
    if levels.dim() != 4 or levels.shape[2:] != want[2:] or any(
        s not in (1, w) for s, w in zip(levels.shape[:2], want[:2])
    ):
        raise BadInput(
            f"levels has shape {tuple(levels.shape)}, expected {want} for block={block}",
            "pass int8 [B, Hq, ceil(Nq/block), ceil(Nk/block)]",
        )
    if levels.dtype.is_floating_point or levels.dtype == torch.bool or levels.dtype.is_complex:
        raise BadInput(f"levels has dtype {levels.dtype}", "pass an integer tensor (int8) with values in {0,1,2,4,8}")
    if levels.device != q.device:
        raise BadInput("levels is on another device than q", "move it to q's device")
    lv = levels.to(torch.int8)
    ok = (lv == 0) | (lv == 1) | (lv == 2) | (lv == 4) | (lv == 8)
    if lv.numel() and not bool(ok.all()):
        bad = sorted({int(x) for x in levels[~ok].flatten()[:8].tolist()})
        raise BadInput(f"levels contains {bad}", f"use only {LEVELS} (0 = skip)")
    return lv.expand(want)


def effective_levels(levels: torch.Tensor, nq: int, nk: int, block: int, causal: bool) -> torch.Tensor:
    """Levels after the causal rule: int8 [B,Hq,nqb,nkb] (see the module docstring)."""
    if not causal:
        return levels.to(torch.int8)
    future, partial = causal_block_bounds(nq, nk, block, levels.device)
    lv = levels.to(torch.int8)
    lv = torch.where(partial, torch.ones_like(lv), lv)
    return torch.where(future, torch.zeros_like(lv), lv)


def _token_valid(key_padding: Optional[torch.Tensor], b: int, nk: int, npad: int, device: torch.device) -> torch.Tensor:
    """bool [B, npad]: real tokens (key_padding and position < Nk)."""
    valid = torch.zeros(b, npad, dtype=torch.bool, device=device)
    valid[:, :nk] = True if key_padding is None else key_padding.to(torch.bool)
    return valid


def pyramid_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    levels: torch.Tensor,
    scale: Optional[float],
    causal: bool,
    key_padding: Optional[torch.Tensor] = None,
    block: int = 64,
) -> torch.Tensor:
    """Plain-torch definition of pyramid attention (materialises all levels' scores per head).

    q [B,Hq,Nq,D], k [B,Hkv,Nk,D], v [B,Hkv,Nk,Dv], levels int [B,Hq,nqb,nkb] in {0,1,2,4,8},
    key_padding bool [B,Nk] (True = real token) → out [B,Hq,Nq,Dv] in q's dtype (computed in
    float32, or float64 for float64 inputs). Small shapes only.
    """
    check_attention_inputs(q, k, v, causal, key_padding, block, kernel=False)
    lv_all = effective_levels(check_levels(levels, q, k, block), q.shape[2], k.shape[2], block, causal)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    cd = ref_dtype(q)
    dev = q.device
    npad = cdiv(nk, block) * block
    valid = _token_valid(key_padding, b, nk, npad, dev)
    qpos = torch.arange(nk - nq, nk, device=dev)
    qblk = torch.arange(nq, device=dev) // block
    out = torch.zeros(b, hq, nq, v.shape[3], dtype=cd, device=dev)
    for bi in range(b):
        for h in range(hq):
            kk = torch.zeros(npad, k.shape[3], dtype=cd, device=dev)
            vv = torch.zeros(npad, v.shape[3], dtype=cd, device=dev)
            kk[:nk], vv[:nk] = k[bi, h // group].to(cd), v[bi, h // group].to(cd)
            rows_lv = lv_all[bi, h][qblk]  # [Nq, nkb]
            zs, vs, keeps = [], [], []
            for f in (1,) + POOLED:
                ng = npad // f
                member = valid[bi].view(ng, f)
                c = member.sum(-1)
                kf = (kk.view(ng, f, -1) * member[..., None]).sum(1) / c.clamp_min(1)[:, None].to(cd)
                vf = (vv.view(ng, f, -1) * member[..., None]).sum(1) / c.clamp_min(1)[:, None].to(cd)
                gblk = (torch.arange(ng, device=dev) * f) // block
                keep = (rows_lv[:, gblk] == f) & (c > 0)[None, :]
                if f == 1 and causal:
                    keep = keep & (torch.arange(ng, device=dev)[None, :] <= qpos[:, None])
                z = (q[bi, h].to(cd) @ kf.T) * scale + torch.log(c.clamp_min(1).to(cd))[None, :]
                zs.append(z)
                vs.append(vf)
                keeps.append(keep)
            p = masked_softmax_ref(torch.cat(zs, -1), torch.cat(keeps, -1))
            out[bi, h] = p @ torch.cat(vs, 0)
    return out.to(q.dtype)


def build_pyramid(
    k: torch.Tensor, v: torch.Tensor, key_padding: Optional[torch.Tensor], block: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Pooled K/V per level f in (2, 4, 8).

    k [B,Hkv,Nk,D], v [B,Hkv,Nk,Dv] → {f: (k_f [B,Hkv,Np/f,D], v_f [B,Hkv,Np/f,Dv],
    bias_f float32 [B,Np/f])} with Np = ceil(Nk/block)*block; k_f/v_f are the means over the
    real tokens of each group (in k's dtype, accumulated in float32) and bias_f = log2(count),
    -inf for empty groups. Built hierarchically (level 2f sums pairs of level-f sums).
    """
    b, hkv, nk, _ = k.shape
    npad = cdiv(nk, block) * block
    valid = _token_valid(key_padding, b, nk, npad, k.device)
    cnt = valid.to(torch.float32)
    w = cnt[:, None, :, None]
    ks = torch.zeros(b, hkv, npad, k.shape[3], dtype=torch.float32, device=k.device)
    vs = torch.zeros(b, hkv, npad, v.shape[3], dtype=torch.float32, device=k.device)
    ks[:, :, :nk] = k.to(torch.float32)
    vs[:, :, :nk] = v.to(torch.float32)
    # Zero padded tokens with where (not a product) so non-finite padding cannot leak in.
    ks = torch.where(w > 0, ks, torch.zeros((), device=k.device))
    vs = torch.where(w > 0, vs, torch.zeros((), device=k.device))
    pyr: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for f in POOLED:
        ks = ks.view(b, hkv, -1, 2, ks.shape[-1]).sum(3)
        vs = vs.view(b, hkv, -1, 2, vs.shape[-1]).sum(3)
        cnt = cnt.view(b, -1, 2).sum(2)
        denom = cnt.clamp_min(1.0)[:, None, :, None]
        bias = torch.where(cnt > 0, torch.log2(cnt.clamp_min(1.0)), torch.full_like(cnt, float("-inf")))
        pyr[f] = ((ks / denom).to(k.dtype).contiguous(), (vs / denom).to(v.dtype).contiguous(), bias.contiguous())
    return pyr


if HAS_TRITON:

    @triton.jit
    def _pyramid_fwd_kernel(
        Q, K, V, O, IDX, LVL, CNT, BIAS1,
        K2, V2, B2, K4, V4, B4, K8, V8, B8,
        sqb, sqh, sqn, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        sob, soh, son, sod,
        sib, sih, siq, sik,
        scb, sch, scq,
        sb1,
        HQ, HKV, GROUP, NQB, NQ, NK, NPAD, D, DV, Q_OFF,
        qk_scale,
        CAUSAL: tl.constexpr, HAS_KPAD: tl.constexpr,
        BLOCK: tl.constexpr, T2: tl.constexpr, T4: tl.constexpr, T8: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m = NQB - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // HQ).to(tl.int64)
        h = (pid_bh % HQ).to(tl.int64)
        hk = h // GROUP
        offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
            mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D),
            other=0.0,
        )
        qpos = offs_m + Q_OFF
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_DV], tl.float32)
        bh_kv = b * HKV + hk
        # Pooled tensors are contiguous [B, Hkv, NPAD/f, D|DV]; biases contiguous [B, NPAD/f].
        L2 = NPAD // 2
        L4 = NPAD // 4
        L8 = NPAD // 8
        k1 = K + b * skb + hk * skh
        v1 = V + b * svb + hk * svh
        b1 = BIAS1 + b * sb1
        k2 = K2 + bh_kv * L2 * D
        v2 = V2 + bh_kv * L2 * DV
        b2 = B2 + b * L2
        k4 = K4 + bh_kv * L4 * D
        v4 = V4 + bh_kv * L4 * DV
        b4 = B4 + b * L4
        k8 = K8 + bh_kv * L8 * D
        v8 = V8 + bh_kv * L8 * DV
        b8 = B8 + b * L8
        row = b * sib + h * sih + pid_m * siq
        cnt = tl.load(CNT + b * scb + h * sch + pid_m * scq)
        for t in range(0, cnt):
            kb = tl.load(IDX + row + t * sik)
            f = tl.load(LVL + row + t * sik)
            if f == 1:
                start = kb * BLOCK
                acc, m_i, l_i = _attend_tile(
                    acc, m_i, l_i, q, qpos, k1, v1, b1, start, tl.minimum(start + BLOCK, NK),
                    skn, skd, svn, svd, D, DV, qk_scale,
                    BLOCK, BLOCK_D, BLOCK_DV, HAS_KPAD, CAUSAL, PREC, UPCAST,
                )
            elif f == 2:
                start = kb * (BLOCK // 2)
                acc, m_i, l_i = _attend_tile(
                    acc, m_i, l_i, q, qpos, k2, v2, b2, start, start + BLOCK // 2,
                    D, 1, DV, 1, D, DV, qk_scale,
                    T2, BLOCK_D, BLOCK_DV, True, False, PREC, UPCAST,
                )
            elif f == 4:
                start = kb * (BLOCK // 4)
                acc, m_i, l_i = _attend_tile(
                    acc, m_i, l_i, q, qpos, k4, v4, b4, start, start + BLOCK // 4,
                    D, 1, DV, 1, D, DV, qk_scale,
                    T4, BLOCK_D, BLOCK_DV, True, False, PREC, UPCAST,
                )
            else:
                start = kb * (BLOCK // 8)
                acc, m_i, l_i = _attend_tile(
                    acc, m_i, l_i, q, qpos, k8, v8, b8, start, start + BLOCK // 8,
                    D, 1, DV, 1, D, DV, qk_scale,
                    T8, BLOCK_D, BLOCK_DV, True, False, PREC, UPCAST,
                )
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        offs_dv = tl.arange(0, BLOCK_DV)
        tl.store(
            O + b * sob + h * soh + offs_m[:, None] * son + offs_dv[None, :] * sod,
            out.to(O.dtype.element_ty),
            mask=(offs_m[:, None] < NQ) & (offs_dv[None, :] < DV),
        )


def pyramid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    levels: torch.Tensor,
    scale: Optional[float],
    causal: bool,
    key_padding: Optional[torch.Tensor] = None,
    block: int = 64,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pyramid attention with the Triton kernel (same semantics as the reference).

    q [B,Hq,Nq,D], k [B,Hkv,Nk,D], v [B,Hkv,Nk,Dv] (float16/bfloat16/float32; CUDA, or CPU under
    ``TRITON_INTERPRET=1``); levels int8 [B|1,Hq|1,ceil(Nq/block),ceil(Nk/block)] in
    {0,1,2,4,8}; scale (None → D**-0.5); key_padding bool [B,Nk] (True = real token); ``out``
    optional preallocated [B,Hq,Nq,Dv]. Returns out [B,Hq,Nq,Dv] in q's dtype.
    """
    check_attention_inputs(q, k, v, causal, key_padding, block, kernel=True)
    lv = effective_levels(check_levels(levels, q, k, block), q.shape[2], k.shape[2], block, causal)
    require_runnable(q)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    if out is None:
        out = torch.empty(b, hq, nq, dv, dtype=q.dtype, device=q.device)
    elif out.shape != (b, hq, nq, dv) or out.dtype != q.dtype or out.device != q.device:
        raise BadInput(f"out has shape {tuple(out.shape)} / {out.dtype}, expected {(b, hq, nq, dv)} / {q.dtype}",
                       "pass a matching tensor or out=None")
    if nq == 0 or b * hq == 0:
        return out
    idx, cnt = block_mask_to_indices(lv > 0)
    lvl = torch.gather(lv, -1, idx.clamp_min(0).long()).to(torch.int8).contiguous()
    pyr = build_pyramid(k, v, key_padding, block)
    bias1 = padding_bias(key_padding, q.device)
    nqb = cdiv(nq, block)
    block_d = max(16, triton.next_power_of_2(d))
    block_dv = max(16, triton.next_power_of_2(dv))
    grid = (nqb, b * hq)
    args = (
        q, k, v, out, idx, lvl, cnt, bias1,
        *pyr[2], *pyr[4], *pyr[8],
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *idx.stride(), *cnt.stride(),
        bias1.stride(0),
        hq, hkv, hq // hkv, nqb, nq, nk, cdiv(nk, block) * block, d, dv, nk - nq,
        float(scale) * LOG2E,
    )
    consts = dict(
        CAUSAL=bool(causal), HAS_KPAD=key_padding is not None,
        BLOCK=block, T2=max(block // 2, 16), T4=max(block // 4, 16), T8=max(block // 8, 16),
        BLOCK_D=block_d, BLOCK_DV=block_dv, **dot_options(q.dtype),
    )
    launch(_pyramid_fwd_kernel, grid, args, consts, block, max(block_d, block_dv), q.dtype)
    return out
