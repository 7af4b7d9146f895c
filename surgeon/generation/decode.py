"""Decode modes: what a site runs for one new query (``q_len == 1``) against its KV cache.

A mode gets q [B, Hq, 1, D], the cache k/v [B, Hkv, Nk, D] (transformers' cache, unrepeated; the
query sits at the last position) and the key padding [B, Nk] bool (None: none) and returns
[B, Hq, 1, Dv].

* ``dense`` (default): exact attention over the whole cache — the same SDPA call transformers
  makes, so an identity policy generates exactly what the original model generates.
* ``token_select``: TokenSelect's per-head soft-vote token selection over the cache, its
  selection reused across consecutive steps while the queries stay similar
  (:class:`TokenSelectDecode`).
* ``token_reuse``: HyLRA-style cross-layer reuse — the positions an earlier selecting site
  (``token_select`` or ``delta_plan``) kept at this step (:class:`TokenReuseDecode`); DELTA's
  "sparse layers" are ``token_reuse`` sites anchored at the most recent ``delta_plan`` site.
* ``page_select``: Quest — per-page key min/max bounds, the top pages per KV head
  (:class:`surgeon.generation.decode_pages.PageSelectDecode`).
* ``delta_plan``: DELTA's Δ-layer — exact dense attention plus a page selection from its own
  probabilities, shared by all heads, for later ``token_reuse`` sites
  (:class:`surgeon.generation.decode_pages.DeltaPlanDecode`).

A site picks its mode in the policy: ``SiteChoice.decode = {"mode": NAME, "params": {...}}``
(recipes: a ``decode:`` entry beside ``variant:``); no ``decode`` means ``dense``.
"""
from __future__ import annotations

import abc

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F

from surgeon.errors import BadInput

NEG_INF = float("-inf")


def dense_over_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: Optional[torch.Tensor],
                     scale: float) -> torch.Tensor:
    """Exact attention of the last-position queries over every real cached key."""
    gqa = q.shape[1] != k.shape[1]
    if kp is None or bool(kp.all()):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    mask = kp.to(torch.bool)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    row_ok = mask.any(dim=-1, keepdim=True)
    return torch.where(row_ok, out, torch.zeros((), dtype=out.dtype, device=out.device))


class DecodeMode(abc.ABC):
    """Base class: ``name`` and ``run(plan, q, k, v, kp)``.

    ``shares_selection``: the mode leaves, per step, ``keep`` [B, Nk] (one position set for all
    heads) and ``n`` (the cache length it was made for) in its per-site state, so that later
    ``token_reuse`` sites can attend to exactly those positions.
    """

    name: ClassVar[str] = ""
    shares_selection: ClassVar[bool] = False

    @abc.abstractmethod
    def run(self, plan: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            kp: Optional[torch.Tensor]) -> torch.Tensor:
        """One decode step's attention: q [B, Hq, 1, D] against the cache k/v [B, Hkv, Nk, D]."""

    def describe(self) -> dict[str, Any]:
        return {"mode": self.name}


@dataclass
class DenseDecode(DecodeMode):
    name: ClassVar[str] = "dense"

    def run(self, plan, q, k, v, kp):
        return dense_over_cache(q, k, v, kp, float(plan.site.scale))


# name → "module:Class": the registry resolves a mode when a spec names it (no registration by
# import side effect; the modules below import this one, never the reverse).
DECODE_MODES: dict[str, str] = {
    "dense": "surgeon.generation.decode:DenseDecode",
    "token_select": "surgeon.generation.decode:TokenSelectDecode",
    "token_reuse": "surgeon.generation.decode:TokenReuseDecode",
    "page_select": "surgeon.generation.decode_pages:PageSelectDecode",
    "delta_plan": "surgeon.generation.decode_pages:DeltaPlanDecode",
}


def decode_mode_class(name: str) -> type:
    """The class a registered decode mode name stands for."""
    import importlib

    module, cls = DECODE_MODES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def decode_mode_for(choice: Any, site: Any) -> DecodeMode:
    """The decode mode a site's choice names (``choice.decode``; default dense)."""
    return mode_from_spec(getattr(choice, "decode", None), site)


def mode_from_spec(spec: Any, site: Any) -> DecodeMode:
    """A decode spec (``DecodeSpec``, a ``{mode, params}`` mapping or None) → a validated mode."""
    if spec is None:
        return DenseDecode()
    mode = spec.mode if hasattr(spec, "mode") else spec.get("mode", "dense")
    params = dict(spec.params if hasattr(spec, "params") else spec.get("params", {}) or {})
    if mode not in DECODE_MODES:
        raise BadInput(f"site {getattr(site, 'name', site)}: unknown decode mode '{mode}'",
                       f"valid decode modes: {', '.join(sorted(DECODE_MODES))}")
    cls = decode_mode_class(mode)
    if not hasattr(cls, "from_params"):
        if params:
            raise BadInput(f"site {getattr(site, 'name', site)}: decode mode '{mode}' takes no parameters "
                           f"(got {sorted(params)})", f"remove the params of the {mode} decode entry")
        return cls()
    return cls.from_params(params, site)


def check_params(cls: type, mode: str, params: dict[str, Any], site: Any) -> None:
    """Unknown parameter names of a dataclass-typed decode mode → one-line BadInput."""
    names = set(cls.__dataclass_fields__)
    unknown = sorted(set(params) - names)
    if unknown:
        raise BadInput(f"site {getattr(site, 'name', site)}: unknown {mode} parameter(s) {unknown}",
                       f"valid parameters: {sorted(names)}")


# --------------------------------------------------------------------------- TokenSelect

@dataclass(frozen=True)
class TokenSelectParams:
    """n_init: leading cache tokens always kept; n_local: most recent tokens always kept (the new
    token's own key included besides them); top_k: voted tokens per step, or with ``keep > 0``
    ⌈keep · cache length⌉; reuse_threshold θ: reuse the previous step's selection while the
    cosine of the query fingerprints is ≥ θ (> 1 disables reuse; TokenSelect uses 0.9)."""

    n_init: int = 128
    n_local: int = 512
    top_k: int = 2048
    keep: float = 0.0
    reuse_threshold: float = 0.9

    def __post_init__(self) -> None:
        from surgeon.attention.base import check_range

        for name in ("n_init", "n_local", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise BadInput(f"token_select {name}={v!r} is not an integer", f"give {name} as a whole number")
            check_range(name, v, 0, 1 << 30)
        check_range("keep", float(self.keep), 0.0, 1.0)
        check_range("reuse_threshold", float(self.reuse_threshold), -1.0, 2.0)

    def to_dict(self) -> dict[str, Any]:
        return {"n_init": self.n_init, "n_local": self.n_local, "top_k": self.top_k, "keep": self.keep,
                "reuse_threshold": self.reuse_threshold}


def token_select_keep(q: torch.Tensor, k: torch.Tensor, kp: Optional[torch.Tensor], p: TokenSelectParams,
                      scale: float) -> torch.Tensor:
    """A fresh TokenSelect selection for the last-position query: bool [B, Nk].

    Exactly ``token_topk``'s selection for one query (chunk 1): per-head criticality
    q_h · k_{g(h), j}, soft vote S(j) = Σ_h softmax_j, top-k of S over the candidates
    [n_init, Nk − 1 − n_local) (ties toward the lower position), plus the init tokens, the
    ``n_local`` tokens before the query and the query's own key; padding is never kept.
    """
    from surgeon.attention.base import AttnContext
    from surgeon.attention.token_topk import TokenTopKParams, select_tokens, selection_keep

    nk = k.shape[2]
    tp = TokenTopKParams(n_init=p.n_init, n_local=p.n_local, top_k=p.top_k, keep=p.keep, chunk=1)
    ctx = AttnContext(causal=True, scale=scale, kv_heads=k.shape[1], key_padding=kp)
    keep = selection_keep(select_tokens(q, k, ctx, tp), 1, nk, 1)[:, 0, 0]
    return keep if kp is None else keep & kp.to(torch.bool)


def attend_kept_reference(q, k, v, kp, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain-torch attention of the last-position query over the kept cache tokens (keep [B, Nk])."""
    from surgeon.attention.base import AttnContext, attention_from_keep

    ctx = AttnContext(causal=True, scale=scale, kv_heads=k.shape[1], key_padding=kp)
    return attention_from_keep(q, k, v, ctx, keep[:, None, None, :])


def token_select_keep_fast(q: torch.Tensor, k: torch.Tensor, kp: Optional[torch.Tensor],
                           p: TokenSelectParams) -> torch.Tensor:
    """:func:`token_select_keep` in a few fused ops (one matmul over the candidates, one softmax,
    ``torch.topk``); the same set except that exact ties in the vote may break differently."""
    b, hq, _, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    lim = nk - 1  # the query's own position
    n_i = min(p.n_init, lim)
    lo, hi = p.n_init, lim - p.n_local
    keep = torch.zeros(b, nk, dtype=torch.bool, device=q.device)
    keep[:, :n_i] = True
    keep[:, max(n_i, lim - p.n_local):] = True  # the local window and the query's own key
    kcnt = int(math.ceil(nk * p.keep - 1e-9)) if p.keep > 0 else int(p.top_k)
    if hi > lo and kcnt > 0:
        real = kp[:, lo:hi].to(torch.bool) if kp is not None else None
        if kcnt >= hi - lo:
            keep[:, lo:hi] = True if real is None else real
        else:
            s = torch.matmul(q[:, :, -1:, :].reshape(b, hkv, hq // hkv, d), k[:, :, lo:hi].transpose(-1, -2))
            if real is not None:
                s = s.masked_fill(~real[:, None, None, :], NEG_INF)
            vote = torch.softmax(s, dim=-1).sum(dim=(1, 2))  # [B, C]
            if real is not None:
                vote = vote.masked_fill(~real, NEG_INF)
            val, idx = torch.topk(vote, kcnt, dim=-1)
            sel = torch.zeros(b, hi - lo + 1, dtype=torch.bool, device=q.device)
            sel.scatter_(-1, torch.where(val > NEG_INF, idx, torch.full_like(idx, hi - lo)), True)
            keep[:, lo:hi] = sel[:, :-1]
    return keep if kp is None else keep & kp.to(torch.bool)


def token_select_idx_fast(q: torch.Tensor, k: torch.Tensor, p: TokenSelectParams) -> torch.Tensor:
    """Without padding: the kept positions [B, S] in position order, built directly (init, the
    sorted top-k winners, the local window) — no O(cache) mask or sort."""
    b, hq, _, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dev = q.device
    lim = nk - 1
    n_i = min(p.n_init, lim)
    lo, hi = p.n_init, lim - p.n_local
    kcnt = int(math.ceil(nk * p.keep - 1e-9)) if p.keep > 0 else int(p.top_k)
    parts = [torch.arange(n_i, device=dev).expand(b, -1)]
    if hi > lo and kcnt > 0:
        if kcnt >= hi - lo:
            parts.append(torch.arange(lo, hi, device=dev).expand(b, -1))
        else:
            s = torch.matmul(q[:, :, -1:, :].reshape(b, hkv, hq // hkv, d), k[:, :, lo:hi].transpose(-1, -2))
            vote = torch.softmax(s, dim=-1).sum(dim=(1, 2))  # [B, C]
            parts.append(torch.topk(vote, kcnt, dim=-1).indices.sort(dim=-1).values + lo)
    parts.append(torch.arange(max(n_i, lim - p.n_local), nk, device=dev).expand(b, -1))
    return torch.cat(parts, dim=-1)


def gather_positions(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D], idx [B, S] → x at those positions [B, H, S, D] (index_select for one row:
    ~5× faster than ``gather`` with an expanded index on CPU)."""
    if x.shape[0] == 1:
        return x.index_select(2, idx[0])
    b, h = x.shape[:2]
    return x[torch.arange(b, device=x.device)[:, None, None], torch.arange(h, device=x.device)[None, :, None],
             idx[:, None, :]]


def gather_kept(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor):
    """The kept tokens per KV head, in position order: (k [B,Hkv,S,D], v [B,Hkv,S,Dv], valid [B,S])."""
    b, hkv, nk, d = k.shape
    counts = keep.sum(dim=-1)  # [B]
    s = int(counts.max()) if b else 0
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :s]  # kept positions first
    kg, vg = gather_positions(k, order), gather_positions(v, order)
    valid = torch.arange(s, device=k.device)[None, :] < counts[:, None]
    return kg, vg, valid


def attend_gathered(q: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, valid: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """SDPA of the query over gathered tokens (rows without any valid token give 0)."""
    gqa = q.shape[1] != kg.shape[1]
    if kg.shape[2] == 0:
        return q.new_zeros(q.shape[:3] + (vg.shape[-1],))
    if bool(valid.all()):
        return F.scaled_dot_product_attention(q, kg, vg, scale=scale, enable_gqa=gqa)
    m = valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q, kg, vg, attn_mask=m, scale=scale, enable_gqa=gqa)
    return torch.where(m.any(dim=-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))


def attend_kept_gather(q, k, v, kp, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """Fast path: gather the kept tokens per KV head ([B, Hkv, S, D], S = kept count) and run SDPA
    on them only — O(S) instead of O(Nk) attention."""
    keep = keep.to(torch.bool)
    if kp is not None:
        keep = keep & kp.to(torch.bool)
    kg, vg, valid = gather_kept(k, v, keep)
    return attend_gathered(q, kg, vg, valid, scale)


@dataclass
class TokenSelectDecode(DecodeMode):
    """TokenSelect (methods.md §4) during decode: per-head soft-vote token selection over the cache.

    Each step either selects afresh (:func:`token_select_keep`; the fast path
    :func:`token_select_keep_fast`) or, while the query fingerprint (the current query, all heads
    flattened) has cosine ≥ θ with the one of the last fresh selection in every batch row, reuses
    it: the tokens kept then plus every token appended since (so a reused step never drops a token
    the fresh step kept). The reference attends with a keep mask over the whole cache
    (:func:`attend_kept_reference`); the ``gather`` fast path gathers the kept tokens once per
    selection and, on reused steps, only appends the new tokens to them, so a reused step does no
    O(cache) work. ``surgeon.attention.base.use_impl`` chooses as for variants. Equal to dense over
    the cache when n_init + n_local + top_k ≥ the cache length. State (per site, per model) is
    reset by each prefill.
    """

    name: ClassVar[str] = "token_select"
    shares_selection: ClassVar[bool] = True
    params: TokenSelectParams = TokenSelectParams()

    @classmethod
    def from_params(cls, params: dict[str, Any], site: Any) -> "TokenSelectDecode":
        check_params(TokenSelectParams, "token_select", params, site)
        return cls(params=TokenSelectParams(**params))

    def describe(self) -> dict[str, Any]:
        return {"mode": self.name, "params": self.params.to_dict()}

    def keeps_everything(self, nk: int) -> bool:
        """Whether a selection over a cache of ``nk`` tokens keeps all of them (the candidates
        between the init tokens and the local window are no more than the voted budget)."""
        p = self.params
        kcnt = int(math.ceil(nk * p.keep - 1e-9)) if p.keep > 0 else int(p.top_k)
        return (nk - 1 - p.n_local) - p.n_init <= kcnt

    def _reusable(self, state: dict[str, Any], fp: torch.Tensor, b: int, nk: int) -> bool:
        n = state.get("n")
        if n is None or "fp" not in state or state["fp"].shape[0] != b or n >= nk or self.params.reuse_threshold > 1.0:
            return False
        return bool((F.cosine_similarity(fp, state["fp"], dim=-1) >= self.params.reuse_threshold).all())

    def step(self, state: dict[str, Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             kp: Optional[torch.Tensor], scale: float, fast: bool) -> torch.Tensor:
        """One decode step; updates ``state`` (fingerprint, selection, gathered K/V, counters)."""
        b, nk = q.shape[0], k.shape[2]
        fp = q[:, :, -1, :].reshape(b, -1).float()
        visible = b * nk if kp is None else int(kp.sum())
        state["visible"] = state.get("visible", 0) + visible
        if fast and self.keeps_everything(nk):
            # degenerate: every cache token is kept, so this step IS dense attention over the cache
            # (no selection work, no gather; a short context never pays for selecting)
            keep = torch.ones(b, nk, dtype=torch.bool, device=q.device) if kp is None else kp.to(torch.bool)
            for key in ("kg", "vg", "valid", "fp"):
                state.pop(key, None)
            state.update(keep=keep, n=nk, kept=state.get("kept", 0) + visible, dense=state.get("dense", 0) + 1)
            return dense_over_cache(q, k, v, kp, scale)
        reuse = self._reusable(state, fp, b, nk)
        new = idx = None
        n_old = state.get("n")
        if reuse:
            new = torch.ones(b, nk - n_old, dtype=torch.bool, device=q.device)
            if kp is not None:
                new = new & kp[:, n_old:].to(torch.bool)
            keep = torch.cat([state["keep"], new], dim=-1)
            state["reused"] = state.get("reused", 0) + 1
        else:
            if fast and kp is None:
                idx = token_select_idx_fast(q, k, self.params)
                keep = torch.zeros(b, nk, dtype=torch.bool, device=q.device).scatter_(-1, idx, True)
            elif fast:
                keep = token_select_keep_fast(q, k, kp, self.params)
            else:
                keep = token_select_keep(q, k, kp, self.params, scale)
            state["fp"] = fp
            state["selected"] = state.get("selected", 0) + 1
        state.update(keep=keep, n=nk)
        if not fast:
            state.pop("kg", None)
            state["kept"] = state.get("kept", 0) + int(keep.sum())
            return attend_kept_reference(q, k, v, kp, keep, scale)
        if reuse and "kg" in state and bool(new.all()):  # append the new tokens to the gathered K/V
            kg = torch.cat([state["kg"], k[:, :, n_old:]], dim=2)
            vg = torch.cat([state["vg"], v[:, :, n_old:]], dim=2)
            valid = torch.cat([state["valid"], new], dim=-1)
        elif idx is not None:
            kg, vg = gather_positions(k, idx), gather_positions(v, idx)
            valid = torch.ones(b, idx.shape[1], dtype=torch.bool, device=q.device)
        else:
            kg, vg, valid = gather_kept(k, v, keep)
        state.update(kg=kg, vg=vg, valid=valid)
        state["kept"] = state.get("kept", 0) + int(valid.sum())
        return attend_gathered(q, kg, vg, valid, scale)

    def run(self, plan, q, k, v, kp):
        from surgeon.attention.base import current_impl

        state = plan.state.decode_state.setdefault(plan.site.name, {})
        return self.step(state, q, k, v, kp, float(plan.site.scale), fast=current_impl() != "reference")



@dataclass
class TokenReuseDecode(DecodeMode):
    """HyLRA / TidalDecode-style cross-layer reuse during decode: attend to exactly the cache
    positions that the ``anchor`` site (an earlier site running ``token_select``) kept at this
    step — no selection work here. Reference: masked attention over the cache; ``gather`` fast
    path: the positions gathered once per step (shared by all consumers of the anchor)."""

    name: ClassVar[str] = "token_reuse"
    anchor: str = ""

    @classmethod
    def from_params(cls, params: dict[str, Any], site: Any) -> "TokenReuseDecode":
        unknown = sorted(set(params) - {"anchor"})
        where = getattr(site, "name", site)
        if unknown:
            raise BadInput(f"site {where}: unknown token_reuse parameter(s) {unknown}", "valid parameters: ['anchor']")
        anchor = params.get("anchor")
        if not isinstance(anchor, str) or not anchor:
            raise BadInput(f"site {where}: token_reuse needs an anchor site",
                           "set params: {anchor: <an earlier site whose decode mode is token_select or delta_plan>}")
        return cls(anchor=anchor)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.name, "params": {"anchor": self.anchor}}

    def run(self, plan, q, k, v, kp):
        from surgeon.attention.base import current_impl

        nk = k.shape[2]
        st = plan.state.decode_state.get(self.anchor)
        if st is None or st.get("n") != nk or st["keep"].shape[0] != q.shape[0]:
            raise BadInput(f"{plan.site.name} reuses the decode selection of {self.anchor}, which did not run this step",
                           "give token_reuse an earlier site whose decode mode is token_select or delta_plan")
        keep = st["keep"]
        mine = plan.state.decode_state.setdefault(plan.site.name, {})
        mine["visible"] = mine.get("visible", 0) + (q.shape[0] * nk if kp is None else int(kp.sum()))
        mine["kept"] = mine.get("kept", 0) + int(keep.sum())
        scale = float(plan.site.scale)
        if current_impl() == "reference":
            return attend_kept_reference(q, k, v, kp, keep, scale)
        if st.get("pos_n") != nk:  # positions of the anchor's selection, once per step
            if keep.shape[0] == 1:
                pos = keep[0].nonzero().flatten()[None]
                st["pos"], st["pos_valid"] = pos, torch.ones_like(pos, dtype=torch.bool)
            else:
                counts = keep.sum(dim=-1)
                s_ = int(counts.max())
                st["pos"] = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :s_]
                st["pos_valid"] = torch.arange(s_, device=keep.device)[None, :] < counts[:, None]
            st["pos_n"] = nk
        pos = st["pos"]
        return attend_gathered(q, gather_positions(k, pos), gather_positions(v, pos), st["pos_valid"], scale)



def validate_decode_plans(plans: dict[str, Any]) -> None:
    """Cross-site checks: a ``token_reuse`` site's anchor is an earlier ``token_select`` site."""
    order = {name: i for i, name in enumerate(plans)}
    for name, plan in plans.items():
        mode = plan.decode
        if isinstance(mode, TokenReuseDecode):
            a = mode.anchor
            if a not in plans:
                raise BadInput(f"site {name}: token_reuse anchor {a} is not a site of this model",
                               "name an earlier site whose decode mode is token_select or delta_plan")
            if order[a] >= order[name]:
                raise BadInput(f"site {name} reuses the decode selection of {a}, which runs after it",
                               "choose an earlier anchor site")
            if not getattr(plans[a].decode, "shares_selection", False):
                raise BadInput(f"site {name}: token_reuse anchor {a} does not select tokens for all heads during "
                               "decode", f"give {a} decode: {{mode: token_select}} or {{mode: delta_plan}}")
