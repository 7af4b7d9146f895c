"""HeSS water-filling (methods.md §1, [PROPOSED] reallocation): per-head budgets
κ_h = clip(λ·w_h, κ_min, κ_max) with Σκ = B.

A pure, deterministic function of its arguments (numpy, float64), like every plan solver.
"""
from __future__ import annotations

import math

import numpy as np

from surgeon.errors import BadInput
from surgeon.profiles.solver_checks import ArrayLike, finite_array


def water_fill(
    scores: ArrayLike,
    total: float,
    k_min: float,
    k_max: float = 1.0,
    gamma: float = 1.0,
) -> np.ndarray:
    """HeSS budget reallocation [PROPOSED in methods.md §1]: κ_h = clip(B·w_h/Σw, κ_min, κ_max)
    with the clipped excess/deficit redistributed over the unclipped heads until convergence.

    The converged water-filling is exactly ``κ_h = clip(λ·w_h, κ_min, κ_max)`` with the unique
    level λ for which Σκ = B; we compute λ in closed form (sort the breakpoints κ_min/w_h and
    κ_max/w_h, find the segment where the piecewise-linear Σκ(λ) crosses B, solve it) and then set
    the unclipped heads to ``(B − clipped total)·w_h / Σ_free w`` so they are exactly proportional
    to w (the KKT condition of max Σ w log κ-style allocations) and Σκ = B up to rounding.

    scores: any shape (e.g. [L, H]), HeSS_h; weights w_h = max(score, 0)^γ. Heads with w_h = 0
    (zero/negative score) sit at κ_min; if B exceeds what the positive heads can absorb at κ_max,
    the remainder is spread uniformly over the zero-weight heads (all-zero scores → uniform B/n).
    Equal scores → uniform B/n. total: B = Σκ (e.g. κ·H for uniform keep κ). Raises BadInput when
    B < n·κ_min or B > n·κ_max. Returns κ with the shape of ``scores``, float64.
    """
    s = finite_array(scores, "scores")
    shape = s.shape
    s = s.ravel()
    n = s.size
    lo, hi = float(k_min), float(k_max)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi):
        raise BadInput(f"k_min={k_min}, k_max={k_max} are invalid", "need 0 <= k_min <= k_max (finite)")
    g = float(gamma)
    if not (g >= 0 and math.isfinite(g)):
        raise BadInput(f"gamma={gamma} is invalid", "pass a finite gamma >= 0")
    B = float(total)
    tol = 1e-9 * max(1.0, abs(B))
    if not math.isfinite(B) or B < n * lo - tol or B > n * hi + tol:
        raise BadInput(
            f"total={total} is infeasible for {n} heads with keep in [{lo}, {hi}] (needs {n * lo:.6g} <= total <= {n * hi:.6g})",
            "change the total budget or the k_min/k_max bounds",
        )
    B = min(max(B, n * lo), n * hi)
    w = np.where(s > 0, np.power(np.maximum(s, 0.0), g), 0.0)
    pos = w > 0
    out = np.full(n, lo)
    n_pos, n_zero = int(pos.sum()), int(n - pos.sum())
    if n_pos == 0:
        return np.full(shape, B / n)
    target = B - n_zero * lo  # what the positive-weight heads must hold
    if target >= n_pos * hi:
        out[pos] = hi
        if n_zero:
            out[~pos] = min(max((B - n_pos * hi) / n_zero, lo), hi)
        return out.reshape(shape)
    if hi == lo:
        return np.full(shape, lo)
    wp = w[pos]
    lam = _water_level(wp, target, lo, hi)
    raw = lam * wp
    at_lo = raw <= lo
    at_hi = raw >= hi
    free = ~(at_lo | at_hi)
    kp = np.where(at_lo, lo, np.where(at_hi, hi, raw))
    if free.any():
        rem = target - lo * at_lo.sum() - hi * at_hi.sum()
        kp[free] = np.clip(rem * wp[free] / wp[free].sum(), lo, hi)
    out[pos] = kp
    return out.reshape(shape)


def _water_level(w: np.ndarray, target: float, lo: float, hi: float) -> float:
    """λ with Σ clip(λ·w, lo, hi) = target, for w > 0 and n·lo <= target < n·hi."""
    ws = np.sort(w)
    csum = np.concatenate([[0.0], np.cumsum(ws)])
    n = ws.size

    def f(lam: np.ndarray) -> np.ndarray:
        """Σ clip(λ·w, lo, hi) for an array of λ ≥ 0 (vectorised over λ)."""
        lam = np.asarray(lam, dtype=np.float64)
        pos = lam > 0
        safe = np.where(pos, lam, 1.0)
        n_lo = np.where(pos, np.searchsorted(ws, lo / safe, side="right"), n)  # λw <= lo
        n_hi = np.where(pos, n - np.searchsorted(ws, hi / safe, side="left"), 0)  # λw >= hi
        mid = csum[n - n_hi] - csum[n_lo]
        return lo * n_lo + hi * n_hi + np.where(pos, lam, 0.0) * mid

    bps = np.unique(np.concatenate([lo / ws, hi / ws]))
    vals = np.maximum.accumulate(f(bps))  # f is non-decreasing; remove rounding wiggles
    k = int(np.searchsorted(vals, target, side="left"))  # first breakpoint with f >= target
    if k < bps.size and vals[k] == target:
        return float(bps[k])
    if k == 0:  # only reachable through rounding: target ≈ n·lo = f(first breakpoint)
        return float(bps[0])
    a, b = float(bps[k - 1]), float(bps[min(k, bps.size - 1)])
    # f is linear on [a, b]: f(λ) = lo·n_lo + hi·n_hi + λ·(Σ of w free on that segment)
    mid_l = 0.5 * (a + b)
    n_lo = int(np.searchsorted(ws, lo / mid_l, side="right"))
    n_hi = n - int(np.searchsorted(ws, hi / mid_l, side="left"))
    slope = csum[n - n_hi] - csum[n_lo]
    if slope <= 0:
        return b
    return float((target - lo * n_lo - hi * n_hi) / slope)
