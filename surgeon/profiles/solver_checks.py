"""Shared pieces of the plan solvers: argument checks, the (min, sum) ordering, overlap stacks, roles.

Pure numpy helpers used by :mod:`surgeon.profiles.solvers` (HyLRA, cost model),
:mod:`surgeon.profiles.hess` (HeSS) and :mod:`surgeon.profiles.delta_layers` (DELTA).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import numpy.typing as npt

from surgeon.errors import BadInput

ArrayLike = npt.ArrayLike
Value = tuple[float, float]


# ceil() of products such as 10 * (1 - 0.7) = 3.0000000000000004 must give 3, not 4: the
# spec's counts (⌈L·(1−s)⌉, ⌈L·s·ρ⌉) are meant on exact decimals, so we subtract this slack.
CEIL_SLACK = 1e-9
# Tolerance used when comparing a cumulative mass fraction with the coverage target.
COVER_SLACK = 1e-12

ROLE_FULL = "full"
ROLE_SELECT = "select"
ROLE_REUSE = "reuse"
ROLE_PLANNER = "planner"
ROLE_SPARSE = "sparse"


def ceil_count(x: float) -> int:
    """⌈x⌉ that ignores float noise below ``CEIL_SLACK`` (10·(1−0.7) → 3)."""
    return int(math.ceil(x - CEIL_SLACK))


def finite_array(values: ArrayLike, name: str, *, min_ndim: int = 0) -> np.ndarray:
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BadInput(f"{name} is not numeric ({e})", f"pass a numeric array for {name}") from None
    if a.ndim < min_ndim:
        raise BadInput(f"{name} has {a.ndim} dimensions, expected at least {min_ndim}",
                       f"pass an array with at least {min_ndim} dimension(s)")
    if a.size == 0:
        raise BadInput(f"{name} is empty", f"pass a non-empty {name}")
    if not np.all(np.isfinite(a)):
        raise BadInput(f"{name} contains NaN or infinite values", f"clean {name} before planning")
    return a


def unit_interval(name: str, value: float, *, lo_open: bool = False) -> float:
    v = float(value)
    ok = (v > 0.0 if lo_open else v >= 0.0) and v <= 1.0 and not math.isnan(v)
    if not ok:
        rng = "(0, 1]" if lo_open else "[0, 1]"
        raise BadInput(f"{name}={value} is out of range", f"use a value in {rng}")
    return v


def layer_set(layers: Sequence[int], num_layers: int, name: str) -> list[int]:
    out: set[int] = set()
    for x in layers:
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
            raise BadInput(f"{name} contains {x!r}, not a layer index", "pass integer layer indices")
        if not 0 <= int(x) < num_layers:
            raise BadInput(f"{name} contains layer {int(x)} but the model has {num_layers} layers",
                           f"use indices in [0, {num_layers - 1}]")
        out.add(int(x))
    return sorted(out)


def lex_better(m1: float, s1: float, m2: float, s2: float) -> bool:
    """(m1, s1) > (m2, s2) lexicographically."""
    return m1 > m2 or (m1 == m2 and s1 > s2)


def lex_argmax_rows(m: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column-wise lexicographic argmax of (m, s) over axis 0; ties → smallest row.

    m, s: [R, C]. Returns (row index [C], best m [C], best s [C]).
    """
    bm = m.max(axis=0)
    cand = m == bm
    bs = np.where(cand, s, -np.inf).max(axis=0)
    arg = (cand & (s == bs)).argmax(axis=0)
    return arg, bm, bs


def overlap_stack(overlap: ArrayLike, name: str = "overlap") -> np.ndarray:
    """[L, L] or [S, L, L] → [S, L, L] (S calibration sets), validated to lie in [0, 1]."""
    o = finite_array(overlap, name, min_ndim=2)
    if o.ndim == 2:
        o = o[None]
    if o.ndim != 3 or o.shape[-1] != o.shape[-2]:
        raise BadInput(f"{name} has shape {list(o.shape)}, expected [L, L] or [S, L, L]",
                       "pass one square overlap matrix per calibration set")
    if o.min() < -1e-9 or o.max() > 1.0 + 1e-9:
        raise BadInput(f"{name} has values outside [0, 1] (min {o.min():.4g}, max {o.max():.4g})",
                       "overlaps are fractions |M_i ∩ M_j| / |M_j|; recompute them")
    return o


def apply_rollback(o: np.ndarray, rollback: Sequence[int]) -> np.ndarray:
    """Copy of ``o`` [..., L, L] with rollback rows/cols zeroed and the diagonal set to 1."""
    o = np.array(o, dtype=np.float64, copy=True)
    idx = list(rollback)
    if idx:
        o[..., idx, :] = 0.0
        o[..., :, idx] = 0.0
    n = o.shape[-1]
    o[..., np.arange(n), np.arange(n)] = 1.0
    return o
