"""``plan``: a pure function (profile, budget, options) → policy. No model, no re-profiling.

The budget is the fraction of dense attention compute the whole model may spend (cost model
of :mod:`surgeon.profiles.solvers`: FULL = 1, SELECT = density + select overhead, REUSE =
density, averaged over sites; "density" is what block_topk really keeps at the profile's
sequence length, see step 2).

Measured on SmolLM2-135M (profile 8 × 2048 tokens, held-out 2 × 1024 tokens, dense CE 2.165):
at budget 0.3 the HyLRA-capped plan (ρ = 0.3, 19 REUSE sites) raised CE by 0.249 and the
uncapped one (all SELECT + 1 FULL) by 0.200, which is why ``rho_search`` is on; at 0.15 both
gave +0.561 while "first layer FULL, rest uniform block_topk" at equal cost gave +0.760.

Algorithm
---------
1. **Rollback (FULL) ranking** — per site, a score combining HyLRA's hash ratio ``hr_l``
   (fraction of blocks covering 90% of the mass, methods.md §2 step 1) and the measured layer
   sensitivity (loss increase when that layer alone runs sparse): [PROPOSED] the mean of
   ``hr_l / max hr`` and ``sens_l⁺ / max sens⁺`` (``layer_score="combined"``; "hash_ratio" or
   "sensitivity" use one of them).
2. **Keep and rollback count** — block_topk always keeps its forced blocks (sink, local,
   causal diagonal), so its real density at short sequences is well above a small nominal keep;
   every cost below uses :func:`block_topk_density` (exact geometry at the profile's sequence
   length) instead of the nominal keep. For each candidate keep κ,
   :func:`solvers.hylra_for_budget` runs the HyLRA DP over the profile's min-merged overlap matrix
   for every rollback count and returns the plan with the most FULL layers whose cost fits the
   budget — with HyLRA's cap on anchors (ρ, default 0.3) and, with ``rho_search``, without it
   (ρ = 1: the DP may let every sparse layer select). Among the candidates (κ, ρ) we pick the
   plan with the smallest *predicted error*
   [PROPOSED]: ``Σ_l w_l · miss_l`` with ``miss_l = 1 − cov_l`` for SELECT, ``1 − cov_l·O[a, l]``
   for a layer reusing anchor a, 0 for FULL, where ``cov_l`` is the profiled attention mass a
   block_topk-like selection covers at the layer's per-head keeps (mean over heads) and
   ``w_l = sens_l⁺ / miss_l(κ_ref)`` scales the measured loss increase at the reference keep to
   other keeps (proportional model). Without sensitivities ``w_l = 1``. Ties prefer the larger κ.
3. **Per-head budgets (HeSS, methods.md §1)** — per-head keeps by water-filling
   (:func:`hess.water_fill`) on HeSS with the same total as the uniform keep. A reusing layer
   attends with its anchor's block mask, so an anchor's head allocation serves its whole group:
   ``head_scope="model"`` (default) water-fills once over all anchors' heads, each counted once
   per site it serves, weight = mean HeSS over those sites (budget moves across layers at equal
   total compute); ``head_scope="layer"`` water-fills within each anchor (weights summed over its
   group). Heads are not taken below the forced-block floor. The effective cost is recomputed
   with the per-head keeps and a candidate that exceeds the budget is rejected.
4. **Policy** — FULL → ``dense``; SELECT → ``block_topk`` (keep, head_keep, block_size, sinks,
   local blocks); REUSE → ``reuse`` with ``block_mask_from`` = the anchor site. A layer the DP
   would let reuse a FULL anchor (which produces no block mask; only possible with a very tight
   C_max) becomes its own SELECT anchor and the plan is re-costed.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import numpy as np

from surgeon.errors import BadInput
from surgeon.passes.policy import Policy, SiteChoice
from surgeon.profiles.profile_doc import Profile
from surgeon.profiles.solvers import (
    ROLE_FULL,
    ROLE_REUSE,
    ROLE_SELECT,
    hylra_for_budget,
    policy_cost,
    select_overhead,
)
from surgeon.profiles.hess import water_fill

DEFAULT_BUDGET_CAUSAL = 0.15
# candidate keeps, as fractions of the budget (plus the profile's keep grid below the budget)
_KEEP_FRACTIONS = (0.98, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.4, 0.3, 0.2)


@dataclass(frozen=True)
class PlanOptions:
    """rho: HyLRA's share of sparse layers that may compute their own selection (C_max);
    head_budget: "hess" (water-filled per-head keeps) or "uniform"; head_scope: "model" (one
    water-filling over all anchors' heads) or "layer" (per anchor); k_min / gamma: water-filling
    bounds and exponent (methods.md §1 defaults); layer_score: rollback ranking ("combined",
    "hash_ratio", "sensitivity"); sink_blocks / local_blocks: block_topk's forced blocks (None: the
    profile's); keep_candidates: explicit κ candidates (None: derived from the budget);
    select_cost: SELECT overhead (None: :func:`solvers.select_overhead` for ``mode``, prefill
    1/B², decode 1/B); reuse: False forbids REUSE (every sparse layer selects its own blocks);
    rho_search: also solve the DP without HyLRA's cap on anchors (ρ = 1) and let the predicted
    error choose — under the prefill cost model REUSE saves only 1/B² per layer, so it wins only
    when its overlap loss is negligible."""

    rho: float = 0.3
    head_budget: str = "hess"
    head_scope: str = "model"
    k_min: float = 0.02
    gamma: float = 1.0
    layer_score: str = "combined"
    sink_blocks: Optional[int] = None
    local_blocks: Optional[int] = None
    keep_candidates: Optional[tuple[float, ...]] = None
    select_cost: Optional[float] = None
    mode: str = "prefill"
    reuse: bool = True
    rho_search: bool = True

    def __post_init__(self) -> None:
        if self.head_budget not in ("hess", "uniform"):
            raise BadInput(f"head_budget={self.head_budget!r} is invalid", "use 'hess' or 'uniform'")
        if self.mode not in ("prefill", "decode"):
            raise BadInput(f"mode={self.mode!r} is invalid", "use 'prefill' or 'decode'")
        if self.head_scope not in ("model", "layer"):
            raise BadInput(f"head_scope={self.head_scope!r} is invalid", "use 'model' or 'layer'")
        if self.layer_score not in ("combined", "hash_ratio", "sensitivity"):
            raise BadInput(f"layer_score={self.layer_score!r} is invalid",
                           "use 'combined', 'hash_ratio' or 'sensitivity'")
        if not (0.0 < self.rho <= 1.0):
            raise BadInput(f"rho={self.rho} is out of range", "use a value in (0, 1]")
        if not (0.0 < self.k_min <= 1.0):
            raise BadInput(f"k_min={self.k_min} is out of range", "use a value in (0, 1]")
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            raise BadInput(f"gamma={self.gamma} is invalid", "use a finite value >= 0")
        if self.keep_candidates is not None and any(not (0 < k <= 1) for k in self.keep_candidates):
            raise BadInput(f"keep_candidates={self.keep_candidates} has values outside (0, 1]",
                           "give keep fractions in (0, 1]")

    @classmethod
    def coerce(cls, options: Union["PlanOptions", dict[str, Any], None]) -> "PlanOptions":
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if isinstance(options, dict):
            names = {f for f in cls.__dataclass_fields__}
            unknown = sorted(set(options) - names)
            if unknown:
                raise BadInput(f"unknown plan option(s) {unknown}", f"valid options: {sorted(names)}")
            d = dict(options)
            if d.get("keep_candidates") is not None:
                d["keep_candidates"] = tuple(float(x) for x in d["keep_candidates"])
            return cls(**d)
        raise BadInput(f"plan options must be PlanOptions or a dict, not {type(options).__name__}",
                       "pass options=PlanOptions(...)")


@dataclass
class PlanResult:
    """The chosen plan: per-site roles ("full" | "select" | "reuse"), anchors (cfg[l] = −1 for an
    anchor, else the anchor index), keep, rollback layers, modelled cost and the candidates."""

    policy: Policy
    roles: list[str]
    cfg: list[int]
    keep: float
    rollback: list[int]
    cost: float
    predicted_error: float
    head_keep: dict[str, list[float]] = field(default_factory=dict)
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("policy")
        return d


# --------------------------------------------------------------------------- pieces

def layer_scores(profile: Profile, how: str = "combined") -> np.ndarray:
    """Rollback ranking score per site [L] (larger = more deserving of dense attention)."""
    hr = np.asarray(profile.hash_ratios, dtype=np.float64)
    sens = np.array([np.nan if s is None else float(s) for s in profile.layer_sensitivity], dtype=np.float64)
    have_sens = bool(np.isfinite(sens).any()) and float(np.nanmax(np.maximum(sens, 0.0))) > 0
    sp = np.where(np.isfinite(sens), np.maximum(sens, 0.0), 0.0)
    hn = hr / hr.max() if hr.max() > 0 else np.zeros_like(hr)
    sn = sp / sp.max() if have_sens else np.zeros_like(sp)
    if how == "hash_ratio" or not have_sens:
        return hn
    if how == "sensitivity":
        return sn
    return 0.5 * (hn + sn)


def block_topk_density(n: int, block: int, keep: Union[float, np.ndarray], causal: bool, sink_blocks: int = 1,
                       local_blocks: int = 1) -> np.ndarray:
    """Fraction of dense (query, key) pairs ``block_topk`` keeps on an n×n self-attention grid.

    Geometry only: per query block, ``max(⌈keep·n_allowed⌉, n_forced)`` blocks are kept, the
    forced ones (first ``sink_blocks``, the ``local_blocks`` ending at the diagonal, the causal
    diagonal block) with their exact pair counts and the others at the mean pair count of the
    row's non-forced blocks. At small keeps the forced blocks dominate (SmolLM2, 2048 tokens,
    block 64: keep 0.02 keeps ≈ 0.12 of the causal pairs), which the nominal ``keep`` of the
    cost model would miss. keep: scalar or array; returns an array of the same shape.
    """
    kv = np.asarray(keep, dtype=np.float64)
    nb = -(-n // block)
    size = np.array([min(block, n - i * block) for i in range(nb)], dtype=np.float64)
    kept = np.zeros_like(kv)
    total = 0.0
    for qb in range(nb):
        kbs = np.arange(qb + 1) if causal else np.arange(nb)
        pairs = size[qb] * size[kbs]
        if causal:
            pairs[-1] = size[qb] * (size[qb] + 1) / 2.0
        forced = (kbs < sink_blocks) | ((kbs <= qb) & (kbs > qb - local_blocks))
        if causal:
            forced = forced | (kbs == qb)
        na, nf = len(kbs), int(forced.sum())
        fp, rest = float(pairs[forced].sum()), float(pairs[~forced].sum())
        k = np.ceil(kv * na - 1e-9)
        extra = np.clip(k - nf, 0, na - nf)
        kept = kept + fp + extra * (rest / (na - nf) if na > nf else 0.0)
        total += float(pairs.sum())
    return kept / total


@functools.lru_cache(maxsize=65536)
def _density(n: int, block: int, keep: float, causal: bool, sink_blocks: int, local_blocks: int) -> float:
    return float(block_topk_density(n, block, keep, causal, sink_blocks, local_blocks))


def coverage_at(profile: Profile, keep: Union[float, np.ndarray], site: Optional[int] = None) -> np.ndarray:
    """Attention mass covered by block_topk-like selections at ``keep``, interpolated on the
    profile's keep grid (coverage 0 at keep 0). ``site=None``: mean over heads per site [L] for a
    scalar keep. ``site=i``: per head [H] of site i, ``keep`` scalar or [H]."""
    grid = np.concatenate([[0.0], np.asarray(profile.settings["keep_grid"], dtype=np.float64)])
    if site is not None:
        cov = np.asarray(profile.sites[site].coverage, dtype=np.float64)  # [H, K]
        kv = np.broadcast_to(np.asarray(keep, dtype=np.float64), (cov.shape[0],))
        return np.array([np.interp(kv[h], grid, np.concatenate([[0.0], cov[h]])) for h in range(cov.shape[0])])
    out = []
    for s in profile.sites:
        c = np.asarray(s.coverage, dtype=np.float64).mean(axis=0)
        out.append(float(np.interp(float(keep), grid, np.concatenate([[0.0], c]))))
    return np.asarray(out)


def _weights(profile: Profile) -> np.ndarray:
    sens = np.array([np.nan if s is None else float(s) for s in profile.layer_sensitivity], dtype=np.float64)
    if not np.isfinite(sens).any():
        return np.ones(len(profile.sites))
    sp = np.where(np.isfinite(sens), np.maximum(sens, 0.0), 0.0)
    mean = float(sp.mean())
    if mean <= 0:
        return np.ones(len(profile.sites))
    miss_ref = np.maximum(1.0 - coverage_at(profile, float(profile.settings["ref_keep"])), 1e-6)
    return (sp + 1e-3 * mean) / miss_ref


def predicted_error(profile: Profile, roles: list[str], cfg: list[int], keep: float,
                    weights: Optional[np.ndarray] = None,
                    head_keep: Optional[dict[int, list[float]]] = None) -> float:
    """The [PROPOSED] planning objective Σ_l w_l · miss_l (see the module docstring); with
    ``head_keep`` (anchor index → per-head keeps) the coverage is taken per head."""
    w = _weights(profile) if weights is None else weights
    o = np.asarray(profile.overlap, dtype=np.float64)
    tot = 0.0
    for l, (r, a) in enumerate(zip(roles, cfg)):
        if r == ROLE_FULL:
            continue
        anchor = l if r != ROLE_REUSE else a
        hk = head_keep.get(anchor) if head_keep else None
        cov = float(coverage_at(profile, keep if hk is None or len(hk) != profile.sites[l].heads else
                                np.asarray(hk), site=l).mean())
        miss = 1.0 - cov * (o[a, l] if r == ROLE_REUSE else 1.0)
        tot += float(w[l]) * miss
    return tot


def _fix_full_anchors(roles: list[str], cfg: list[int]) -> tuple[list[str], list[int]]:
    """A layer reusing a FULL anchor becomes a SELECT anchor; its followers reuse it."""
    roles, cfg = list(roles), list(cfg)
    for l in range(len(cfg)):
        a = cfg[l]
        if a >= 0 and roles[a] == ROLE_FULL:
            roles[l], cfg[l] = ROLE_SELECT, -1
            for j in range(l + 1, len(cfg)):
                if cfg[j] == a:
                    cfg[j] = l
                else:
                    break
    return roles, cfg


def _candidates(budget: float, profile: Profile, opts: PlanOptions) -> list[float]:
    if opts.keep_candidates is not None:
        return sorted(set(float(k) for k in opts.keep_candidates), reverse=True)
    ks = {round(budget * f, 6) for f in _KEEP_FRACTIONS}
    ks |= {float(k) for k in profile.settings.get("keep_grid", []) if k < budget}
    return sorted((k for k in ks if 0 < k <= 1.0), reverse=True)


def _groups(roles: list[str], cfg: list[int]) -> dict[int, list[int]]:
    """SELECT anchor → the sites it serves (itself and its reusers)."""
    out: dict[int, list[int]] = {}
    for l, (r, a) in enumerate(zip(roles, cfg)):
        if r == ROLE_SELECT:
            out.setdefault(l, []).append(l)
        elif r == ROLE_REUSE:
            out.setdefault(a, []).append(l)
    return out


def _head_keeps(profile: Profile, roles: list[str], cfg: list[int], keep: float, opts: PlanOptions,
                floors: np.ndarray) -> dict[int, list[float]]:
    """SELECT anchor index → water-filled per-head keeps (HeSS of the sites the anchor serves).

    ``head_scope="layer"``: per anchor, total keep·H, weights Σ_{l served} HeSS_{l,h}.
    ``head_scope="model"``: one water-filling over the heads of all anchors, each (anchor, head)
    counted once per site it serves (its keep is paid that often), weight = mean HeSS over the
    served sites, total keep·H·(number of sparse sites) — the same compute, moved across layers.
    Heads are not given less than the forced-block floor of their site (``floors``: the density
    block_topk keeps at keep → 0, below which a smaller keep changes nothing).
    """
    out: dict[int, list[float]] = {}
    if opts.head_budget != "hess":
        return out
    groups = _groups(roles, cfg)
    if not groups:
        return out
    if opts.head_scope == "layer":
        for a, members in groups.items():
            heads = profile.sites[a].heads
            w = np.zeros(heads)
            for l in members:
                if profile.sites[l].heads == heads:
                    w += np.asarray(profile.sites[l].hess, dtype=np.float64)
            kmin = min(keep, max(opts.k_min, float(floors[a])))
            hk = water_fill(w, keep * heads, kmin, 1.0, opts.gamma)
            out[a] = [float(min(1.0, max(x, 1e-6))) for x in np.round(hk, 6)]
        return out
    units_w: list[float] = []
    owner: list[tuple[int, int]] = []
    for a, members in sorted(groups.items()):
        heads = profile.sites[a].heads
        w = np.zeros(heads)
        cnt = 0
        for l in members:
            if profile.sites[l].heads == heads:
                w += np.asarray(profile.sites[l].hess, dtype=np.float64)
                cnt += 1
        w = w / max(cnt, 1)
        for _ in members:
            for h in range(heads):
                units_w.append(float(w[h]))
                owner.append((a, h))
    kmin = min(keep, max(opts.k_min, float(min(floors[a] for a in groups))))
    ks = water_fill(np.asarray(units_w), keep * len(units_w), kmin, 1.0, opts.gamma)
    for (a, h), k in zip(owner, ks):
        out.setdefault(a, [0.0] * profile.sites[a].heads)[h] = float(min(1.0, max(round(float(k), 6), 1e-6)))
    return out


def _effective(profile: Profile, roles: list[str], cfg: list[int], keep: float, hk: dict[int, list[float]],
               sb: int, lb: int) -> np.ndarray:
    """Per-site effective density [L] (1 for FULL; the anchor's for REUSE)."""
    n, bs = int(profile.settings["seq_len"]), int(profile.settings["block_size"])
    out = np.ones(len(roles))
    for l, (r, a) in enumerate(zip(roles, cfg)):
        if r == ROLE_FULL:
            continue
        anchor = l if r == ROLE_SELECT else a
        ks = hk.get(anchor, [keep])
        out[l] = float(np.mean([_density(n, bs, float(x), bool(profile.sites[l].causal), sb, lb) for x in ks]))
    return out


# --------------------------------------------------------------------------- plan

def plan_details(profile: Profile, budget: float, *,
                 options: Union[PlanOptions, dict[str, Any], None] = None) -> PlanResult:
    """Like :func:`plan` but returns the roles, cost, objective and candidates too."""
    opts = PlanOptions.coerce(options)
    b = float(budget)
    if not (b > 0 and math.isfinite(b)):
        raise BadInput(f"budget={budget} is invalid", "give the kept fraction of dense attention compute, e.g. 0.15")
    names = profile.site_names
    L = len(names)
    n, bs = int(profile.settings["seq_len"]), int(profile.settings["block_size"])
    sb = int(opts.sink_blocks if opts.sink_blocks is not None else profile.settings.get("sink_blocks", 1))
    lb = int(opts.local_blocks if opts.local_blocks is not None else profile.settings.get("local_blocks", 1))
    sc = float(opts.select_cost) if opts.select_cost is not None else select_overhead(bs, opts.mode)
    source = f"plan:hylra+{opts.head_budget}/{opts.head_scope} (profile data {profile.data_fingerprint[:12]})"
    if b >= 1.0:
        pol = Policy(model_fingerprint=profile.model_fingerprint, budget=b, source=source,
                     sites={nm: SiteChoice(variant="dense", reason="budget >= 1: dense") for nm in names})
        return PlanResult(policy=pol, roles=[ROLE_FULL] * L, cfg=[-1] * L, keep=1.0, rollback=list(range(L)),
                          cost=1.0, predicted_error=0.0)
    o = np.asarray(profile.overlap, dtype=np.float64)
    if not opts.reuse:
        o = np.eye(L)  # nothing to reuse: every sparse layer selects (C_max is then irrelevant)
    score = layer_scores(profile, opts.layer_score)
    w = _weights(profile)
    floors = np.array([_density(n, bs, 0.0, bool(s.causal), sb, lb) for s in profile.sites])
    cands: list[dict[str, Any]] = []
    best: Optional[tuple[float, float, list[str], list[int], list[int], float, dict[int, list[float]]]] = None
    rhos = [1.0] if not opts.reuse else ([opts.rho, 1.0] if opts.rho_search and opts.rho < 1.0 else [opts.rho])
    for keep, rho in ((k, r) for k in _candidates(b, profile, opts) for r in rhos):
        dens = np.array([_density(n, bs, float(keep), bool(s.causal), sb, lb) for s in profile.sites])
        try:
            res = hylra_for_budget(o, score, b, dens, rho, sc)
        except BadInput:
            cands.append({"keep": keep, "rho": rho, "feasible": False})
            continue
        roles, cfg = _fix_full_anchors(res.plan.roles, res.plan.cfg)
        if not opts.reuse:
            roles = [ROLE_FULL if r == ROLE_FULL else ROLE_SELECT for r in roles]
            cfg = [-1] * L
        hk = _head_keeps(profile, roles, cfg, keep, opts, floors)
        cost = policy_cost(roles, _effective(profile, roles, cfg, keep, hk, sb, lb), sc)
        if cost > b + 1e-12:
            cands.append({"keep": keep, "rho": rho, "feasible": False, "cost": float(cost)})
            continue
        err = predicted_error(profile, roles, cfg, keep, w, hk)
        cands.append({"keep": keep, "rho": rho, "feasible": True, "cost": float(cost),
                      "rollback": len(res.plan.rollback), "predicted_error": float(err)})
        if best is None or err < best[0] - 1e-12:
            best = (err, keep, roles, cfg, sorted(l for l, r in enumerate(roles) if r == ROLE_FULL), cost, hk)
    if best is None:
        cheapest = float(floors.mean()) + sc / L
        raise BadInput(f"budget={b:.4g} is below the cheapest plan for this profile (≈{cheapest:.3g} of dense "
                       f"attention at {n} tokens: block_topk always keeps its sink, local and diagonal blocks)",
                       f"raise the budget to at least {cheapest:.3g}, or profile longer sequences or smaller blocks")
    err, keep, roles, cfg, rollback, cost, hk = best
    sites: dict[str, SiteChoice] = {}
    for l, nm in enumerate(names):
        sp = profile.sites[l]
        why = f"hr={sp.hash_ratio:.3g}" + (f", sens={sp.sensitivity:.3g}" if sp.sensitivity is not None else "")
        if roles[l] == ROLE_FULL:
            sites[nm] = SiteChoice(variant="dense", reason=f"hylra:full (rollback; {why})")
        elif roles[l] == ROLE_SELECT:
            params: dict[str, Any] = {"keep": keep, "block_size": bs, "sink_blocks": sb, "local_blocks": lb}
            if l in hk:
                params["head_keep"] = hk[l]
                params["keep"] = float(min(1.0, max(round(float(np.mean(hk[l])), 6), 1e-6)))
            sites[nm] = SiteChoice(variant="block_topk", params=params,
                                   reason=f"hylra:select keep={params['keep']:.4g}"
                                          + (f" hess head_keep ({opts.head_scope})" if l in hk else "") + f" ({why})")
        else:
            a = cfg[l]
            sites[nm] = SiteChoice(variant="reuse", params={"block_size": bs, "sink_blocks": sb, "local_blocks": lb},
                                   block_mask_from=names[a],
                                   reason=f"hylra:reuse anchor={names[a]} overlap={o[a, l]:.3g}")
    pol = Policy(model_fingerprint=profile.model_fingerprint, budget=b, source=source, sites=sites)
    return PlanResult(policy=pol, roles=roles, cfg=cfg, keep=keep, rollback=rollback, cost=cost,
                      predicted_error=err, head_keep={names[a]: v for a, v in hk.items()}, candidates=cands)


def plan(profile: Profile, budget: float, *, options: Union[PlanOptions, dict[str, Any], None] = None) -> Policy:
    """Per-site policy for ``budget`` (kept fraction of dense attention compute) from ``profile``.

    Pure and deterministic; see the module docstring for the algorithm. Raises BadInput when no
    plan fits the budget.
    """
    return plan_details(profile, budget, options=options).policy


def min_budget(profile: Profile, options: Union[PlanOptions, dict[str, Any], None] = None) -> float:
    """The (approximate) cheapest budget a plan can meet for ``profile``: every site block_topk
    at its forced-block floor plus one selection. A caller with a default budget (0.15 for
    causal LMs) can plan at ``max(default, min_budget(profile))`` for short profiles."""
    opts = PlanOptions.coerce(options)
    n, bs = int(profile.settings["seq_len"]), int(profile.settings["block_size"])
    sb = int(opts.sink_blocks if opts.sink_blocks is not None else profile.settings.get("sink_blocks", 1))
    lb = int(opts.local_blocks if opts.local_blocks is not None else profile.settings.get("local_blocks", 1))
    sc = float(opts.select_cost) if opts.select_cost is not None else select_overhead(bs, opts.mode)
    floors = [_density(n, bs, 0.0, bool(s.causal), sb, lb) for s in profile.sites]
    return float(np.mean(floors)) + sc


def keep_for_density(n: int, block: int, target: float, causal: bool, sink_blocks: int = 1,
                     local_blocks: int = 1) -> float:
    """The largest nominal keep whose :func:`block_topk_density` does not exceed ``target``
    (bisection on the non-decreasing step function; BadInput below the forced-block floor)."""
    floor = float(block_topk_density(n, block, 1e-9, causal, sink_blocks, local_blocks))
    if target < floor - 1e-12:
        raise BadInput(f"density {target:.4g} is below block_topk's forced-block floor {floor:.4g} at {n} tokens",
                       "raise the budget or use a smaller block size")
    if float(block_topk_density(n, block, 1.0, causal, sink_blocks, local_blocks)) <= target + 1e-12:
        return 1.0
    lo, hi = 1e-9, 1.0  # density(lo) <= target < density(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(block_topk_density(n, block, mid, causal, sink_blocks, local_blocks)) <= target + 1e-12:
            lo = mid
        else:
            hi = mid
    return lo


def uniform_head_policy(profile: Profile, keep: float, *, head_budget: str = "uniform", scope: str = "layer",
                        k_min: float = 0.02, gamma: float = 1.0) -> Policy:
    """Every site ``block_topk`` at ``keep`` (evidence baseline). ``head_budget="hess"`` water-fills
    per-head keeps by HeSS with the same total: per site (``scope="layer"``) or over all heads of
    the model (``scope="model"``, which moves budget across layers at equal total compute)."""
    if scope not in ("layer", "model"):
        raise BadInput(f"scope={scope!r} is invalid", "use 'layer' or 'model'")
    bs = int(profile.settings["block_size"])
    base = {"block_size": bs, "sink_blocks": int(profile.settings.get("sink_blocks", 1)),
            "local_blocks": int(profile.settings.get("local_blocks", 1))}
    per_site: list[Optional[list[float]]] = [None] * len(profile.sites)
    if head_budget == "hess":
        n = int(profile.settings["seq_len"])
        floor = min(float(block_topk_density(n, bs, 0.0, s.causal, base["sink_blocks"], base["local_blocks"]))
                    for s in profile.sites)
        kmin = min(keep, max(k_min, floor))
        if scope == "layer":
            for i, s in enumerate(profile.sites):
                per_site[i] = [float(x) for x in np.round(water_fill(s.hess, keep * s.heads, kmin, 1.0, gamma), 6)]
        else:
            allh = np.concatenate([np.asarray(s.hess, dtype=np.float64) for s in profile.sites])
            ks = water_fill(allh, keep * allh.size, kmin, 1.0, gamma)
            pos = 0
            for i, s in enumerate(profile.sites):
                per_site[i] = [float(x) for x in np.round(ks[pos: pos + s.heads], 6)]
                pos += s.heads
    elif head_budget != "uniform":
        raise BadInput(f"head_budget={head_budget!r} is invalid", "use 'uniform' or 'hess'")
    sites = {}
    for i, s in enumerate(profile.sites):
        p = dict(base, keep=float(keep))
        if per_site[i] is not None:
            p["head_keep"] = [min(1.0, max(x, 1e-6)) for x in per_site[i]]
            p["keep"] = float(min(1.0, max(np.mean(p["head_keep"]), 1e-6)))
        sites[s.name] = SiteChoice(variant="block_topk", params=p, reason=f"evidence:{head_budget}/{scope}")
    return Policy(model_fingerprint=profile.model_fingerprint, budget=float(keep), source=f"evidence:{head_budget}",
                  sites=sites)


def first_k_policy(profile: Profile, k: int, keep: float) -> Policy:
    """Evidence baseline: the first ``k`` sites dense, every other site ``block_topk`` at ``keep``."""
    bs = int(profile.settings["block_size"])
    base = {"block_size": bs, "sink_blocks": int(profile.settings.get("sink_blocks", 1)),
            "local_blocks": int(profile.settings.get("local_blocks", 1))}
    sites = {}
    for i, s in enumerate(profile.sites):
        if i < k:
            sites[s.name] = SiteChoice(variant="dense", reason=f"evidence:first-{k}-full")
        else:
            sites[s.name] = SiteChoice(variant="block_topk", params=dict(base, keep=float(keep)),
                                       reason=f"evidence:first-{k}-full")
    return Policy(model_fingerprint=profile.model_fingerprint, source=f"evidence:first-{k}-full", sites=sites)


__all__ = ["DEFAULT_BUDGET_CAUSAL", "PlanOptions", "PlanResult", "block_topk_density", "coverage_at", "first_k_policy",
           "keep_for_density", "layer_scores", "min_budget", "plan", "plan_details", "predicted_error", "uniform_head_policy"]
