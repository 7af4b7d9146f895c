"""``plan``: a pure function (profile, budget, options) → policy. No model, no re-profiling.

The budget is the fraction of dense attention compute the whole model may spend (cost model
of :mod:`surgeon.profiles.solvers`: FULL = 1, SELECT = keep + select overhead, REUSE = keep,
averaged over sites).

Algorithm
---------
1. **Rollback (FULL) ranking** — per site, a score combining HyLRA's hash ratio ``hr_l``
   (fraction of blocks covering 90% of the mass, methods.md §2 step 1) and the measured layer
   sensitivity (loss increase when that layer alone runs sparse): [PROPOSED] the mean of
   ``hr_l / max hr`` and ``sens_l⁺ / max sens⁺`` (``layer_score="combined"``; "hash_ratio" or
   "sensitivity" use one of them).
2. **Keep and rollback count** — for each candidate keep κ, :func:`solvers.hylra_for_budget`
   runs the HyLRA DP over the profile's min-merged overlap matrix for every rollback count and
   returns the plan with the most FULL layers whose cost fits the budget. Among the candidate
   κ we pick the plan with the smallest *predicted error* [PROPOSED]:
   ``Σ_l w_l · miss_l`` with ``miss_l = 1 − cov_l(κ)`` for SELECT, ``1 − cov_l(κ)·O[a, l]`` for a
   layer reusing anchor a, 0 for FULL, where ``cov_l(κ)`` is the profiled attention mass the top
   κ of the key blocks cover (mean over heads) and ``w_l = sens_l⁺ / miss_l(κ_ref)`` scales the
   measured loss increase at the reference keep to other keeps (proportional model). Without
   sensitivities ``w_l = 1``. Ties prefer the larger κ.
3. **Per-head budgets (HeSS, methods.md §1)** — every SELECT anchor gets per-head keeps
   ``head_keep = water_fill(w, keep·H, κ_min, 1)`` with ``w_h = Σ_{l served by the anchor}
   HeSS_{l,h}``: a reusing layer attends with its anchor's block mask, so the anchor's head
   allocation serves the whole group. The mean keep per site stays κ, so the cost is unchanged.
4. **Policy** — FULL → ``dense``; SELECT → ``block_topk`` (keep, head_keep, block_size, sinks,
   local blocks); REUSE → ``reuse`` with ``block_mask_from`` = the anchor site. A layer the DP
   would let reuse a FULL anchor (which produces no block mask; only possible with a very tight
   C_max) becomes its own SELECT anchor and the plan is re-costed.
"""
from __future__ import annotations

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
    water_fill,
)

DEFAULT_BUDGET_CAUSAL = 0.15
# candidate keeps, as fractions of the budget (plus the profile's keep grid below the budget)
_KEEP_FRACTIONS = (0.98, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.4, 0.3, 0.2)


@dataclass(frozen=True)
class PlanOptions:
    """rho: HyLRA's share of sparse layers that may compute their own selection (C_max);
    head_budget: "hess" (water-filled per-head keeps) or "uniform"; k_min / gamma: water-filling
    bounds and exponent (methods.md §1 defaults); layer_score: rollback ranking ("combined",
    "hash_ratio", "sensitivity"); sink_blocks / local_blocks: block_topk's forced blocks (None: the
    profile's); keep_candidates: explicit κ candidates (None: derived from the budget);
    select_cost: SELECT overhead (None: 1/block_size², prefill); reuse: False forbids REUSE
    (every sparse layer selects its own blocks)."""

    rho: float = 0.3
    head_budget: str = "hess"
    k_min: float = 0.02
    gamma: float = 1.0
    layer_score: str = "combined"
    sink_blocks: Optional[int] = None
    local_blocks: Optional[int] = None
    keep_candidates: Optional[tuple[float, ...]] = None
    select_cost: Optional[float] = None
    reuse: bool = True

    def __post_init__(self) -> None:
        if self.head_budget not in ("hess", "uniform"):
            raise BadInput(f"head_budget={self.head_budget!r} is invalid", "use 'hess' or 'uniform'")
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


def coverage_at(profile: Profile, keep: float) -> np.ndarray:
    """Mean (over heads) attention mass covered by the top ``keep`` of the key blocks, per site
    [L], linearly interpolated on the profile's keep grid (coverage 0 at keep 0)."""
    grid = np.concatenate([[0.0], np.asarray(profile.settings["keep_grid"], dtype=np.float64)])
    out = []
    for s in profile.sites:
        c = np.asarray(s.coverage, dtype=np.float64).mean(axis=0)
        out.append(float(np.interp(keep, grid, np.concatenate([[0.0], c]))))
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
                    weights: Optional[np.ndarray] = None) -> float:
    """The [PROPOSED] planning objective Σ_l w_l · miss_l (see the module docstring)."""
    w = _weights(profile) if weights is None else weights
    cov = coverage_at(profile, keep)
    o = np.asarray(profile.overlap, dtype=np.float64)
    tot = 0.0
    for l, (r, a) in enumerate(zip(roles, cfg)):
        if r == ROLE_FULL:
            continue
        miss = 1.0 - cov[l] * (o[a, l] if r == ROLE_REUSE else 1.0)
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


def _head_keeps(profile: Profile, roles: list[str], cfg: list[int], keep: float,
                opts: PlanOptions) -> dict[int, list[float]]:
    """SELECT anchor index → water-filled per-head keeps (HeSS summed over the served group)."""
    out: dict[int, list[float]] = {}
    if opts.head_budget != "hess":
        return out
    L = len(roles)
    for a in range(L):
        if roles[a] != ROLE_SELECT:
            continue
        heads = profile.sites[a].heads
        w = np.asarray(profile.sites[a].hess, dtype=np.float64).copy()
        for l in range(a + 1, L):
            if cfg[l] != a:
                break
            if profile.sites[l].heads == heads:
                w += np.asarray(profile.sites[l].hess, dtype=np.float64)
        kmin = min(opts.k_min, keep)
        hk = water_fill(w, keep * heads, kmin, 1.0, opts.gamma)
        out[a] = [float(min(1.0, max(x, 1e-6))) for x in np.round(hk, 6)]
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
    bs = int(profile.settings["block_size"])
    sb = int(opts.sink_blocks if opts.sink_blocks is not None else profile.settings.get("sink_blocks", 1))
    lb = int(opts.local_blocks if opts.local_blocks is not None else profile.settings.get("local_blocks", 1))
    sc = float(opts.select_cost) if opts.select_cost is not None else select_overhead(bs, "prefill")
    source = f"plan:hylra+{opts.head_budget} (profile data {profile.data_fingerprint[:12]})"
    if b >= 1.0:
        pol = Policy(model_fingerprint=profile.model_fingerprint, budget=b, source=source,
                     sites={n: SiteChoice(variant="dense", reason="budget >= 1: dense") for n in names})
        return PlanResult(policy=pol, roles=[ROLE_FULL] * L, cfg=[-1] * L, keep=1.0, rollback=list(range(L)),
                          cost=1.0, predicted_error=0.0)
    o = np.asarray(profile.overlap, dtype=np.float64)
    if not opts.reuse:
        o = np.eye(L)  # nothing to reuse: every sparse layer selects (C_max is then irrelevant)
    score = layer_scores(profile, opts.layer_score)
    w = _weights(profile)
    cands: list[dict[str, Any]] = []
    best: Optional[tuple[float, float, list[str], list[int], list[int], float]] = None
    rho = 1.0 if not opts.reuse else opts.rho
    for keep in _candidates(b, profile, opts):
        try:
            res = hylra_for_budget(o, score, b, keep, rho, sc)
        except BadInput:
            cands.append({"keep": keep, "feasible": False})
            continue
        roles, cfg = _fix_full_anchors(res.plan.roles, res.plan.cfg)
        if not opts.reuse:
            roles = [ROLE_FULL if r == ROLE_FULL else ROLE_SELECT for r in roles]
            cfg = [-1] * L
        cost = policy_cost(roles, keep, sc)
        if cost > b + 1e-12:
            cands.append({"keep": keep, "feasible": False, "cost": float(cost)})
            continue
        err = predicted_error(profile, roles, cfg, keep, w)
        cands.append({"keep": keep, "feasible": True, "cost": float(cost), "rollback": len(res.plan.rollback),
                      "predicted_error": float(err)})
        if best is None or err < best[0] - 1e-12:
            best = (err, keep, roles, cfg, list(res.plan.rollback), cost)
    if best is None:
        raise BadInput(f"budget={b:.4g} is below the cheapest plan for this profile (try {min(1.0, 2 * b):.3g})",
                       "raise the budget")
    err, keep, roles, cfg, rollback, cost = best
    hk = _head_keeps(profile, roles, cfg, keep, opts)
    sites: dict[str, SiteChoice] = {}
    for l, n in enumerate(names):
        sp = profile.sites[l]
        why = f"hr={sp.hash_ratio:.3g}" + (f", sens={sp.sensitivity:.3g}" if sp.sensitivity is not None else "")
        if roles[l] == ROLE_FULL:
            sites[n] = SiteChoice(variant="dense", reason=f"hylra:full (rollback; {why})")
        elif roles[l] == ROLE_SELECT:
            params: dict[str, Any] = {"keep": keep, "block_size": bs, "sink_blocks": sb, "local_blocks": lb}
            if l in hk:
                params["head_keep"] = hk[l]
            sites[n] = SiteChoice(variant="block_topk", params=params,
                                  reason=f"hylra:select keep={keep:.4g}" + (" hess head_keep" if l in hk else "")
                                         + f" ({why})")
        else:
            a = cfg[l]
            sites[n] = SiteChoice(variant="reuse", params={"block_size": bs, "sink_blocks": sb, "local_blocks": lb},
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
        kmin = min(k_min, keep)
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


__all__ = ["DEFAULT_BUDGET_CAUSAL", "PlanOptions", "PlanResult", "coverage_at", "first_k_policy", "layer_scores",
           "plan", "plan_details", "predicted_error", "uniform_head_policy"]
