"""The profiler's instrumented graph: per-site accumulators, the :class:`Collector` that runs at
every attention site (statistics, block selections, HeSS gradients, sensitivity modes) and
:func:`instrument`, which routes a captured program's SDPA nodes through it.

The statistics are described in :mod:`surgeon.profiles.collect`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from surgeon.attention.base import AttnContext, unrepeat_kv, VariantParams
from surgeon.attention.registry import get_variant
from surgeon.capture import Captured, _sdpa_args, sdpa_nodes, Site
from surgeon.errors import BadInput
from surgeon.kernels.geometry import block_geometry, keep_counts, select_top, sink_local_blocks
from surgeon.profiles.profile_settings import COVERAGES, HESS_TERMS, ProfileSettings, ProgressFn


_LINEAR_TARGETS = (torch.ops.aten.linear.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.default,
                   torch.ops.aten.matmul.default)


class _SiteAcc:
    """Running sums of one site (float64, CPU)."""

    def __init__(self, site: Site, heads: int, groups: int, grid: int) -> None:
        self.site = site
        self.heads, self.groups = heads, groups
        z = lambda *s: np.zeros(s, dtype=np.float64)  # noqa: E731
        self.f90: list[np.ndarray] = []  # [T, H] per chunk
        self.f95: list[np.ndarray] = []
        self.g90: list[np.ndarray] = []  # [T, G]
        self.cov_sum = z(heads, grid)
        self.cov_n = 0
        self.ent_sum = z(heads)
        self.ent_norm_sum = z(heads)
        self.ent_norm_rows = 0
        self.entmax_sum = 0.0
        self.rows = 0
        self.local_sum = z(heads)
        self.sink0_sum = z(heads)
        self.sink0_rows = 0
        self.sink_score_sum = 0.0
        self.sink_samples = 0
        self.secondary = 0
        self.d2 = z(heads)
        self.o2 = z(heads)
        self.hess_sq = {t: z(heads) for t in HESS_TERMS}
        self.hess_n = 0
        self.masks: list[np.ndarray] = []  # this sample's [T, G, nkb] top-k masks
        self.colsum: Optional[torch.Tensor] = None  # this sample's Σ_{h, i≠j} A[i, j]
        self.sens: list[float] = []
        self.sens_l2: list[float] = []

    _SUMS = ("cov_sum", "cov_n", "ent_sum", "ent_norm_sum", "ent_norm_rows", "entmax_sum", "rows", "local_sum",
             "sink0_sum", "sink0_rows", "sink_score_sum", "sink_samples", "secondary", "d2", "o2", "hess_n")
    _LISTS = ("f90", "f95", "g90", "sens", "sens_l2")

    def merge(self, o: "_SiteAcc") -> None:
        """Add the contributions of ``o`` (one unit of work) to these totals."""
        for name in self._SUMS:
            setattr(self, name, getattr(self, name) + getattr(o, name))
        for t in HESS_TERMS:
            self.hess_sq[t] = self.hess_sq[t] + o.hess_sq[t]
        for name in self._LISTS:
            getattr(self, name).extend(getattr(o, name))

    def __getstate__(self) -> dict[str, Any]:  # what travels between ranks: no tensors, no site
        d = dict(self.__dict__)
        d["site"], d["colsum"], d["masks"] = None, None, []
        return d


@dataclass
class _Mode:
    stats: bool = False
    delta: bool = False
    keep_delta: bool = False
    grad: bool = False
    stop_after: Optional[int] = None
    policy: dict[int, tuple[Any, VariantParams, Optional[int]]] = field(default_factory=dict)


# finite "masked" logit: exp(_MASKED − max) is exactly 0 and 0 · _MASKED is 0 (−inf would give NaN)
_MASKED = -1e30


@dataclass
class _Unit:
    """What one (pass, sample) contributed: pass 0 statistics, 1 gradients, 2 sensitivity."""
    key: tuple[int, int]
    acc: list[_SiteAcc]
    overlap_masks: list[np.ndarray]
    overlap_ok: bool
    secondary: list[dict[str, Any]]
    sink_primary: list[list[float]]


class _Totals:
    """The merged units (the fields :func:`_build` reads, named as on :class:`Collector`)."""

    def __init__(self, cap: Captured, st: "ProfileSettings") -> None:
        self.acc = []
        for s in cap.sites:
            g = s.kv_heads if s.kv_heads > 0 and s.heads % s.kv_heads == 0 else s.heads
            self.acc.append(_SiteAcc(s, s.heads, g, len(st.keep_grid)))
        self.overlap_masks: list[np.ndarray] = []
        self.overlap_ok = True
        self.secondary: list[dict[str, Any]] = []
        self.sink_primary: list[list[float]] = [[] for _ in cap.sites]
        self.keys: list[tuple[int, int]] = []

    def merge(self, u: _Unit) -> None:
        if self.keys and tuple(u.key) <= self.keys[-1]:
            raise RuntimeError(f"profile units merged out of order: {u.key} after {self.keys[-1]}")
        self.keys.append(tuple(u.key))
        for a, b in zip(self.acc, u.acc):
            a.merge(b)
        self.overlap_masks.extend(u.overlap_masks)
        self.overlap_ok = self.overlap_ok and u.overlap_ok
        self.secondary.extend(u.secondary)
        for a, b in zip(self.sink_primary, u.sink_primary):
            a.extend(b)


class _StopForward(Exception):
    """Raised after the last site in statistics-only passes (the rest of the model is unused)."""


class Collector:
    """Receives every instrumented SDPA call (see the module docstring)."""

    def __init__(self, cap: Captured, st: ProfileSettings) -> None:
        self.cap = cap
        self.sites = cap.sites
        self.st = st
        self.mode = _Mode()
        self.deltas: dict[int, torch.Tensor] = {}
        self.zs: dict[int, torch.Tensor] = {}
        self.produced: dict[int, torch.Tensor] = {}
        self.sample_sinks: dict[int, list[tuple[int, float, float]]] = {}
        self._buf: dict[str, torch.Tensor] = {}
        self.on_site_stats: Optional[Callable[[], None]] = None  # progress: called after each site's statistics
        self.new_unit()

    # -- units of work ------------------------------------------------------------------
    # Every (pass, sample) accumulates into fresh sums (a "unit"); the totals are the units merged
    # in (pass, sample) order. A single process merges each unit as it finishes; distributed
    # ranks compute disjoint units and rank 0 merges all of them in the same order — so the
    # profile does not depend on how the samples were split (see surgeon.profiles.distributed).
    def new_unit(self) -> None:
        self.acc: list[_SiteAcc] = []
        for s in self.sites:
            g = s.kv_heads if s.kv_heads > 0 and s.heads % s.kv_heads == 0 else s.heads
            self.acc.append(_SiteAcc(s, s.heads, g, len(self.st.keep_grid)))
        self.overlap_masks: list[np.ndarray] = []  # per sample [T, L, G, nkb]
        self.overlap_ok = True
        self.secondary: list[dict[str, Any]] = []
        self.sink_primary: list[list[float]] = [[] for _ in self.sites]

    def take_unit(self, key: tuple[int, int]) -> "_Unit":
        u = _Unit(key, self.acc, self.overlap_masks, self.overlap_ok, self.secondary, self.sink_primary)
        self.new_unit()
        return u

    def _scratch(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reusable buffer of ``shape`` (grown on demand): big chunk tensors are not re-allocated
        (and page-faulted) for every chunk of every site."""
        n = math.prod(shape)
        buf = self._buf.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._buf[name] = buf
        return buf[:n].view(shape)

    # -- the instrumented call ---------------------------------------------------------
    def call(self, idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
             scale: Optional[float] = None, enable_gqa: bool = False, hidden: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        site = self.sites[idx]
        sc = float(scale) if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        m = self.mode
        if idx in m.policy:
            out = self._run_variant(idx, query, key, value, attn_mask, sc)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0,
                                                 is_causal=bool(is_causal), scale=scale, enable_gqa=enable_gqa)
        if m.stats or m.delta:
            with torch.no_grad():
                self._site_stats(idx, site, query.detach(), key.detach(), value.detach(), attn_mask,
                                 bool(is_causal), sc, None if hidden is None else hidden.detach())
            if m.stats and self.on_site_stats is not None:
                self.on_site_stats()
        if m.grad:
            z = torch.zeros_like(out, requires_grad=True)
            self.zs[idx] = z
            out = out + z
        if m.stop_after is not None and idx == m.stop_after:
            raise _StopForward()
        return out

    def _ctx(self, site: Site, g: int, attn_mask: Optional[torch.Tensor], scale: float) -> AttnContext:
        explicit = attn_mask if site.mask_kind == "explicit" else None
        return AttnContext(causal=site.causal, scale=scale, kv_heads=g, key_padding=None, attn_mask=explicit,
                           layer=site.layer, site=site.name)

    def _run_variant(self, idx: int, q, k, v, attn_mask, scale: float) -> torch.Tensor:
        var, params, anchor = self.mode.policy[idx]
        site = self.sites[idx]
        g = self.acc[idx].groups
        ku, vu = unrepeat_kv(k, q.shape[1], g), unrepeat_kv(v, q.shape[1], g)
        bm = self.produced.get(anchor) if anchor is not None else None
        if var.consumes_block_mask and bm is None:
            raise BadInput(f"site {site.name} reuses a block mask that no earlier site produced",
                           "give its anchor a block_topk variant")
        out = var.run(q, ku, vu, self._ctx(site, g, attn_mask, scale), params, bm)
        if var.produces_block_mask:
            out, mask = out
            self.produced[idx] = mask
        return out

    # -- statistics of one site ---------------------------------------------------------
    def _site_stats(self, idx: int, site: Site, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_mask: Optional[torch.Tensor], is_causal: bool, scale: float,
                    hidden: Optional[torch.Tensor]) -> None:
        """q [1,Hq,Nq,D], k/v [1,Hq|Hkv,Nk,D] (repeated K/V are un-repeated here).

        Sites whose mask is causal/padding/none are masked geometrically (calibration rows have
        no padding), and for causal sites each query chunk only computes the keys up to the end
        of its last query block (the causal upper triangle is skipped: half the work). Sites
        with an explicit mask apply the graph's mask as SDPA would.
        """
        st, acc, m = self.st, self.acc[idx], self.mode
        b, hq, nq, _ = q.shape
        if b != 1:
            raise BadInput("the profiler processes one sample at a time", "call it with batch 1")
        g = acc.groups
        gs = hq // g
        ku, vu = unrepeat_kv(k, hq, g), unrepeat_kv(v, hq, g)
        nk = ku.shape[2]
        dv = vu.shape[-1]
        dev = q.device
        bs = st.block_size
        geo = block_geometry(nq, nk, bs, bs, site.causal, dev)
        nkb = geo.nkb
        nkp = nkb * bs
        n_allowed = geo.allowed.sum(dim=-1)  # [nqb]
        forced = sink_local_blocks(geo, st.sink_blocks, st.local_blocks) | geo.partial
        step = n_allowed > forced.sum(dim=-1)
        if not bool(step.any()):
            step = torch.ones_like(step)
        grid = torch.tensor(st.keep_grid, dtype=torch.float64, device=dev)
        kgrid = keep_counts(grid, n_allowed)  # [K, nqb]
        kref = keep_counts(torch.tensor([st.ref_keep], dtype=torch.float64, device=dev), n_allowed)[0]  # [nqb]
        geometric = site.mask_kind in ("none", "causal", "padding", "causal+padding")
        causal = site.causal if geometric else bool(is_causal)
        sel = None
        delta = None
        if m.delta:
            bt = get_variant("block_topk")
            p = bt.params_from({"keep": st.ref_keep, "block_size": bs, "sink_blocks": st.sink_blocks,
                                "local_blocks": st.local_blocks})
            sel = bt.select(q, ku, self._ctx(site, g, attn_mask, scale), p)  # [1,Hq,nqb,nkb]
            if m.keep_delta:
                delta = q.new_empty(b, hq, nq, dv)
        vpad = F.pad(vu, (0, 0, 0, nkp - nk)) if nkp != nk else vu  # [1,G,nkp,Dv]
        off = nk - nq
        rows = max(bs, (st.chunk_elems // max(1, hq * nk)) // bs * bs)
        colsum = torch.zeros(nkp, dtype=torch.float64, device=dev) if m.stats else None
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            c = r1 - r0
            d0 = off + r0  # position of the chunk's first query
            ke = min(nkp, -(-(off + r1) // bs) * bs) if (geometric and causal) else nkp  # keys computed
            kv_e = min(ke, nk)
            qg = q[:, :, r0:r1].reshape(b, g, gs * c, -1)
            zb = self._scratch("z", (b, g, gs * c, ke), q)
            torch.matmul(qg, ku[:, :, :kv_e].transpose(-1, -2), out=zb[..., :kv_e])
            z = zb.view(b, hq, c, ke)
            z[..., :kv_e].mul_(scale)
            if ke > kv_e:
                z[..., kv_e:] = _MASKED
            allow = None
            if geometric:
                if causal and d0 + 1 < ke:
                    w = ke - d0 - 1
                    tri = torch.ones(c, w, dtype=torch.bool, device=dev).triu_(0)  # key d0+1+t > query d0+i ⇔ t ≥ i
                    z[..., d0 + 1:].masked_fill_(tri, _MASKED)
            else:
                if isinstance(attn_mask, torch.Tensor):
                    mk = attn_mask if attn_mask.shape[-2] == 1 else attn_mask[..., r0:r1, :]
                    mk = mk[..., :kv_e]
                    if mk.dtype == torch.bool:
                        allow = mk
                    else:
                        z[..., :kv_e] += mk
                        allow = mk > -1e30
                if causal:
                    cm = torch.arange(kv_e, device=dev)[None, :] <= (d0 + torch.arange(c, device=dev))[:, None]
                    allow = cm if allow is None else allow & cm
                if allow is not None:
                    if ke > kv_e:
                        allow = F.pad(allow.expand(*allow.shape[:-2], c, kv_e), (0, ke - kv_e), value=False)
                    z.masked_fill_(~allow, _MASKED)
                z.clamp_(min=_MASKED)  # -inf from a float mask → the finite sentinel
            # masked logits hold the finite sentinel _MASKED, so exp gives exactly 0 and e·y stays 0
            # (no NaN); a row with nothing allowed (none in calibration rows) gets probability 0.
            mx = z.amax(dim=-1, keepdim=True)
            dead = mx <= _MASKED / 2
            y = z.sub_(mx)  # [1,Hq,c,ke] logits − row max (≤ 0)
            pr = torch.exp(y, out=self._scratch("p", tuple(y.shape), y))
            ssum = pr.sum(dim=-1, keepdim=True)
            ent_rows = None
            if m.stats:
                # entropy −Σ p log p = log s − Σ e·y / s (p = e / s), without a log per element
                # (y ⊙ e in place of a fresh e ⊙ y: the same products, without a chunk-sized allocation)
                ent_rows = (torch.log(ssum) - y.mul_(pr).sum(dim=-1, keepdim=True) / ssum).masked_fill_(dead, 0.0)
            del z, y
            pr = pr.div_(ssum)  # [1,Hq,c,ke] probabilities
            if bool(dead.any()):
                pr.masked_fill_(dead, 0.0)
            rb = pr.view(b, hq, c, ke // bs, bs).sum(dim=-1)  # [1,Hq,c,nkb_e] per-row block mass
            if m.stats:
                if geometric:
                    qp = d0 + torch.arange(c, device=dev)
                    nkeys = (torch.minimum(qp + 1, torch.tensor(nk, device=dev)) if causal
                             else torch.full((c,), nk, device=dev)).view(1, 1, c)
                else:
                    nkeys = allow.sum(dim=-1) if allow is not None else torch.full((1, 1, c), nk, device=dev)
                self._chunk_stats(acc, pr, rb, ent_rows[..., 0], nkeys, r0, r1, d0, geo, step, n_allowed, forced,
                                  kgrid, kref, colsum, causal)
            if m.delta:
                qb0, qb1 = r0 // bs, (r1 + bs - 1) // bs
                kb = sel[:, :, qb0:qb1, : ke // bs].repeat_interleave(bs, dim=2)[:, :, :c].to(pr.dtype)  # [1,Hq,c,nkb_e]
                ps = self._scratch("z", (b, hq, c, ke // bs, bs), pr)  # the logits buffer is free now
                torch.mul(pr.view(b, hq, c, ke // bs, bs), kb[..., None], out=ps)
                ps = ps.view(b, g, gs * c, ke)
                den = (rb * kb).sum(dim=-1, keepdim=True).clamp_min(torch.finfo(pr.dtype).tiny)
                ve = vpad[:, :, :ke]
                od = torch.matmul(pr.view(b, g, gs * c, ke), ve).view(b, hq, c, dv)
                os_ = torch.matmul(ps, ve).view(b, hq, c, dv).div_(den)
                dl = os_.sub_(od)
                acc.d2 += dl.pow(2).sum(dim=(0, 2, 3), dtype=torch.float64).cpu().numpy()
                acc.o2 += od.pow(2).sum(dim=(0, 2, 3), dtype=torch.float64).cpu().numpy()
                if delta is not None:
                    delta[:, :, r0:r1] = dl
                del ps, od, os_, dl
            del pr, rb
        if delta is not None:
            self.deltas[idx] = delta
        if m.stats:
            self._sinks(idx, acc, colsum[:nk], nq, nk, off, site.causal, hq, hidden)

    def _chunk_stats(self, acc: _SiteAcc, pr: torch.Tensor, rb: torch.Tensor, ent_rows: torch.Tensor,
                     nkeys: torch.Tensor, r0: int, r1: int, d0: int, geo: Any, step: torch.Tensor,
                     n_allowed: torch.Tensor, forced: torch.Tensor, kgrid: torch.Tensor, kref: torch.Tensor,
                     colsum: torch.Tensor, causal: bool) -> None:
        """pr [1,Hq,c,ke] probabilities of query rows r0..r1 over keys 0..ke; rb [1,Hq,c,ke/B] their
        per-block sums; ent_rows [1,Hq,c] row entropies; nkeys [1|..,1|Hq,c] keys each row may see;
        d0 the first row's position."""
        st = self.st
        b, hq, c, ke = pr.shape
        bs = st.block_size
        g = acc.groups
        dev = pr.device
        # entropy and its bound
        ent = ent_rows[0].double().clamp_min(0.0)  # [Hq, c]
        nk_rows = nkeys.expand(b, hq, c)[0].double()
        logn = torch.log(nk_rows.clamp_min(1.0))
        acc.ent_sum += ent.sum(dim=1).cpu().numpy()
        acc.entmax_sum += float(logn.mean(dim=0).sum())
        multi = nk_rows > 1
        acc.ent_norm_sum += torch.where(multi, ent / logn.clamp_min(1e-30), torch.zeros_like(ent)).sum(dim=1).cpu().numpy()
        acc.ent_norm_rows += int(multi[0].sum())
        acc.rows += c
        # local-window mass: only the keys within the window of some row of the chunk
        w = st.local_window
        lo = max(0, d0 - w + 1)
        hi = min(ke, d0 + c) if causal else min(ke, d0 + c + w - 1)
        if hi > lo:
            qp = d0 + torch.arange(c, device=dev)[:, None]
            kp = torch.arange(lo, hi, device=dev)[None, :]
            band = ((kp <= qp) & (kp > qp - w)) if causal else ((kp - qp).abs() < w)
            acc.local_sum += (pr[..., lo:hi] * band).sum(dim=-1)[0].double().sum(dim=1).cpu().numpy()
        # sinks: column sums over later (causal) / other (non-causal) queries
        colsum[:ke] += pr.sum(dim=(0, 1, 2)).double()
        diag = torch.diagonal(pr, offset=d0, dim1=-2, dim2=-1) if d0 < ke else pr.new_zeros(b, hq, 0)
        if diag.shape[-1]:
            colsum[d0: d0 + diag.shape[-1]] -= diag.sum(dim=(0, 1)).double()
        first = pr[0, :, :, 0].double()  # [Hq, c]
        if d0 <= 0 < d0 + c:
            first = torch.cat([first[:, : -d0], first[:, -d0 + 1:]], dim=1)
        acc.sink0_sum += first.sum(dim=1).cpu().numpy()
        acc.sink0_rows += first.shape[1]
        # key-block mass per query block
        qb0, qb1 = r0 // bs, (r1 + bs - 1) // bs
        cqb = qb1 - qb0
        if cqb * bs != c:
            rb = torch.cat([rb, rb.new_zeros(b, hq, cqb * bs - c, rb.shape[-1])], dim=2)
        bm = rb.view(b, hq, cqb, bs, rb.shape[-1]).sum(dim=3)[0].double()  # [Hq, cqb, nkb_e]
        if bm.shape[-1] < geo.nkb:
            bm = F.pad(bm, (0, geo.nkb - bm.shape[-1]))
        stp = step[qb0:qb1]
        if not bool(stp.any()):
            return
        bm = bm[:, stp]  # [Hq, T, nkb]
        na = n_allowed[qb0:qb1][stp]
        cum = _sorted_cum(bm)
        f = [_needed(cum, na, cov) for cov in COVERAGES]
        acc.f90.append(f[0].T.cpu().numpy())
        acc.f95.append(f[1].T.cpu().numpy())
        # coverage of a block_topk-like selection: forced blocks first, then the heaviest others
        fo = forced[qb0:qb1][stp]  # [T, nkb]
        bmn = bm / bm.sum(dim=-1, keepdim=True).clamp_min(1e-300)
        order = torch.sort(bmn + 2.0 * fo.to(bmn.dtype), dim=-1, descending=True, stable=True).indices
        cumf = torch.cumsum(torch.gather(bmn, -1, order), dim=-1)
        kg = torch.maximum(kgrid[:, qb0:qb1][:, stp], fo.sum(dim=-1)[None])  # [K, T]
        idx = (kg.T[None] - 1).clamp(0, geo.nkb - 1).expand(hq, -1, -1)  # [Hq, T, K]
        cov = torch.gather(cumf, -1, idx)
        acc.cov_sum += cov.sum(dim=1).cpu().numpy()
        acc.cov_n += cov.shape[1]
        gm = bm.view(g, hq // g, bm.shape[1], geo.nkb).sum(dim=1)  # [G, T, nkb]
        acc.g90.append(_needed(_sorted_cum(gm), na, COVERAGES[0]).T.cpu().numpy())
        sel = select_top(gm[None], geo.allowed[qb0:qb1][stp], forced[qb0:qb1][stp],
                         torch.ones(1, 1, 1, geo.nkb, dtype=torch.bool, device=gm.device),
                         kref[qb0:qb1][stp][None, None])  # [1, G, T, nkb]
        acc.masks.append(sel[0].permute(1, 0, 2).cpu().numpy())

    def _sinks(self, idx: int, acc: _SiteAcc, colsum: torch.Tensor, nq: int, nk: int, off: int, causal: bool,
               hq: int, hidden: Optional[torch.Tensor]) -> None:
        """methods.md §13f: σ_l(j) = mean_{h, i>j} A_h[i, j] (non-causal: i ≠ j); flag j ≠ 0 with
        σ ≥ max(ratio·median σ, min_score) and cos(h_j, h_0) ≥ sink_cos."""
        st = self.st
        j = torch.arange(nk, device=colsum.device)
        if causal:
            cnt = nq - torch.clamp(j - off + 1, 0, nq)
        else:
            cnt = nq - ((j >= off) & (j < off + nq)).long()
        cnt = cnt.double() * hq
        sigma = colsum / cnt.clamp_min(1.0)
        acc.colsum = None
        acc.sink_score_sum += float(sigma[0]) if cnt[0] > 0 else 0.0
        acc.sink_samples += 1
        self.sink_primary[idx].append(float(sigma[0]) if cnt[0] > 0 else 0.0)
        ok = cnt >= st.sink_min_queries * hq
        if int(ok.sum()) < 2:
            self.sample_sinks[idx] = []
            return
        med = float(sigma[ok].median())
        thr = max(st.sink_ratio * med, st.sink_min_score)
        cand = ok & (sigma >= thr) & (j > 0)
        pos = torch.nonzero(cand).flatten()
        found: list[tuple[int, float, float]] = []
        h = None
        if hidden is not None:
            hh = hidden
            if hh.dim() == 2 and hh.shape[0] % nq == 0:
                hh = hh.view(-1, nq, hh.shape[-1])
            if hh.dim() == 3 and hh.shape[1] == nk:
                h = hh[0].double()
        for p in pos.tolist():
            cosv = float("nan")
            if h is not None:
                cosv = float(F.cosine_similarity(h[p], h[0], dim=0))
                if not cosv >= st.sink_cos:
                    continue
            found.append((int(p), float(sigma[p]), cosv))
        self.sample_sinks[idx] = found
        acc.secondary += len(found)

    # -- per-sample bookkeeping ---------------------------------------------------------
    def end_stats_sample(self, sample: int, ids: Optional[torch.Tensor], tokenizer: Any) -> None:
        masks = [np.concatenate(a.masks, axis=0) if a.masks else None for a in self.acc]
        for a in self.acc:
            a.masks = []
        if any(x is None for x in masks) or len({x.shape for x in masks}) != 1:
            self.overlap_ok = False
        if self.overlap_ok:
            self.overlap_masks.append(np.stack(masks, axis=1))  # [T, L, G, nkb]
        by_pos: dict[int, list[tuple[int, float, float]]] = {}
        for li in range(len(self.sites)):
            for p, s, cv in self.sample_sinks.get(li, []):
                by_pos.setdefault(p, []).append((li, s, cv))
        self.sample_sinks = {}
        for p in sorted(by_pos):
            ent = by_pos[p]
            layers = [e[0] for e in ent]
            life = 1
            while life < len(layers) and layers[life] == layers[0] + life:
                life += 1
            tok = None
            if ids is not None and tokenizer is not None and p < ids.shape[-1]:
                tok = str(tokenizer.convert_ids_to_tokens(int(ids[0, p])))
            best = max(ent, key=lambda e: (e[1], -e[0]))
            self.secondary.append({"sample": sample, "position": p, "token": tok, "start_layer": layers[0],
                                   "lifetime": life, "layers": layers, "max_score": best[1],
                                   "cos_to_first": None if math.isnan(best[2]) else best[2]})

    def add_hess(self, grads: dict[str, Sequence[torch.Tensor]]) -> None:
        """Accumulate (Σ dL_e/dO_h ⊙ δ_h)^2 for each error term e."""
        for term, gl in grads.items():
            for i, gr in enumerate(gl):
                d = self.deltas.get(i)
                if d is None or gr is None:
                    continue
                s = (gr.double() * d.double()).sum(dim=(0, 2, 3)).cpu().numpy()
                self.acc[i].hess_sq[term] += s * s
        for i in self.deltas:
            self.acc[i].hess_n += 1
        self.deltas = {}
        self.zs = {}


def _sorted_cum(bm: torch.Tensor) -> torch.Tensor:
    """Block masses [..., nkb] → cumulative fraction of the descending-sorted masses."""
    tot = bm.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    srt = torch.sort(bm / tot, dim=-1, descending=True).values
    return torch.cumsum(srt, dim=-1)


def _needed(cum: torch.Tensor, n_allowed: torch.Tensor, coverage: float) -> torch.Tensor:
    """Fraction of the allowed blocks needed to reach ``coverage`` (cum [..., T, nkb], n_allowed [T])."""
    need = (cum < coverage - 1e-12).sum(dim=-1) + 1
    na = n_allowed.to(need.dtype)
    return torch.minimum(need, na).double() / na.double()


def find_hidden_input(q_node: torch.fx.Node, max_depth: int = 16) -> Optional[torch.fx.Node]:
    """The input of the projection that produced ``q_node`` (breadth-first search backwards to the
    nearest linear/addmm/mm/matmul), or None."""
    seen = {q_node}
    frontier = [q_node]
    for _ in range(max_depth):
        nxt = []
        for n in frontier:
            if n.op == "call_function" and n.target in _LINEAR_TARGETS:
                arg = n.args[1] if n.target == torch.ops.aten.addmm.default else n.args[0]
                return arg if isinstance(arg, torch.fx.Node) else None
            for a in n.all_input_nodes:
                if a not in seen and a.op == "call_function":
                    seen.add(a)
                    nxt.append(a)
        frontier = nxt
        if not frontier:
            break
    return None


def instrument(cap: Captured, collector: Collector) -> torch.fx.GraphModule:
    """A fresh GraphModule of ``cap.program`` whose SDPA nodes call ``collector.call``."""
    gm = cap.program.module()
    nodes = sdpa_nodes(gm.graph)
    if len(nodes) != len(cap.sites):
        raise BadInput(f"graph has {len(nodes)} attention nodes but the capture lists {len(cap.sites)} sites",
                       "capture the model again")
    for i, n in enumerate(nodes):
        a = _sdpa_args(n)
        hid = find_hidden_input(a["query"]) if isinstance(a["query"], torch.fx.Node) else None

        def fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
               hidden=None, _i=i):
            return collector.call(_i, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, hidden)

        fn.__name__ = f"surgeon_profile_site_{i}"
        n.target = fn
        n.args = (a["query"], a["key"], a["value"], a["attn_mask"])
        n.kwargs = {"dropout_p": a["dropout_p"], "is_causal": a["is_causal"], "scale": a["scale"],
                    "enable_gqa": a["enable_gqa"], "hidden": hid}
    gm.recompile()
    gm.meta["surgeon_site_nodes"] = list(nodes)
    return gm


@contextlib.contextmanager
def _frozen_params(module: torch.nn.Module) -> Iterator[None]:
    """Temporarily set requires_grad=False on every parameter (restored afterwards)."""
    params = list(module.parameters())
    old = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, r in zip(params, old):
            p.requires_grad_(r)


def _run(gm: torch.fx.GraphModule, inputs: tuple) -> Optional[torch.Tensor]:
    try:
        return gm(*inputs)
    except _StopForward:
        return None


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ (float32 tensors, the ratio in float64)."""
    d = float(torch.linalg.vector_norm(out.float() - ref.float()))
    return d / max(float(torch.linalg.vector_norm(ref.float())), 1e-30)


def _emit(progress: Optional[ProgressFn], stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)
