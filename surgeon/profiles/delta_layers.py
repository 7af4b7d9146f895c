"""DELTA layouts (methods.md §3): full / planner (Δ-layer) / sparse roles, their (min, sum)
overlap objective, and the [PROPOSED] choice of ``full_cache_layers`` from calibration scores.

Pure, deterministic functions of their arguments (numpy, float64), like every plan solver.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from surgeon.errors import BadInput
from surgeon.profiles.solver_checks import (
    ROLE_FULL,
    ROLE_PLANNER,
    ROLE_SPARSE,
    ArrayLike,
    Value,
    finite_array,
    layer_set,
    lex_argmax_rows,
    overlap_stack,
)


def delta_groups(num_layers: int, full_cache_layers: Sequence[int]) -> list[dict[str, Any]]:
    """DELTA layer groups (methods.md §3) from ``full_cache_layers`` F.

    For layer i: i ∈ F and i+1 ∈ F → "full"; i ∈ F and i+1 ∉ F → "planner" (Δ-layer: full
    attention plus page selection); i ∉ F → "sparse", reading the page subset of the most
    recent planner (``source``). Returns ``[{"layer": i, "role": ..., "source": int | None}]``
    (source is None for full and planner layers). Raises BadInput if a sparse layer has no
    planner before it (layer 0 ∉ F).
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise BadInput(f"num_layers={num_layers!r} is not a positive integer", "pass the model's layer count")
    L = int(num_layers)
    F = set(layer_set(full_cache_layers, L, "full_cache_layers"))
    out: list[dict[str, Any]] = []
    last_planner: Optional[int] = None
    for i in range(L):
        if i in F:
            role = ROLE_FULL if (i + 1) in F else ROLE_PLANNER
            if role == ROLE_PLANNER:
                last_planner = i
            out.append({"layer": i, "role": role, "source": None})
        else:
            if last_planner is None:
                raise BadInput(f"layer {i} is sparse but no Δ-layer precedes it",
                               "include layer 0 (and the first planner) in full_cache_layers")
            out.append({"layer": i, "role": ROLE_SPARSE, "source": last_planner})
    return out


def delta_coverage(overlap: ArrayLike, full_cache_layers: Sequence[int]) -> Value:
    """(min, sum) over sparse layers j of ``O[planner(j), j]`` (min/sum also over calibration
    sets), the objective :func:`choose_delta_layers` maximises for 2-D scores.

    overlap: [L, L] or [S, L, L] directed overlaps (O[i, j], i < j). With no sparse layer the
    value is (+inf, 0).
    """
    o = overlap_stack(overlap, "overlap")
    groups = delta_groups(o.shape[-1], full_cache_layers)
    m, s = math.inf, 0.0
    for g in groups:
        if g["role"] == ROLE_SPARSE:
            v = o[:, g["source"], g["layer"]]
            m = min(m, float(v.min()))
            s += float(v.sum())
    return m, s


def choose_delta_layers(
    layer_scores: ArrayLike,
    n_planners: int,
    n_full_initial: int = 2,
) -> list[int]:
    """Choose DELTA's ``full_cache_layers`` [PROPOSED; the DELTA repo hard-codes F per model].

    Layers 0..n_full_initial−1 are full and layer ``n_full_initial`` is the first planner (the
    repo's default F = {0, 1, 2, 14, 22} has n_full_initial = 2). The other n_planners − 1
    planners p must satisfy p ≥ n_full_initial + 2 and pairwise gaps ≥ 2 (a planner's successor
    must be outside F, or it would turn into a full layer). Two proposals, both solved exactly
    by dynamic programming:

    * layer_scores [L] (per-layer sensitivity, e.g. HyLRA's hr or a HeSS-style score): planners
      run dense attention, so put them on the most sensitive layers — maximise the sum of the
      chosen planners' scores. Ties prefer earlier layers.
    * layer_scores [L, L] or [S, L, L] (directed top-k overlap, see :func:`directed_overlap`):
      place planners where the overlap with the previous planner's selection drops — maximise
      :func:`delta_coverage` (min over sparse layers of O[planner(j), j], then the sum),
      lexicographically, as HyLRA's DP does.

    Returns F as a sorted list (feed it to :func:`delta_groups`).
    """
    a = finite_array(layer_scores, "layer_scores", min_ndim=1)
    L = a.shape[-1]
    for nm, v, lo in (("n_planners", n_planners, 1), ("n_full_initial", n_full_initial, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise BadInput(f"{nm}={v!r} is invalid", f"pass an integer >= {lo}")
    n0, P = int(n_full_initial), int(n_planners)
    if n0 >= L:
        raise BadInput(f"n_full_initial={n0} leaves no planner in {L} layers", f"use n_full_initial < {L}")
    start = n0 + 2
    room = max(0, L - start)
    if P - 1 > (room + 1) // 2:
        raise BadInput(f"{P} planners do not fit in {L} layers with {n0} initial full layers (planners cannot be adjacent)",
                       "lower n_planners or n_full_initial")
    base = list(range(n0 + 1))
    if P == 1:
        return base
    if a.ndim == 1:
        extra = _choose_by_score(a, P - 1, start)
    else:
        o = overlap_stack(a, "layer_scores")
        extra = _choose_by_overlap(o, P, n0)
    return base + extra


def _choose_by_score(score: np.ndarray, k: int, start: int) -> list[int]:
    """k pairwise non-adjacent layers in [start, L) maximising Σ score; ties → earlier layers."""
    L = score.size
    neg = -np.inf
    # h[i, c]: best sum using layers in [start, start + i) with c chosen (i = 0..L−start).
    m = L - start
    h = np.full((m + 1, k + 1), neg)
    h[0, 0] = 0.0
    if m >= 1:
        h[1, 0] = 0.0
        h[1, 1] = score[start] if k >= 1 else neg
    for i in range(2, m + 1):
        take = np.full(k + 1, neg)
        take[1:] = h[i - 2, :k] + score[start + i - 1]
        h[i] = np.maximum(h[i - 1], take)
    chosen: list[int] = []
    i, c = m, k
    while c > 0:
        # skip layer start+i−1 when that is as good (prefers earlier layers on ties)
        if h[i - 1, c] == h[i, c]:
            i -= 1
            continue
        chosen.append(start + i - 1)
        i, c = i - 2, c - 1
    return sorted(chosen)


def _choose_by_overlap(o: np.ndarray, P: int, n0: int) -> list[int]:
    """Planner placement maximising lexicographic (min, sum) coverage; see choose_delta_layers."""
    L = o.shape[-1]
    vmin, vsum = o.min(axis=0), o.sum(axis=0)
    neg = -np.inf
    M = np.full((L, P + 1), neg)  # [current planner a, planners used c]
    S = np.full((L, P + 1), neg)
    M[n0, 1] = np.inf  # min over no sparse layer yet
    S[n0, 1] = 0.0
    parent = np.full((L, P + 1), -1, dtype=np.int64)
    for j in range(n0 + 1, L):
        nM = np.full_like(M, neg)
        nS = np.full_like(S, neg)
        nM[:j] = np.minimum(M[:j], vmin[:j, j, None])  # j sparse, served by a
        nS[:j] = S[:j] + vsum[:j, j, None]
        if j - 1 > n0:  # j planner: predecessor must be sparse (a < j−1), planners unchanged value
            arg, bm, bs = lex_argmax_rows(M[: j - 1, :P], S[: j - 1, :P])
            ok = bm > neg
            nM[j, 1:] = np.where(ok, bm, neg)
            nS[j, 1:] = np.where(ok, bs, neg)
            parent[j, 1:] = np.where(ok, arg, -1)
        M, S = nM, nS
    arg, bm, _ = lex_argmax_rows(M[:, P:P + 1], S[:, P:P + 1])
    if not bm[0] > neg:
        raise BadInput(f"{P} planners cannot be placed in {L} layers", "lower n_planners")
    a, c = int(arg[0]), P
    chosen: list[int] = []
    for j in range(L - 1, n0, -1):
        if a == j:
            chosen.append(j)
            a = int(parent[j, c])
            c -= 1
    return sorted(chosen)
