"""HyLRA and the cost model: pure solvers used by the ``plan`` stage (methods.md §2).

Every function here is a pure, deterministic function of its arguments (numpy, float64): no
model, no torch, no I/O. The profiler produces the statistics; these solvers turn statistics
plus a budget into a per-layer / per-head policy, so that changing the budget never requires
re-profiling. The other solvers: :mod:`surgeon.profiles.hess` (HeSS water-filling, §1),
:mod:`surgeon.profiles.delta_layers` (DELTA, §3); shared checks in :mod:`surgeon.profiles.solver_checks`.

Contents
--------
HyLRA (methods.md §2, reference: UCM ``gsa_on_device/tools/main.py``)
    :func:`mass_fraction_needed`  per-step "hash ratio" (fraction of blocks covering 90% mass)
    :func:`iqr_clip_mean`         outlier clipping over steps, then mean
    :func:`layer_hash_ratio`      the two above composed into ``hr_l``
    :func:`rollback_layers`       the full-attention set R
    :func:`directed_overlap`      O[i, j] = mean_t |M_i ∩ M_j| / |M_j| from top-k block masks
    :func:`prepare_overlap`       zero rollback rows/cols, diagonal 1, merge over KV heads
    :func:`hylra_dp`              ``best_path_min_sum``: the (min, sum) dynamic program
    :func:`hylra_for_budget`      pick the rollback count so the policy fits a compute budget
Cost model
    :func:`select_overhead`, :func:`layer_cost`, :func:`policy_cost`
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np

from surgeon.errors import BadInput
from surgeon.profiles.solver_checks import (
    COVER_SLACK,
    ROLE_FULL,
    ROLE_PLANNER,
    ROLE_REUSE,
    ROLE_SELECT,
    ROLE_SPARSE,
    ArrayLike,
    Value,
    apply_rollback,
    ceil_count,
    finite_array,
    layer_set,
    lex_argmax_rows,
    overlap_stack,
    unit_interval,
)


def iqr_clip_mean(values: ArrayLike, axis: int = 0) -> np.ndarray:
    """Mean along ``axis`` after clipping to ``[Q1 − 1.5·IQR, Q3 + 1.5·IQR]``.

    Quartiles use numpy's default ``np.percentile`` method ("linear": the q-th percentile of n
    sorted values x_0..x_{n−1} is interpolated at fractional index (n−1)·q/100). Values outside
    the fence are clipped to it (not dropped), then all n values are averaged.

    values: [..., T, ...] with the T steps along ``axis``. Returns the array with ``axis``
    removed (a 0-d array for 1-D input), float64.
    """
    a = finite_array(values, "values", min_ndim=1)
    if not -a.ndim <= axis < a.ndim:
        raise BadInput(f"axis={axis} is out of range for an array with {a.ndim} dimensions",
                       f"use an axis in [{-a.ndim}, {a.ndim - 1}]")
    q1, q3 = np.percentile(a, [25.0, 75.0], axis=axis, keepdims=True)
    iqr = q3 - q1
    clipped = np.clip(a, q1 - 1.5 * iqr, q3 + 1.5 * iqr)
    return np.asarray(clipped.mean(axis=axis))


def mass_fraction_needed(block_mass: ArrayLike, coverage: float = 0.9) -> np.ndarray:
    """Smallest fraction of blocks whose (descending-sorted) mass covers ``coverage``.

    HyLRA's per-step hash ratio: ``b`` is sorted descending and normalised to sum 1;
    ``hr = (smallest m with Σ_{i≤m} b_(i) ≥ coverage) / #blocks``. A cumulative fraction within
    1e-12 below ``coverage`` counts as reaching it (float rounding of exact decimals).

    block_mass: [..., n_blocks] non-negative, each row with positive total. Returns [...] in
    (0, 1], float64 (a 0-d array for 1-D input).
    """
    m = finite_array(block_mass, "block_mass", min_ndim=1)
    cov = unit_interval("coverage", coverage, lo_open=True)
    if m.min() < 0:
        raise BadInput("block_mass has negative entries", "pass attention mass (probabilities) per block")
    tot = m.sum(axis=-1, keepdims=True)
    if np.any(tot <= 0):
        raise BadInput("a row of block_mass sums to 0", "every step/layer/head needs some attention mass")
    nb = m.shape[-1]
    srt = -np.sort(-m, axis=-1)
    cum = np.cumsum(srt / tot, axis=-1)
    needed = np.minimum((cum < cov - COVER_SLACK).sum(axis=-1) + 1, nb)
    return np.asarray(needed / nb, dtype=np.float64)


def layer_hash_ratio(block_mass: ArrayLike, coverage: float = 0.9) -> np.ndarray:
    """Per-layer sensitivity ``hr_l`` (methods.md §2 step 1).

    block_mass: [T, L, G, n_blocks] — for decode step t, layer l, KV head g, the attention mass
    the grouped query heads put on each block of C tokens. Per (l, g): hash ratio per step
    (:func:`mass_fraction_needed`), IQR-clipped mean over the T steps (:func:`iqr_clip_mean`),
    then mean over the G KV heads. Returns hr: [L].
    """
    m = finite_array(block_mass, "block_mass")
    if m.ndim != 4:
        raise BadInput(f"block_mass has shape {list(m.shape)}, expected [T, L, G, n_blocks]",
                       "stack the per-step block masses as [steps, layers, kv_heads, blocks]")
    hr = mass_fraction_needed(m, coverage)  # [T, L, G]
    return np.asarray(iqr_clip_mean(hr, axis=0).mean(axis=-1))


def rollback_count(num_layers: int, sparsity: float) -> int:
    """|R| = ⌈L·(1 − s)⌉ (float noise ignored), clamped to [0, L]."""
    s = unit_interval("sparsity", sparsity)
    return min(max(ceil_count(num_layers * (1.0 - s)), 0), num_layers)


def _top_layers(hr: np.ndarray, count: int) -> list[int]:
    order = np.argsort(-hr, kind="stable")  # descending hr, ties → smaller index first
    return sorted(int(i) for i in order[:count])


def rollback_layers(hr_per_layer: ArrayLike, sparsity: float) -> list[int]:
    """Full-attention ("rollback") set R: the ⌈L·(1−s)⌉ layers with the largest ``hr``.

    Ties are broken by the smaller layer index. hr_per_layer: [L]. Returns sorted indices.
    Example: L = 61, s = 0.91 → 6 layers.
    """
    hr = finite_array(hr_per_layer, "hr_per_layer", min_ndim=1)
    if hr.ndim != 1:
        raise BadInput(f"hr_per_layer has shape {list(hr.shape)}, expected [L]", "pass one value per layer")
    return _top_layers(hr, rollback_count(hr.shape[0], sparsity))


def directed_overlap(masks: ArrayLike) -> np.ndarray:
    """Directed inter-layer overlap of top-k block selections.

    masks: [T, L, G, n_blocks] bool — top-k block mask of layer l, KV head g at step t (sink
    and recent blocks already forced in). For i < j: ``O[g, i, j] = mean_t |M_i ∩ M_j| / |M_j|``
    (how much of layer j's needed set layer i's selection covers); ``O[g, i, i] = 1``; the
    lower triangle (never read by the DP) is 0. Returns O: [G, L, L] float64.
    """
    m = np.asarray(masks)
    if m.ndim != 4 or m.size == 0:
        raise BadInput(f"masks has shape {list(m.shape)}, expected non-empty [T, L, G, n_blocks]",
                       "stack the per-step top-k masks as [steps, layers, kv_heads, blocks]")
    if m.dtype != np.bool_:
        if not np.all((m == 0) | (m == 1)):
            raise BadInput("masks must be boolean (0/1)", "pass the top-k selection masks")
        m = m.astype(np.bool_)
    sizes = m.sum(axis=-1)  # [T, L, G]
    if np.any(sizes == 0):
        raise BadInput("a top-k mask selects no block", "select at least one block per step/layer/head")
    mf = m.astype(np.float64)
    inter = np.einsum("tigb,tjgb->tgij", mf, mf)  # [T, G, L, L]
    frac = inter / np.transpose(sizes, (0, 2, 1))[:, :, None, :]  # divide by |M_j|
    o = frac.mean(axis=0)
    n = o.shape[-1]
    o = np.triu(o, k=1)
    o[:, np.arange(n), np.arange(n)] = 1.0
    return o


def prepare_overlap(O_list: ArrayLike, rollback: Sequence[int], merge: Literal["min", "mean"] = "min") -> np.ndarray:
    """Post-process per-KV-head overlap matrices for the DP.

    Sets ``O[r, :] = O[:, r] = 0`` for every r in ``rollback``, restores the diagonal to 1, and
    merges over KV heads by ``min`` (conservative, GQA) or ``mean`` (MLA). The two steps commute.

    O_list: [L, L] (one head), [G, L, L] (G KV heads) or [S, G, L, L] (S calibration sets).
    Returns [L, L] for the first two forms, [S, L, L] for the last (the DP's vector values).
    """
    o = finite_array(O_list, "O_list", min_ndim=2)
    if o.ndim == 2:
        o = o[None]
    if o.ndim not in (3, 4) or o.shape[-1] != o.shape[-2]:
        raise BadInput(f"O_list has shape {list(o.shape)}, expected [L, L], [G, L, L] or [S, G, L, L]",
                       "pass square per-head overlap matrices")
    if o.min() < -1e-9 or o.max() > 1.0 + 1e-9:
        raise BadInput(f"O_list has values outside [0, 1] (min {o.min():.4g}, max {o.max():.4g})",
                       "overlaps are fractions |M_i ∩ M_j| / |M_j|; recompute them")
    if merge not in ("min", "mean"):
        raise BadInput(f"merge={merge!r} is not supported", "use merge='min' or merge='mean'")
    rb = layer_set(rollback, o.shape[-1], "rollback")
    o = apply_rollback(o, rb)
    merged = o.min(axis=-3) if merge == "min" else o.mean(axis=-3)
    n = merged.shape[-1]
    merged[..., np.arange(n), np.arange(n)] = 1.0
    return merged


@dataclass(frozen=True)
class HylraPlan:
    """Result of :func:`hylra_dp`.

    cfg[l] = −1 if layer l is an anchor (computes its own indices: FULL if l ∈ rollback, else
    SELECT), otherwise the anchor index whose block indices layer l reuses (REUSE).
    ``value`` = (min overlap, sum of overlaps) along the chosen path, summed over calibration
    sets for the second entry; ``c_max`` is the constraint on new anchors opened after layer 0.
    """

    cfg: list[int]
    anchors: list[int]
    value: Value
    c_max: int
    rollback: list[int] = field(default_factory=list)

    @property
    def roles(self) -> list[str]:
        """Per-layer policy: "full", "select" or "reuse"."""
        rb = set(self.rollback)
        return [
            (ROLE_FULL if l in rb else ROLE_SELECT) if a == -1 else ROLE_REUSE
            for l, a in enumerate(self.cfg)
        ]

    @property
    def new_anchors(self) -> int:
        """c: anchors opened after layer 0 (the quantity bounded by ``c_max``)."""
        return len(self.anchors) - 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "cfg": list(self.cfg),
            "anchors": list(self.anchors),
            "value": {"min": self.value[0], "sum": self.value[1]},
            "c_max": self.c_max,
            "rollback": list(self.rollback),
            "roles": self.roles,
        }


def hylra_c_max(num_layers: int, sparsity: float, rho: float, n_rollback: int) -> int:
    """C_max = ⌈L·s·ρ⌉ + |R| (float noise ignored)."""
    s = unit_interval("sparsity", sparsity)
    r = unit_interval("rho", rho)
    return ceil_count(num_layers * s * r) + int(n_rollback)


def hylra_dp(
    O: ArrayLike,
    rollback: Sequence[int],
    sparsity: float,
    rho: float = 0.3,
    c_max: Optional[int] = None,
    *,
    force_rollback_anchors: bool = True,
) -> HylraPlan:
    """HyLRA offline DP (UCM ``best_path_min_sum``), methods.md §2 step 3.

    O: [L, L] or [S, L, L] (S calibration sets), as returned by :func:`prepare_overlap`; only
    the diagonal and the upper triangle (O[a, j], a < j) are read. Rollback rows/columns are
    zeroed and the diagonal set to 1 again here (idempotent), so a merged but un-zeroed O works.

    State ``dp[j][a][c]``: layer j served by anchor a ≤ j (a = j: j computes its own indices),
    c = new anchors opened after layer 0. Value (m, σ); a step with value vector v adds
    ``(min_k v_k, Σ_k v_k)`` via ``(m, σ) ⊕ v = (min(m, ·), σ + ·)``; comparison is
    lexicographic maximisation. Init ``dp[0][0][0] = (min_k O_k[0,0], Σ_k O_k[0,0])``.
    Transitions for j ≥ 1: reuse ``dp[j][a][c] ← dp[j−1][a][c] ⊕ O[a, j]`` (a < j); open
    ``dp[j][j][c] ← max_{a'<j} dp[j−1][a'][c−1] ⊕ O[j, j]`` (c ≥ 1). Constraint
    ``c ≤ C_max = ⌈L·s·ρ⌉ + |R|`` unless ``c_max`` is given. Answer: best ``dp[L−1][a][c]``.

    Deterministic ties: the open transition prefers the smallest a'; the final answer prefers
    the smallest c, then the smallest a.

    ``force_rollback_anchors`` (default True, an addition to the spec): forbid the reuse
    transition at rollback layers, so a FULL layer can never be labelled REUSE. The spec relies on
    the zeroed rows making this automatic, which holds whenever C_max leaves room; with a tight
    C_max the plain spec could return a path whose min is 0 and which reuses at a rollback layer.
    Pass False for the spec's DP exactly.
    """
    o = overlap_stack(O, "O")
    L = o.shape[-1]
    rb = layer_set(rollback, L, "rollback")
    if c_max is None:
        cmax = hylra_c_max(L, sparsity, rho, len(rb))
    else:
        unit_interval("sparsity", sparsity)
        unit_interval("rho", rho)
        if isinstance(c_max, bool) or not isinstance(c_max, (int, np.integer)) or c_max < 0:
            raise BadInput(f"c_max={c_max!r} is not a non-negative integer", "pass c_max >= 0 or None")
        cmax = int(c_max)
    if force_rollback_anchors:
        need = sum(1 for r in rb if r > 0)
        if need > cmax:
            raise BadInput(f"c_max={cmax} cannot make all {need} rollback layers after layer 0 anchors",
                           "raise c_max (or rho) or pass force_rollback_anchors=False")
    o = apply_rollback(o, rb)
    vmin = o.min(axis=0)  # [L, L]
    vsum = o.sum(axis=0)
    C = min(cmax, L - 1)  # more than L−1 new anchors is impossible: same feasible set
    neg = -np.inf
    M = np.full((L, C + 1), neg)
    S = np.full((L, C + 1), neg)
    M[0, 0] = vmin[0, 0]
    S[0, 0] = vsum[0, 0]
    parent = np.full((L, C + 1), -1, dtype=np.int64)  # parent[j, c]: a' before opening at j
    rbset = set(rb)
    for j in range(1, L):
        nM = np.full_like(M, neg)
        nS = np.full_like(S, neg)
        if not (force_rollback_anchors and j in rbset):
            nM[:j] = np.minimum(M[:j], vmin[:j, j, None])
            nS[:j] = S[:j] + vsum[:j, j, None]
        if C >= 1:
            arg, bm, bs = lex_argmax_rows(M[:j, :C], S[:j, :C])
            ok = bm > neg
            nM[j, 1:] = np.where(ok, np.minimum(bm, vmin[j, j]), neg)
            nS[j, 1:] = np.where(ok, bs + vsum[j, j], neg)
            parent[j, 1:] = np.where(ok, arg, -1)
        M, S = nM, nS
    # final: iterate c ascending, then a ascending → first lexicographic maximum
    arg, _, _ = lex_argmax_rows(M.T.reshape(-1, 1), S.T.reshape(-1, 1))
    c, a = divmod(int(arg[0]), L)
    if not M[a, c] > neg:
        raise BadInput("no HyLRA policy satisfies the constraints", "raise c_max or rho")
    value = (float(M[a, c]), float(S[a, c]))
    cfg = [0] * L
    anchors = [0]
    for j in range(L - 1, 0, -1):
        if a == j:
            cfg[j] = -1
            anchors.append(j)
            a = int(parent[j, c])
            c -= 1
        else:
            cfg[j] = a
    cfg[0] = -1
    return HylraPlan(cfg=cfg, anchors=sorted(anchors), value=value, c_max=cmax, rollback=rb)


def evaluate_cfg(O: ArrayLike, cfg: Sequence[int]) -> Value:
    """(min, sum) objective of a policy vector on O ([L, L] or [S, L, L]), as the DP scores it.

    Anchors contribute O[l, l]; a reusing layer l contributes O[cfg[l], l]; the min is over
    layers and calibration sets, the sum over both. Raises BadInput if ``cfg`` is not a valid
    contiguous-reuse policy (layer 0 an anchor; a layer reusing a has its predecessor served by a).
    """
    o = overlap_stack(O, "O")
    L = o.shape[-1]
    if len(cfg) != L:
        raise BadInput(f"cfg has {len(cfg)} entries for {L} layers", "pass one entry per layer")
    serving = []
    for l, a in enumerate(cfg):
        a = int(a)
        if a == -1:
            serving.append(l)
            continue
        if l == 0 or not 0 <= a < l or serving[l - 1] != a:
            raise BadInput(f"cfg[{l}]={a} is not a valid reuse", "a layer may reuse the anchor serving its predecessor")
        serving.append(a)
    vals = np.stack([o[:, serving[l], l] for l in range(L)], axis=-1)  # [S, L]
    return float(vals.min()), float(vals.sum())


def select_overhead(block_size: int = 64, mode: Literal["prefill", "decode"] = "prefill") -> float:
    """Cost of computing a layer's own block selection, as a fraction of dense attention.

    Dense attention costs ~N²·(d + d_v) multiply-adds (QKᵀ and PV). Block scores from mean-pooled
    Q and K cost (N/B)²·d in prefill → (1/2)/B² of dense for d = d_v; a decode query scores N/B
    pooled keys against N·(d + d_v) for dense → (1/2)/B. We drop the 1/2 to cover pooling and the
    top-k sort, giving 1/B² (prefill) and 1/B (decode). UCM's 128-bit hash scoring scans every
    key (≈ 1/d per decode step), so pass an explicit cost for that kernel.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise BadInput(f"block_size={block_size!r} is not a positive integer", "pass e.g. 64")
    if mode == "prefill":
        return 1.0 / float(block_size) ** 2
    if mode == "decode":
        return 1.0 / float(block_size)
    raise BadInput(f"mode={mode!r} is not supported", "use 'prefill' or 'decode'")


DEFAULT_SELECT_COST = 1.0 / 64.0 ** 2  # select_overhead(64, "prefill")


def layer_cost(role: str, keep: float, select_cost: float = DEFAULT_SELECT_COST) -> float:
    """Cost of one layer as a fraction of its dense attention compute.

    full = 1; select = keep + select_cost; reuse = keep (HyLRA); planner (DELTA Δ-layer: dense
    attention plus page scoring) = 1 + select_cost; sparse (DELTA) = keep.
    """
    k = unit_interval("keep", keep)
    sc = float(select_cost)
    if not (sc >= 0 and math.isfinite(sc)):
        raise BadInput(f"select_cost={select_cost} is invalid", "pass a finite value >= 0")
    table = {
        ROLE_FULL: 1.0,
        ROLE_SELECT: k + sc,
        ROLE_REUSE: k,
        ROLE_PLANNER: 1.0 + sc,
        ROLE_SPARSE: k,
    }
    if role not in table:
        raise BadInput(f"unknown layer role {role!r}", f"use one of {sorted(table)}")
    return table[role]


def _keep_vector(keep: Union[float, ArrayLike], L: int) -> np.ndarray:
    kv = finite_array(keep, "keep")
    if kv.ndim == 0:
        kv = np.full(L, float(kv))
    if kv.shape != (L,):
        raise BadInput(f"keep has shape {list(kv.shape)}, expected a scalar or [{L}]",
                       "pass one keep ratio, or one per layer")
    if kv.min() < 0 or kv.max() > 1:
        raise BadInput("keep ratios must lie in [0, 1]", "pass fractions of blocks kept")
    return kv


def policy_cost(roles: Sequence[str], keep: Union[float, ArrayLike], select_cost: float = DEFAULT_SELECT_COST) -> float:
    """Mean over layers of :func:`layer_cost` (layers weighted equally: same shape per layer).

    roles: [L] strings; keep: scalar or [L] per-layer keep ratios. Returns the policy's
    attention compute as a fraction of dense attention compute.
    """
    L = len(roles)
    if L == 0:
        raise BadInput("roles is empty", "pass one role per layer")
    kv = _keep_vector(keep, L)
    return float(sum(layer_cost(r, float(k), select_cost) for r, k in zip(roles, kv)) / L)


@dataclass(frozen=True)
class HylraBudgetResult:
    """Result of :func:`hylra_for_budget`: the chosen plan, its sparsity s = 1 − |R|/L, its
    cost, and the (rollback count, cost) of every candidate that was solved."""

    plan: HylraPlan
    sparsity: float
    cost: float
    tried: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "sparsity": self.sparsity, "cost": self.cost,
                "tried": [dict(t) for t in self.tried]}


def hylra_for_budget(
    O: ArrayLike,
    hr: ArrayLike,
    budget: float,
    keep: Union[float, ArrayLike],
    rho: float = 0.3,
    select_cost: float = DEFAULT_SELECT_COST,
    *,
    force_rollback_anchors: bool = True,
) -> HylraBudgetResult:
    """Choose the rollback count (hence sparsity) so that the HyLRA policy costs ≤ ``budget``.

    O: merged overlap [L, L] or [S, L, L] (rollback zeroing is applied per candidate); hr: [L];
    budget: allowed attention compute as a fraction of dense; keep: scalar or [L].

    Search: for r = 0, 1, …, L the rollback set is the r layers with the largest hr, the
    sparsity is s = 1 − r/L (so ⌈L·(1−s)⌉ = r) and the plan is :func:`hylra_dp` with the
    default C_max = ⌈L·s·ρ⌉ + r. Among candidates with cost ≤ budget we return the one with the
    largest r: the rollback layers are the most sensitive ones, so spending budget on dense
    attention there is HyLRA's accuracy lever. Cost is not monotone in r (the number of SELECT
    anchors varies), so every r is solved until the lower bound "R full, all others reuse"
    (non-decreasing in r because the sets are nested) exceeds the budget (with
    ``force_rollback_anchors=False`` a rollback layer may be REUSE, so no r is pruned).
    """
    o = overlap_stack(O, "O")
    L = o.shape[-1]
    h = finite_array(hr, "hr", min_ndim=1)
    if h.shape != (L,):
        raise BadInput(f"hr has shape {list(h.shape)}, expected [{L}]", "pass one hash ratio per layer")
    b = float(budget)
    if not (b > 0 and math.isfinite(b)):
        raise BadInput(f"budget={budget} is invalid", "pass a positive fraction of dense compute")
    kv = _keep_vector(keep, L)
    order = [int(i) for i in np.argsort(-h, kind="stable")]
    tried: list[dict[str, Any]] = []
    best: Optional[tuple[HylraPlan, float, float]] = None
    min_cost = math.inf
    for r in range(L + 1):
        rb = sorted(order[:r])
        # lower bound: R full, every other layer reuse (without forcing, R may reuse too)
        lb = (r + float(np.delete(kv, rb).sum())) / L if force_rollback_anchors else float(kv.sum()) / L
        if lb > b + 1e-12:
            min_cost = min(min_cost, lb)
            break
        s = 1.0 - r / L
        plan = hylra_dp(o, rb, s, rho, force_rollback_anchors=force_rollback_anchors)
        cost = policy_cost(plan.roles, kv, select_cost)
        tried.append({"rollback_count": r, "cost": cost})
        min_cost = min(min_cost, cost)
        if cost <= b + 1e-12:
            best = (plan, s, cost)
    if best is None:
        raise BadInput(f"budget={b:.4g} is below the cheapest HyLRA policy (cost {min_cost:.4g} with keep given)",
                       "raise the budget or lower keep")
    plan, s, cost = best
    return HylraBudgetResult(plan=plan, sparsity=s, cost=cost, tried=tried)


__all__ = [
    "HylraBudgetResult",
    "HylraPlan",
    "directed_overlap",
    "evaluate_cfg",
    "hylra_c_max",
    "hylra_dp",
    "hylra_for_budget",
    "iqr_clip_mean",
    "layer_cost",
    "layer_hash_ratio",
    "mass_fraction_needed",
    "policy_cost",
    "prepare_overlap",
    "rollback_count",
    "rollback_layers",
    "select_overhead",
]
