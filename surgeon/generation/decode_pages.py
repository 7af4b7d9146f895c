"""Page-based decode modes: Quest's per-page key bounds and DELTA's Δ-layer page selection.

The cache is cut into pages of ``page_size`` consecutive positions (page j covers
[j·P, (j+1)·P)); the last page, which holds the new token and may be partial, is always kept.

* ``page_select`` (:class:`PageSelectDecode`, Quest, methods.md §14h): per complete page and KV
  head the element-wise min and max of its keys; the upper bound of a query's logit on the page is
  scale · Σ_d max(q_d·min_d, q_d·max_d); each KV head attends to its top pages (plus the last
  page, ``init_pages`` leading and ``local_pages`` recent pages). Bounds of complete pages are
  kept in the per-site state and extended as pages fill, so a step costs O(Nk / P) for the
  selection and O(kept) for the attention instead of O(Nk).
* ``delta_plan`` (:class:`DeltaPlanDecode`, DELTA, methods.md §3): the Δ-layer — exact dense
  attention, and from its probabilities p_h(t) one page set for all heads:
  score(page) = Σ_{t ∈ page} max_h p_h(t), the last ``recent_pages`` forced in, ties toward the
  earlier page, the top ``top_pages`` kept (everything while the cache has fewer than
  ``compression_ratio · top_pages`` pages). Later ``token_reuse`` sites anchored here are DELTA's
  sparse layers; layers before it that decode ``dense`` are its full layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from surgeon.errors import BadInput
from surgeon.generation.decode import DecodeMode, check_params, dense_over_cache

NEG_INF = float("-inf")


def _check_int(mode: str, name: str, v: Any, lo: int, hi: int) -> None:
    from surgeon.attention.base import check_range

    if isinstance(v, bool) or not isinstance(v, int):
        raise BadInput(f"{mode} {name}={v!r} is not an integer", f"give {name} as a whole number")
    check_range(name, v, lo, hi)


# --------------------------------------------------------------------------- Quest

@dataclass(frozen=True)
class PageSelectParams:
    """page_size P: tokens per page (16 in Quest; a multiple of 8 keeps the gathered rows
    aligned); top_pages: selected pages per KV head, or with ``keep > 0`` ⌈keep · complete
    pages⌉; init_pages / local_pages: leading / most recent complete pages always kept (the
    last, partial page always is)."""

    page_size: int = 16
    top_pages: int = 64
    keep: float = 0.0
    init_pages: int = 0
    local_pages: int = 1

    def __post_init__(self) -> None:
        from surgeon.attention.base import check_range

        _check_int("page_select", "page_size", self.page_size, 1, 4096)
        for name in ("top_pages", "init_pages", "local_pages"):
            _check_int("page_select", name, getattr(self, name), 0, 1 << 24)
        check_range("keep", float(self.keep), 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"page_size": self.page_size, "top_pages": self.top_pages, "keep": self.keep,
                "init_pages": self.init_pages, "local_pages": self.local_pages}


@dataclass(frozen=True)
class PageLayout:
    """Where the pages of an ``nk``-token cache fall: complete pages 0 … ``full`` − 1 cover
    [0, full·P); candidates for selection are pages [lo, hi); pages [hi, full) and the tail
    [full·P, nk) are always kept, as are pages [0, lo)."""

    full: int
    lo: int
    hi: int
    budget: int

    @staticmethod
    def of(nk: int, p: PageSelectParams) -> "PageLayout":
        full = (nk - 1) // p.page_size  # the page holding the new token (position nk − 1) is the tail
        lo = min(p.init_pages, full)
        hi = max(lo, full - p.local_pages)
        budget = int(math.ceil(full * p.keep - 1e-9)) if p.keep > 0 else int(p.top_pages)
        return PageLayout(full=full, lo=lo, hi=hi, budget=budget)

    @property
    def keeps_everything(self) -> bool:
        return self.hi - self.lo <= self.budget


def page_bounds(k: torch.Tensor, kp: Optional[torch.Tensor], start: int, stop: int,
                page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise key min and max of pages [start, stop): k [B, Hkv, Nk, D] → two
    [B, Hkv, stop − start, D]; padded keys (kp False) are left out (a page of padding only gets
    min +inf, max −inf)."""
    b, h, _, d = k.shape
    seg = k[:, :, start * page_size:stop * page_size].reshape(b, h, stop - start, page_size, d)
    if kp is None:
        return seg.amin(dim=3), seg.amax(dim=3)
    real = kp[:, start * page_size:stop * page_size].to(torch.bool).reshape(b, 1, stop - start, page_size, 1)
    inf = torch.tensor(float("inf"), dtype=k.dtype, device=k.device)
    return torch.where(real, seg, inf).amin(dim=3), torch.where(real, seg, -inf).amax(dim=3)


def quest_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, scale: float) -> torch.Tensor:
    """Quest's upper bound of each query head's logit on each page: q [B, Hq, 1, D], kmin/kmax
    [B, Hkv, C, D] → u [B, Hkv, G, C] (G = Hq / Hkv query heads per KV head), u_h(j) =
    scale · Σ_d max(q_d·min_jd, q_d·max_jd) = scale · (q⁺·max_j + q⁻·min_j): two matmuls.
    Pages of padding only (min +inf) get −inf."""
    b, hq, _, d = q.shape
    hkv = kmin.shape[1]
    qg = q[:, :, -1, :].reshape(b, hkv, hq // hkv, d)
    lo = torch.nan_to_num(kmin, posinf=0.0)
    hi = torch.nan_to_num(kmax, neginf=0.0)
    u = (torch.matmul(qg.clamp(min=0), hi.transpose(-1, -2))
         + torch.matmul(qg.clamp(max=0), lo.transpose(-1, -2))) * scale
    return u.masked_fill(torch.isinf(kmin[..., 0])[:, :, None, :], NEG_INF)


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, scale: float) -> torch.Tensor:
    """Per KV head and page, the selection score from Quest's bounds (:func:`quest_bounds`):
    q [B, Hq, 1, D], kmin/kmax [B, Hkv, C, D] → [B, Hkv, C].

    [PROPOSED] With grouped-query attention the heads of a group share one page set: each head's
    bounds are turned into a distribution over the candidate pages (softmax of u_h) and the group
    takes the maximum over its heads, so every head's strongest pages compete on one scale. With
    one query head per KV head this ranks pages exactly as Quest's u_h does. A page of padding
    only scores −inf."""
    u = quest_bounds(q, kmin, kmax, scale)  # [B, Hkv, G, C]
    empty = torch.isinf(u[:, :, 0, :]) & (u[:, :, 0, :] < 0)
    prob = torch.softmax(u, dim=-1).nan_to_num(0.0)
    return prob.amax(dim=2).masked_fill(empty, NEG_INF)


def selected_pages(score: torch.Tensor, lay: PageLayout) -> torch.Tensor:
    """The top ``budget`` candidate pages per KV head in page order: score [B, Hkv, hi − lo] →
    page indices [B, Hkv, S] (ties toward the earlier page; −inf pages only when nothing else)."""
    n = min(lay.budget, score.shape[-1])
    # a tiny page-index penalty makes ties prefer the earlier page deterministically
    pen = torch.arange(score.shape[-1], device=score.device, dtype=score.dtype) * (-1e-12)
    idx = torch.topk(score + pen, n, dim=-1).indices
    return idx.sort(dim=-1).values + lay.lo


def page_keep(pages: torch.Tensor, lay: PageLayout, nk: int, page_size: int) -> torch.Tensor:
    """Kept positions as a mask: pages [B, Hkv, S] (the selected candidates) → bool [B, Hkv, Nk]
    with the always-kept pages and the tail added."""
    b, h = pages.shape[:2]
    keep = torch.zeros(b, h, nk, dtype=torch.bool, device=pages.device)
    keep[:, :, :lay.lo * page_size] = True
    keep[:, :, lay.hi * page_size:] = True
    pos = (pages[..., None] * page_size + torch.arange(page_size, device=pages.device)).flatten(2)
    return keep.scatter_(-1, pos, True)


def page_select_keep(q: torch.Tensor, k: torch.Tensor, kp: Optional[torch.Tensor], p: PageSelectParams,
                     scale: float) -> torch.Tensor:
    """Reference: a fresh Quest selection from bounds computed over the whole cache →
    bool [B, Hkv, Nk] (padding never kept)."""
    nk = k.shape[2]
    lay = PageLayout.of(nk, p)
    if lay.keeps_everything:
        keep = torch.ones(k.shape[0], k.shape[1], nk, dtype=torch.bool, device=k.device)
    else:
        kmin, kmax = page_bounds(k, kp, lay.lo, lay.hi, p.page_size)
        keep = page_keep(selected_pages(page_scores(q, kmin, kmax, scale), lay), lay, nk, p.page_size)
    return keep if kp is None else keep & kp.to(torch.bool)[:, None, :]


def attend_head_kept_reference(q, k, v, kp, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain-torch attention of the last-position query over per-KV-head kept tokens
    (keep [B, Hkv, Nk]; each query head uses its KV head's set)."""
    from surgeon.attention.base import AttnContext, attention_from_keep

    g = q.shape[1] // k.shape[1]
    ctx = AttnContext(causal=True, scale=scale, kv_heads=k.shape[1], key_padding=kp)
    return attention_from_keep(q, k, v, ctx, keep.repeat_interleave(g, dim=1)[:, :, None, :])


def gather_head_positions(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D] at per-head positions pos [B, H, S] → [B, H, S, D]."""
    return torch.gather(x, 2, pos[..., None].expand(-1, -1, -1, x.shape[-1]))


@dataclass
class PageSelectDecode(DecodeMode):
    """Quest during decode (see the module docstring). Reference: a fresh selection from bounds
    over the whole cache and masked attention (:func:`page_select_keep`,
    :func:`attend_head_kept_reference`); fast path: the page bounds kept in the per-site state and
    extended only by pages completed since the last step, the selected pages' keys gathered per
    KV head and one SDPA over them. Equal to dense over the cache while the candidate pages are
    no more than the budget (the step then runs dense attention). State is reset by each prefill.
    """

    name: ClassVar[str] = "page_select"
    params: PageSelectParams = PageSelectParams()

    @classmethod
    def from_params(cls, params: dict[str, Any], site: Any) -> "PageSelectDecode":
        check_params(PageSelectParams, "page_select", params, site)
        return cls(params=PageSelectParams(**params))

    def describe(self) -> dict[str, Any]:
        return {"mode": self.name, "params": self.params.to_dict()}

    def _bounds(self, state: dict[str, Any], k: torch.Tensor, kp: Optional[torch.Tensor],
                full: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds of complete pages [0, full), extended incrementally (the cache only grows
        between prefills; any other shape starts afresh)."""
        have = state.get("pages", 0)
        b, h, _, d = k.shape
        if "kmin" not in state or state["kmin"].shape[:2] != (b, h) or have > full or \
                state.get("padded") != (kp is not None):
            have = 0
            state["kmin"] = k.new_empty(b, h, 0, d)
            state["kmax"] = k.new_empty(b, h, 0, d)
        if full > have:
            lo, hi = page_bounds(k, kp, have, full, self.params.page_size)
            state["kmin"] = torch.cat([state["kmin"], lo], dim=2)
            state["kmax"] = torch.cat([state["kmax"], hi], dim=2)
        state.update(pages=full, padded=kp is not None)
        return state["kmin"], state["kmax"]

    def step(self, state: dict[str, Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             kp: Optional[torch.Tensor], scale: float, fast: bool) -> torch.Tensor:
        """One decode step; updates ``state`` (page bounds, counters)."""
        p = self.params
        b, hkv, nk = k.shape[0], k.shape[1], k.shape[2]
        visible = b * nk if kp is None else int(kp.sum())
        state["visible"] = state.get("visible", 0) + visible
        lay = PageLayout.of(nk, p)
        if lay.keeps_everything:
            state["kept"] = state.get("kept", 0) + visible
            state["dense"] = state.get("dense", 0) + 1
            return dense_over_cache(q, k, v, kp, scale)
        state["selected"] = state.get("selected", 0) + 1
        if not fast:
            keep = page_select_keep(q, k, kp, p, scale)
            state["kept"] = state.get("kept", 0) + int(keep.sum()) / hkv
            return attend_head_kept_reference(q, k, v, kp, keep, scale)
        kmin, kmax = self._bounds(state, k, kp, lay.full)
        pages = selected_pages(page_scores(q, kmin[:, :, lay.lo:lay.hi], kmax[:, :, lay.lo:lay.hi], scale), lay)
        ps = p.page_size
        dev = q.device
        parts = [torch.arange(lay.lo * ps, device=dev).expand(b, hkv, -1),
                 (pages[..., None] * ps + torch.arange(ps, device=dev)).flatten(2),
                 torch.arange(lay.hi * ps, nk, device=dev).expand(b, hkv, -1)]
        pos = torch.cat(parts, dim=-1)  # [B, Hkv, S] in position order
        kg, vg = gather_head_positions(k, pos), gather_head_positions(v, pos)
        g = q.shape[1] // hkv
        state["kept"] = state.get("kept", 0) + (pos.shape[-1] * b if kp is None else
                                                int(torch.gather(kp.to(torch.bool)[:, None, :].expand(-1, hkv, -1),
                                                                 2, pos).sum()) / hkv)
        if kp is None:
            return torch.nn.functional.scaled_dot_product_attention(q, kg, vg, scale=scale, enable_gqa=g > 1)
        valid = torch.gather(kp.to(torch.bool)[:, None, :].expand(-1, hkv, -1), 2, pos)
        m = valid.repeat_interleave(g, dim=1)[:, :, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(q, kg, vg, attn_mask=m, scale=scale, enable_gqa=g > 1)
        return torch.where(m.any(dim=-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))

    def run(self, plan, q, k, v, kp):
        from surgeon.attention.base import current_impl

        state = plan.state.decode_state.setdefault(plan.site.name, {})
        return self.step(state, q, k, v, kp, float(plan.site.scale), fast=current_impl() != "reference")


# --------------------------------------------------------------------------- DELTA

@dataclass(frozen=True)
class DeltaPlanParams:
    """DELTA's page selection (methods.md §3, the code's defaults): page_size P = 16, top_pages
    k = 64 (1024 tokens), recent_pages L = 8 forced in, selection only once the cache has at
    least compression_ratio · k pages."""

    page_size: int = 16
    top_pages: int = 64
    recent_pages: int = 8
    compression_ratio: float = 1.0

    def __post_init__(self) -> None:
        from surgeon.attention.base import check_range

        _check_int("delta_plan", "page_size", self.page_size, 1, 4096)
        _check_int("delta_plan", "top_pages", self.top_pages, 1, 1 << 24)
        _check_int("delta_plan", "recent_pages", self.recent_pages, 0, 1 << 24)
        check_range("compression_ratio", float(self.compression_ratio), 1.0, 1e6)

    def to_dict(self) -> dict[str, Any]:
        return {"page_size": self.page_size, "top_pages": self.top_pages, "recent_pages": self.recent_pages,
                "compression_ratio": self.compression_ratio}


def delta_keep(prob: torch.Tensor, kp: Optional[torch.Tensor], p: DeltaPlanParams) -> torch.Tensor:
    """DELTA's shared page set from the Δ-layer's probabilities: prob [B, Hq, Nk] → bool [B, Nk].

    score(page) = Σ_{t∈page} max_h p_h(t); the last ``recent_pages`` pages are forced in (the code's
    +inf; the most recent ``top_pages`` of them when there are more); ties
    toward the earlier page (−1e−7 · page index, as the code does); the top ``top_pages`` pages;
    every page while there are fewer than ``compression_ratio · top_pages``. Padding is never kept.
    """
    b, _, nk = prob.shape
    ps = p.page_size
    npg = -(-nk // ps)
    if npg < p.compression_ratio * p.top_pages or npg <= p.top_pages:
        keep = torch.ones(b, nk, dtype=torch.bool, device=prob.device)
    else:
        tok = prob.amax(dim=1)  # [B, Nk]
        tok = torch.nn.functional.pad(tok, (0, npg * ps - nk))
        score = tok.reshape(b, npg, ps).sum(dim=-1)
        score = score - 1e-7 * torch.arange(npg, device=prob.device, dtype=score.dtype)
        # the recent pages are forced in ("+inf"), the most recent first when they alone exceed k
        n_rec = min(p.recent_pages, p.top_pages)
        keep_pg = torch.zeros(b, npg, dtype=torch.bool, device=prob.device)
        keep_pg[:, npg - n_rec:] = True
        if p.top_pages > n_rec:
            pages = torch.topk(score[:, :npg - n_rec], p.top_pages - n_rec, dim=-1).indices
            keep_pg.scatter_(-1, pages, True)
        keep = keep_pg.repeat_interleave(ps, dim=-1)[:, :nk]
    return keep if kp is None else keep & kp.to(torch.bool)


def exact_probs(q: torch.Tensor, k: torch.Tensor, kp: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Softmax probabilities of the last-position queries over the cache: q [B, Hq, 1, D],
    k [B, Hkv, Nk, D] → [B, Hq, Nk] (0 on padding; rows without keys 0)."""
    b, hq, _, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    z = torch.matmul(q[:, :, -1, :].reshape(b, hkv, hq // hkv, d), k.transpose(-1, -2)) * scale
    if kp is not None:
        z = z.masked_fill(~kp.to(torch.bool)[:, None, None, :], NEG_INF)
    return torch.softmax(z, dim=-1).nan_to_num(0.0).reshape(b, hq, nk)


@dataclass
class DeltaPlanDecode(DecodeMode):
    """DELTA's Δ-layer during decode (see the module docstring): the output is exact dense
    attention over the cache; the page set (:func:`delta_keep`) is left in the per-site state for
    the ``token_reuse`` sites anchored here. Reference: masked attention
    (:func:`surgeon.attention.base.attention_from_keep`) and the selection from separately computed
    probabilities; fast path: one matmul and softmax give both the probabilities and the output."""

    name: ClassVar[str] = "delta_plan"
    shares_selection: ClassVar[bool] = True
    params: DeltaPlanParams = DeltaPlanParams()

    @classmethod
    def from_params(cls, params: dict[str, Any], site: Any) -> "DeltaPlanDecode":
        check_params(DeltaPlanParams, "delta_plan", params, site)
        return cls(params=DeltaPlanParams(**params))

    def describe(self) -> dict[str, Any]:
        return {"mode": self.name, "params": self.params.to_dict()}

    def step(self, state: dict[str, Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             kp: Optional[torch.Tensor], scale: float, fast: bool) -> torch.Tensor:
        b, hq, _, _ = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        prob = exact_probs(q, k, kp, scale)
        keep = delta_keep(prob, kp, self.params)
        visible = b * nk if kp is None else int(kp.sum())
        state.update(keep=keep, n=nk)
        for key in ("pos", "pos_valid", "pos_n"):
            state.pop(key, None)
        state["visible"] = state.get("visible", 0) + visible
        state["kept"] = state.get("kept", 0) + visible  # the Δ-layer itself attends to everything
        state["selected"] = state.get("selected", 0) + 1
        if not fast:
            return dense_reference(q, k, v, kp, scale)
        out = torch.matmul(prob.reshape(b, hkv, hq // hkv, nk).to(v.dtype), v)  # [B, Hkv, G, Dv]
        return out.reshape(b, hq, 1, v.shape[-1])

    def run(self, plan, q, k, v, kp):
        from surgeon.attention.base import current_impl

        state = plan.state.decode_state.setdefault(plan.site.name, {})
        return self.step(state, q, k, v, kp, float(plan.site.scale), fast=current_impl() != "reference")


def dense_reference(q, k, v, kp, scale: float) -> torch.Tensor:
    """Plain-torch exact attention of the last-position query over the cache."""
    from surgeon.attention.base import AttnContext, attention_from_keep

    return attention_from_keep(q, k, v, AttnContext(causal=True, scale=scale, kv_heads=k.shape[1], key_padding=kp))
