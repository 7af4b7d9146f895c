"""Decode modes: what a site runs for one new query (``q_len == 1``) against its KV cache.

A mode gets q [B, Hq, 1, D], the cache k/v [B, Hkv, Nk, D] (transformers' cache, unrepeated; the
query sits at the last position) and the key padding [B, Nk] bool (None: none) and returns
[B, Hq, 1, Dv].

* ``dense`` (default): exact attention over the whole cache — the same SDPA call transformers
  makes, so an identity policy generates exactly what the original model generates.
* ``token_select``: TokenSelect's per-head soft-vote token selection over the cache, its
  selection reused across consecutive steps while the queries stay similar
  (:class:`TokenSelectDecode`).

A site picks its mode in the policy: ``SiteChoice.decode = {"mode": NAME, "params": {...}}``
(recipes: a ``decode:`` entry beside ``variant:``); no ``decode`` means ``dense``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F

from surgeon.errors import BadInput


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


class DecodeMode:
    """Base class: ``name`` and ``run(plan, q, k, v, kp)``."""

    name: ClassVar[str] = ""

    def run(self, plan: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            kp: Optional[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"mode": self.name}


@dataclass
class DenseDecode(DecodeMode):
    name: ClassVar[str] = "dense"

    def run(self, plan, q, k, v, kp):
        return dense_over_cache(q, k, v, kp, float(plan.site.scale))


DECODE_MODES: dict[str, type] = {"dense": DenseDecode}


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
    cls = DECODE_MODES[mode]
    return cls.from_params(params, site) if hasattr(cls, "from_params") else cls()


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


def attend_kept_gather(q, k, v, kp, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """Fast path: gather the kept tokens per KV head ([B, Hkv, S, D], S = kept count) and run SDPA
    on them only — O(S) instead of O(Nk) attention."""
    b, hkv, nk, d = k.shape
    keep = keep.to(torch.bool)
    if kp is not None:
        keep = keep & kp.to(torch.bool)
    counts = keep.sum(dim=-1)  # [B]
    s = int(counts.max())
    if s == 0:
        return q.new_zeros(q.shape[:3] + (v.shape[-1],))
    # kept positions first, in position order (stable sort of the "dropped" flag)
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :s]  # [B, S]
    kg = k.gather(2, order[:, None, :, None].expand(b, hkv, s, d))
    vg = v.gather(2, order[:, None, :, None].expand(b, hkv, s, v.shape[-1]))
    gqa = q.shape[1] != hkv
    if bool((counts == s).all()):
        return F.scaled_dot_product_attention(q, kg, vg, scale=scale, enable_gqa=gqa)
    valid = (torch.arange(s, device=q.device)[None, :] < counts[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, kg, vg, attn_mask=valid, scale=scale, enable_gqa=gqa)
    return torch.where(counts[:, None, None, None] > 0, out, torch.zeros((), dtype=out.dtype, device=out.device))


@dataclass
class TokenSelectDecode(DecodeMode):
    """TokenSelect (methods.md §4) during decode: per-head soft-vote token selection over the cache.

    Each step either selects afresh (:func:`token_select_keep`) or, while the query fingerprint
    (the current query, all heads flattened) has cosine ≥ θ with the one of the last fresh
    selection in every batch row, reuses it: the tokens kept then plus every token appended since
    (so a reused step never drops a token the fresh step kept). ``reference``
    (:func:`attend_kept_reference`) or the ``gather`` fast path (:func:`attend_kept_gather`) then
    attends to the kept tokens; ``surgeon.attention.base.use_impl`` chooses as for variants.
    Equal to dense over the cache when n_init + n_local + top_k ≥ the cache length.
    State (per site, per model) is reset by each prefill.
    """

    name: ClassVar[str] = "token_select"
    params: TokenSelectParams = TokenSelectParams()

    @classmethod
    def from_params(cls, params: dict[str, Any], site: Any) -> "TokenSelectDecode":
        names = set(TokenSelectParams.__dataclass_fields__)
        unknown = sorted(set(params) - names)
        if unknown:
            raise BadInput(f"site {getattr(site, 'name', site)}: unknown token_select parameter(s) {unknown}",
                           f"valid parameters: {sorted(names)}")
        return cls(params=TokenSelectParams(**params))

    def describe(self) -> dict[str, Any]:
        return {"mode": self.name, "params": self.params.to_dict()}

    def keep_for(self, state: dict[str, Any], q: torch.Tensor, k: torch.Tensor, kp: Optional[torch.Tensor],
                 scale: float) -> torch.Tensor:
        """The step's keep mask [B, Nk]; updates ``state`` (fingerprint, selection, counters)."""
        b, nk = q.shape[0], k.shape[2]
        fp = q[:, :, -1, :].reshape(b, -1).float()
        prev = state.get("keep")
        if prev is not None and prev.shape[0] == b and prev.shape[1] < nk and self.params.reuse_threshold <= 1.0:
            cos = F.cosine_similarity(fp, state["fp"], dim=-1)
            if bool((cos >= self.params.reuse_threshold).all()):
                state["reused"] = state.get("reused", 0) + 1
                new = torch.ones(b, nk - prev.shape[1], dtype=torch.bool, device=prev.device)
                keep = torch.cat([prev, new], dim=-1)
                return keep if kp is None else keep & kp.to(torch.bool)
        keep = token_select_keep(q, k, kp, self.params, scale)
        state.update(fp=fp, keep=keep)
        state["selected"] = state.get("selected", 0) + 1
        return keep

    def run(self, plan, q, k, v, kp):
        from surgeon.attention.base import current_impl

        scale = float(plan.site.scale)
        state = plan.state.decode_state.setdefault(plan.site.name, {})
        keep = self.keep_for(state, q, k, kp, scale)
        state["kept"] = state.get("kept", 0) + int(keep.sum())
        state["visible"] = state.get("visible", 0) + int(k.shape[2] * k.shape[0] if kp is None else kp.sum())
        if current_impl() == "reference":
            return attend_kept_reference(q, k, v, kp, keep, scale)
        return attend_kept_gather(q, k, v, kp, keep, scale)


DECODE_MODES["token_select"] = TokenSelectDecode
