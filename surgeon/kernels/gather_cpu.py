"""Gather attention on the CPU for token-, chunk-, region- and level-sparse variants.

Shared by ``token_topk``, ``dhsa`` (its ``gather`` path), ``pyramid``, ``routing`` and ``knn``
(:func:`attend_lse` / :func:`merge_lse`). Nothing here materialises an Nq×Nk score matrix for
all heads: queries are processed in groups of consecutive rows, and each group attends only
to the keys listed for it in an index tensor. The softmax runs on PyTorch's CPU flash kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu``, which also returns the log-sum-exp
used to merge a group's gathered keys with its causal block); a row-broadcast additive mask
carries padding, empty slots and pooled-key biases at no extra cost. Without that kernel
(other devices, or ``fused=False``) the same math runs in plain torch.

Conventions (see :mod:`surgeon.attention.base`): q [B,Hq,Nq,D]; the key *bank* is
[B,Hkv,M,D] (M = Nk for plain keys; larger when pooled keys are appended, as in ``pyramid``);
query head h reads bank head ``h // (Hq // Hkv)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from surgeon.errors import BadInput

NEG_INF = float("-inf")

# Upper bound on the gathered K elements one chunk of the gather kernel holds (32 MiB fp32).
_CHUNK_GATHER_ELEMS = 1 << 23


def _flash_cpu_op():
    """``aten::_scaled_dot_product_flash_attention_for_cpu`` (returns the log-sum-exp), or None."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
               row_ok: torch.Tensor, *, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with an additive mask, returning the output and the log-sum-exp.

    q [R,H,L,D], k [R,H,S,D], v [R,H,S,Dv], mask float broadcastable to [R,H,L,S] (0 / −inf /
    a bias; row- or head-broadcast masks cost nothing extra on the CPU flash kernel);
    row_ok bool broadcastable to [R,H,L]: rows with at least one finite mask entry.
    → out [R,H,L,Dv] (0 on empty rows), lse [R,H,L] (−inf on empty rows). Uses the CPU flash
    kernel when available and ``fused``; otherwise plain torch.
    """
    op = _flash_cpu_op() if fused and q.device.type == "cpu" else None
    if op is not None:
        # the kernel returns out = 0 and lse = 0 on rows whose mask is all −inf
        out, lse = op(q, k, v, 0.0, False, attn_mask=mask.to(q.dtype), scale=scale)
    else:
        sc = torch.matmul(q, k.transpose(-1, -2)) * scale + mask
        lse = torch.logsumexp(sc, dim=-1)
        lse_f = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        out = torch.matmul(torch.exp(sc - lse_f[..., None]), v)  # exactly 0 on empty rows
    if not bool(row_ok.all()):
        lse = torch.where(row_ok, lse, torch.full((), NEG_INF, dtype=lse.dtype, device=lse.device))
        out = torch.where(row_ok[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out, lse


def _plan_runs(used: list[int], elems_per_slot: int, elems_fixed: int) -> list[tuple[int, int, int]]:
    """Split groups into runs [(start, stop, slots)]: bounded gather memory, and a run's slot
    count (its fullest list) wastes at most ~1/8 of the run's work on padding."""
    runs = []
    i, n = 0, len(used)
    while i < n:
        j, sc = i + 1, used[i]
        while j < n:
            s2 = max(sc, used[j])
            if (j + 1 - i) * (s2 * elems_per_slot + elems_fixed) > _CHUNK_GATHER_ELEMS:
                break
            if s2 > sc and (s2 - sc) * (j - i) * 8 > s2 * (j + 1 - i):
                break
            j, sc = j + 1, s2
        runs.append((i, j, sc))
        i = j
    return runs


def merge_lse(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Combine two softmax attentions over disjoint key sets: o [..., L, Dv], lse [..., L]."""
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1 = torch.exp(l1 - m)
    w2 = torch.exp(l2 - m)
    den = w1 + w2
    den = torch.where(den > 0, den, torch.ones_like(den))
    return torch.addcmul(o1 * (w1 / den)[..., None], o2, (w2 / den)[..., None])


def gathered_attention(
    q: torch.Tensor,
    bank_k: torch.Tensor,
    bank_v: torch.Tensor,
    idx: torch.Tensor,
    *,
    group: int,
    scale: float,
    unit: int = 1,
    key_bias: Optional[torch.Tensor] = None,
    diag_start: Optional[torch.Tensor] = None,
    diag_len: int = 0,
    q_offset: int = 0,
    fused: bool = True,
) -> torch.Tensor:
    """Attention of each group of ``group`` consecutive query rows over its own key list.

    q [B,Hq,Nq,D]; bank_k [B,Hkv,M,D]; bank_v [B,Hkv,M,Dv]; the first Nk bank entries are the
    plain keys (bank index = position), pooled keys may follow.
    idx long [B, Hs, ceil(Nq/group), S] with Hs ∈ {1, Hq}: the *units* of ``unit`` consecutive
    bank entries (unit u = entries [u·unit, (u+1)·unit); M must be a multiple of ``unit``) each
    group attends to, with no causal check (every listed key must precede every row of the
    group). Hs = 1 means shared by all heads, so each KV head's gather serves its whole
    query-head group. Entries < 0 are empty slots. Gathering whole blocks (unit > 1) moves
    contiguous memory and is much faster than gathering single keys.
    Causal part (``diag_start`` [ng] long, ``diag_len`` > 0): group a also attends to the plain
    keys at positions ``diag_start[a] + t``, t < diag_len, under the token-level causal mask
    (query row i sits at position ``q_offset + i``; positions ≥ Nk are dropped). The two key
    sets must be disjoint; their softmaxes are merged through their log-sum-exps.
    key_bias [B, M] float: added to every logit of that bank key (0 for a plain key, −inf for a
    padded or empty one, ``ln c`` for a pooled key standing for c tokens); None = 0.
    Logits are ``q·k * scale + key_bias``; rows with no kept key give 0. ``fused=False`` forces
    the plain-torch softmax (the CPU flash kernel is used otherwise). Returns [B,Hq,Nq,Dv].
    """
    b, hq, nq, d = q.shape
    hkv, m, dv = bank_k.shape[1], bank_k.shape[2], bank_v.shape[3]
    g = hq // hkv
    ng = (nq + group - 1) // group
    hs, s = idx.shape[1], idx.shape[3]
    dev = q.device
    has_diag = diag_start is not None and diag_len > 0
    if nq == 0 or b == 0 or (s == 0 and not has_diag):
        return q.new_zeros(b, hq, nq, dv)
    if m % unit:
        raise BadInput(f"gathered_attention: bank size {m} is not a multiple of unit {unit}",
                       "pad the key bank to a multiple of the gather unit")
    shared = hs == 1
    hh = hkv if shared else hq
    rows = g * group if shared else group
    mu = m // unit

    # queries laid out [B, ng, hh, rows, D] (a group's heads side by side for the kernel)
    qpad = ng * group - nq
    qs = q
    if qpad:
        qs = torch.cat([qs, qs.new_zeros(b, hq, qpad, d)], dim=2)
    if shared:
        qs = qs.view(b, hkv, g, ng, group, d).permute(0, 3, 1, 2, 4, 5).reshape(b, ng, hkv, rows, d)
    else:
        qs = qs.view(b, hq, ng, group, d).transpose(1, 2)
    idx_t = idx.transpose(1, 2)  # [B, ng, Hs, S]
    head_kv = torch.arange(hh, device=dev) if shared else torch.arange(hq, device=dev) // g
    bh = (torch.arange(b, device=dev)[:, None] * hkv + head_kv[None, :])[:, None, :, None]  # [B,1,hh,1]
    bidx = torch.arange(b, device=dev)[:, None, None, None]
    bias_t = None if key_bias is None else key_bias.to(q.dtype)
    row_pos = torch.arange(rows, device=dev) % group
    dl = diag_len if has_diag else 0
    if has_diag:
        # real plain keys before each position, for the diag rows' emptiness test
        kreal = (torch.ones(b, m, dtype=torch.bool, device=dev) if bias_t is None else bias_t > NEG_INF)
        cum = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), kreal.long().cumsum(dim=1)], dim=1)
        dunit = unit if (dl % unit == 0 and bool((diag_start % unit == 0).all())) else 1
        kd_flat = bank_k.reshape(b * hkv * (m // dunit), dunit * d)
        vd_flat = bank_v.reshape(b * hkv * (m // dunit), dunit * dv)

    ku_flat = bank_k.reshape(b * hkv * mu, unit * d)
    vu_flat = bank_v.reshape(b * hkv * mu, unit * dv)
    out = q.new_empty(b, ng, hh, rows, dv)
    # used slots first, so a run of groups only gathers as many slots as its fullest list
    idx_t = torch.sort(idx_t, dim=-1, descending=True).values
    used = (idx_t >= 0).sum(dim=-1).amax(dim=(0, 2)).tolist() if s else [0] * ng  # [ng]
    for c0, c1, sc in _plan_runs(used, b * hh * max(d, dv) * unit, b * hh * max(d, dv) * dl):
        cg = c1 - c0
        r = b * cg
        qc = qs[:, c0:c1].reshape(r, hh, rows, d)
        o = l1 = None
        st = sc * unit
        if sc:
            ic = idx_t[:, c0:c1, :, :sc]  # [B, cg, Hs, sc]
            valid = ic >= 0
            icc = ic.clamp_min(0)
            flat = (bh * mu + icc).reshape(-1)  # [B, cg, hh, S]
            kg = ku_flat.index_select(0, flat).view(r, hh, st, d)
            vg = vu_flat.index_select(0, flat).view(r, hh, st, dv)
            cm = torch.zeros(valid.shape, dtype=q.dtype, device=dev).masked_fill_(~valid, NEG_INF)
            if unit > 1:
                cm = cm[..., None].expand(*cm.shape, unit)
            if bias_t is not None:
                bu = bias_t.view(b, mu, unit)[bidx, icc]  # [B, cg, Hs, S, unit]
                cm = cm + (bu if unit > 1 else bu[..., 0])
            cm = cm.reshape(r, valid.shape[2], 1, st)  # broadcast over rows (and over heads when shared)
            o, l1 = attend_lse(qc, kg, vg, cm, scale, (cm > NEG_INF).any(dim=-1), fused=fused)
        if has_diag:
            pos = diag_start[c0:c1, None] + torch.arange(dl, device=dev)[None, :]  # [cg, dl]
            nu = dl // dunit
            du = (diag_start[c0:c1, None] // dunit + torch.arange(nu, device=dev)[None, :]).clamp(0, m // dunit - 1)
            flat = (bh * (m // dunit) + du[None, :, None, :]).reshape(-1)  # [B, cg, hh, nu]
            kd = kd_flat.index_select(0, flat).view(r, hh, dl, d)
            vd = vd_flat.index_select(0, flat).view(r, hh, dl, dv)
            qp = q_offset + (torch.arange(c0, c1, device=dev) * group)[:, None] + row_pos[None, :]  # [cg, rows]
            bad = pos[:, None, :] > qp[:, :, None]  # [cg, rows, dl]
            dm = torch.zeros(bad.shape, dtype=q.dtype, device=dev).masked_fill_(bad, NEG_INF)
            if bias_t is not None:
                pb = bias_t[:, pos.clamp(0, m - 1)]  # [B, cg, dl]
                dm = (dm[None] + pb[:, :, None, :]).reshape(r, 1, rows, dl)
            else:
                dm = dm[None].expand(b, cg, rows, dl).reshape(r, 1, rows, dl)
            lo = diag_start[c0:c1, None].clamp(0, m)
            hi = torch.minimum(qp + 1, diag_start[c0:c1, None] + dl).clamp(0, m)
            ok = (cum[:, torch.maximum(hi, lo)] > cum[:, lo.expand_as(hi)]).reshape(r, 1, rows)
            o2, l2 = attend_lse(qc, kd, vd, dm, scale, ok, fused=fused)
            o = o2 if o is None else merge_lse(o, l1, o2, l2)
        if o is None:  # no listed key in this run and no causal part
            out[:, c0:c1] = 0
        else:
            out[:, c0:c1] = o.view(b, cg, hh, rows, dv)
    if shared:
        out = out.view(b, ng, hkv, g, group, dv).permute(0, 2, 3, 1, 4, 5).reshape(b, hq, ng * group, dv)
    else:
        out = out.transpose(1, 2).reshape(b, hq, ng * group, dv)
    return out[:, :, :nq]


def real_keys(key_padding: Optional[torch.Tensor], b: int, nk: int, device: torch.device) -> torch.Tensor:
    """Bool [B, Nk]: True for real (non-padding) keys."""
    if key_padding is None:
        return torch.ones(b, nk, dtype=torch.bool, device=device)
    return key_padding.to(device=device, dtype=torch.bool).expand(b, nk)


def padding_bias(key_padding: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """[B, Nk] additive bias (0 real, −inf padding), or None when there is no padding."""
    if key_padding is None or bool(key_padding.all()):
        return None
    kp = key_padding.to(torch.bool)
    return torch.zeros(kp.shape, dtype=dtype, device=kp.device).masked_fill_(~kp, NEG_INF)


def dense_pair_count(nq: int, nk: int, causal: bool, key_padding: Optional[torch.Tensor],
                     device: torch.device) -> torch.Tensor:
    """Pairs dense attention uses per query row: [B|1, Nq] float64 (O(B·N), no N×N mask)."""
    kv = (torch.ones(1, nk, dtype=torch.float64, device=device) if key_padding is None
          else key_padding.to(device=device, dtype=torch.float64))
    if not causal:
        return kv.sum(dim=1, keepdim=True).expand(kv.shape[0], nq)
    cum = kv.cumsum(dim=1)
    pos = torch.arange(nk - nq, nk, device=device)
    return cum[:, pos]


def gathered_pair_count(idx: torch.Tensor, group: int, nq: int, nk: int, key_ok: torch.Tensor, *,
                        weight: Optional[torch.Tensor] = None, diag_start: Optional[torch.Tensor] = None,
                        diag_len: int = 0, q_offset: int = 0) -> torch.Tensor:
    """Kept (query, key) pairs of a :func:`gathered_attention` selection: [B] float64, summed
    over the Hs index heads (multiply by Hq/Hs for all query heads).

    idx [B,Hs,ng,S]; key_ok [B, M] bool (real bank keys; its first Nk entries are the plain
    keys); ``weight`` [B, M] optional per-bank-key weight (e.g. tokens per pooled key / its
    cost); diag_start/diag_len/q_offset as in :func:`gathered_attention`.
    """
    b, hs, ng, s = idx.shape
    dev = idx.device
    rows = torch.clamp(nq - torch.arange(ng, device=dev) * group, max=group).to(torch.float64)  # [ng]
    bidx = torch.arange(b, device=dev)[:, None, None, None]
    icc = idx.clamp_min(0)
    w = ((idx >= 0) & key_ok[bidx, icc]).to(torch.float64)
    if weight is not None:
        w = w * weight.to(torch.float64)[bidx, icc]
    total = (w.sum(dim=-1) * rows).sum(dim=(1, 2))
    if diag_start is not None and diag_len > 0:
        real = key_ok[:, :nk].to(torch.float64)
        cum = torch.cat([real.new_zeros(b, 1), real.cumsum(dim=1)], dim=1)  # real keys before j
        t = torch.arange(group, device=dev)
        qp = q_offset + torch.arange(ng, device=dev)[:, None] * group + t[None, :]  # [ng, group]
        live = (torch.arange(ng, device=dev)[:, None] * group + t[None, :]) < nq
        lo = diag_start[:, None].expand(ng, group).clamp(0, nk)
        hi = torch.minimum(qp + 1, (diag_start + diag_len)[:, None]).clamp(0, nk)
        hi = torch.maximum(hi, lo)
        per = (cum[:, hi] - cum[:, lo]) * live[None].to(torch.float64)  # [B, ng, group]
        total = total + per.sum(dim=(1, 2)) * hs
    return total
