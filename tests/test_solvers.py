"""Tests for surgeon.profiles.solvers: brute force on small instances plus hand-made cases."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from surgeon.errors import BadInput
from surgeon.profiles.delta_layers import choose_delta_layers, delta_coverage, delta_groups
from surgeon.profiles.hess import water_fill
from surgeon.profiles.solvers import (
    directed_overlap,
    evaluate_cfg,
    hylra_c_max,
    hylra_dp,
    hylra_for_budget,
    iqr_clip_mean,
    layer_cost,
    layer_hash_ratio,
    mass_fraction_needed,
    policy_cost,
    prepare_overlap,
    rollback_count,
    rollback_layers,
    select_overhead,
)


# --------------------------------------------------------------------------- step 1

def test_iqr_clip_mean_hand_odd():
    # sorted 1,2,3,4,100: Q1 = 2, Q3 = 4, IQR 2, fence [-1, 7] → 100 → 7
    assert float(iqr_clip_mean([1, 2, 3, 4, 100])) == pytest.approx((1 + 2 + 3 + 4 + 7) / 5)


def test_iqr_clip_mean_hand_even_interpolated_both_sides():
    # sorted 0,1,2,3,4,5,8,50 (n=8): Q1 at index 1.75 → 1.75, Q3 at 5.25 → 5.75, IQR 4
    # fence [-4.25, 11.75] → 50 → 11.75
    x = [1, 2, 4, 8, 50, 0, 3, 5]
    assert float(iqr_clip_mean(x)) == pytest.approx((0 + 1 + 2 + 3 + 4 + 5 + 8 + 11.75) / 8)
    # low outlier: sorted -60,0,1,2,3,4,5,8: Q1 = 0.75, Q3 = 4.25, IQR 3.5 → fence low -4.5
    y = [0, 1, 2, 3, 4, 5, 8, -60]
    assert float(iqr_clip_mean(y)) == pytest.approx((-4.5 + 0 + 1 + 2 + 3 + 4 + 5 + 8) / 8)


def test_iqr_clip_mean_axis_and_no_outliers():
    rows = np.array([[1, 2, 3, 4, 100], [1, 2, 4, 8, 3]], dtype=float)
    out = iqr_clip_mean(rows.T, axis=0)  # steps along axis 0
    assert out.shape == (2,)
    assert out[0] == pytest.approx(3.4)
    # second row: sorted 1,2,3,4,8: Q1 2, Q3 4, fence [-1, 7] → 8 → 7
    assert out[1] == pytest.approx((1 + 2 + 3 + 4 + 7) / 5)
    assert np.allclose(iqr_clip_mean(rows, axis=1), out)
    same = np.array([3.0, 3.0, 3.0])
    assert float(iqr_clip_mean(same)) == 3.0
    with pytest.raises(BadInput):
        iqr_clip_mean([1.0, float("nan")])


def test_mass_fraction_needed_hand():
    assert float(mass_fraction_needed([0.5, 0.4, 0.1])) == pytest.approx(2 / 3)
    assert float(mass_fraction_needed([0.1, 0.5, 0.4])) == pytest.approx(2 / 3)  # unsorted
    assert float(mass_fraction_needed([5.0, 4.0, 1.0])) == pytest.approx(2 / 3)  # unnormalised
    assert float(mass_fraction_needed(np.ones(10))) == pytest.approx(0.9)
    assert float(mass_fraction_needed([1.0, 0, 0, 0])) == pytest.approx(0.25)
    assert float(mass_fraction_needed([0.5, 0.39, 0.11])) == pytest.approx(1.0)
    assert float(mass_fraction_needed([0.5, 0.3, 0.2], coverage=0.5)) == pytest.approx(1 / 3)
    batch = np.array([[[0.5, 0.4, 0.1], [1, 1, 1]]])
    out = mass_fraction_needed(batch)
    assert out.shape == (1, 2)
    assert np.allclose(out, [[2 / 3, 1.0]])
    with pytest.raises(BadInput):
        mass_fraction_needed([0.0, 0.0])
    with pytest.raises(BadInput):
        mass_fraction_needed([1.0, -0.5])
    with pytest.raises(BadInput):
        mass_fraction_needed([1.0, 1.0], coverage=0.0)


def test_mass_fraction_needed_matches_loop():
    rng = np.random.default_rng(3)
    m = rng.random((50, 13)) ** 3
    got = mass_fraction_needed(m, 0.8)
    for row, g in zip(m, got):
        b = np.sort(row)[::-1] / row.sum()
        k = next(i + 1 for i in range(len(b)) if b[: i + 1].sum() >= 0.8 - 1e-12)
        assert g == pytest.approx(k / 13)


def test_layer_hash_ratio_hand():
    # T=5 steps, L=2 layers, G=2 heads, 4 blocks
    T = 5
    mass = np.ones((T, 2, 2, 4))  # uniform → need 4 of 4 blocks at 90%
    mass[:, 1, 0] = [1.0, 0, 0, 0]  # layer 1 head 0: 1 block
    mass[4, 1, 0] = [1.0, 1.0, 1.0, 1.0]  # one outlier step: 1.0 among 0.25s (IQR 0 → clipped)
    hr = layer_hash_ratio(mass)
    assert hr.shape == (2,)
    assert hr[0] == pytest.approx(1.0)
    assert hr[1] == pytest.approx((0.25 + 1.0) / 2)  # head 0 clipped to 0.25, head 1 uniform 1.0


def test_rollback_layers():
    hr = [0.1, 0.5, 0.3, 0.5, 0.2]
    assert rollback_layers(hr, 0.6) == [1, 3]  # ceil(5*0.4) = 2
    assert rollback_layers(hr, 0.5) == [1, 2, 3]  # ceil(2.5) = 3
    assert rollback_layers([0.5, 0.5, 0.5, 0.1], 0.5) == [0, 1]  # ties → smaller index
    assert rollback_layers(hr, 1.0) == []
    assert rollback_layers(hr, 0.0) == [0, 1, 2, 3, 4]
    assert rollback_count(10, 0.7) == 3  # 10*(1-0.7) = 3.0000000000000004 in floats
    assert rollback_count(61, 0.91) == 6  # methods.md: L = 61 → 6 layers
    with pytest.raises(BadInput):
        rollback_layers(hr, 1.5)


# --------------------------------------------------------------------------- step 2

def test_directed_overlap_hand():
    # T=2, L=3, G=1, 4 blocks
    m = np.zeros((2, 3, 1, 4), dtype=bool)
    m[0, 0, 0] = [1, 1, 0, 0]
    m[0, 1, 0] = [1, 0, 1, 0]
    m[0, 2, 0] = [1, 1, 1, 1]
    m[1, 0, 0] = [1, 1, 1, 0]
    m[1, 1, 0] = [0, 0, 1, 1]
    m[1, 2, 0] = [1, 0, 0, 0]
    o = directed_overlap(m)
    assert o.shape == (1, 3, 3)
    assert o[0, 0, 1] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert o[0, 0, 2] == pytest.approx((2 / 4 + 1 / 1) / 2)
    assert o[0, 1, 2] == pytest.approx((2 / 4 + 0 / 1) / 2)
    assert np.allclose(np.diag(o[0]), 1.0)
    assert np.all(np.tril(o[0], -1) == 0)


def test_prepare_overlap():
    rng = np.random.default_rng(0)
    G, L = 3, 5
    o = rng.random((G, L, L))
    p = prepare_overlap(o, [1, 3], merge="min")
    assert p.shape == (L, L)
    assert np.allclose(np.diag(p), 1.0)
    for r in (1, 3):
        off = [i for i in range(L) if i != r]
        assert np.all(p[r, off] == 0) and np.all(p[off, r] == 0)
    keep = [0, 2, 4]
    for i in keep:
        for j in keep:
            if i != j:
                assert p[i, j] == pytest.approx(o[:, i, j].min())
    pm = prepare_overlap(o, [1, 3], merge="mean")
    assert pm[0, 2] == pytest.approx(o[:, 0, 2].mean())
    # [S, G, L, L] → [S, L, L]; [L, L] → [L, L]
    multi = prepare_overlap(rng.random((2, G, L, L)), [0])
    assert multi.shape == (2, L, L)
    assert prepare_overlap(o[0], []).shape == (L, L)
    with pytest.raises(BadInput):
        prepare_overlap(o, [7])
    with pytest.raises(BadInput):
        prepare_overlap(o, [], merge="max")
    with pytest.raises(BadInput):
        prepare_overlap(o * 3, [])


# --------------------------------------------------------------------------- step 3: DP

def _brute_hylra(o, rollback, cmax, force):
    """Enumerate every cfg with cfg[l] ∈ {-1} ∪ [0, l); keep those the spec's DP can express."""
    S, L, _ = o.shape
    rb = set(rollback)
    o = o.copy()
    for r in rb:
        o[:, r, :] = 0
        o[:, :, r] = 0
    for i in range(L):
        o[:, i, i] = 1
    best = None
    best_cfg = None
    choices = [[-1]] + [[-1] + list(range(l)) for l in range(1, L)]
    for cfg in itertools.product(*choices):
        serving = []
        ok = True
        for l, a in enumerate(cfg):
            if a == -1:
                serving.append(l)
            elif serving[l - 1] == a:  # reuse continues the predecessor's anchor
                serving.append(a)
            else:
                ok = False
                break
        if not ok:
            continue
        if sum(1 for a in cfg if a == -1) - 1 > cmax:
            continue
        if force and any(cfg[r] != -1 for r in rb):
            continue
        vals = np.array([[o[s, serving[l], l] for l in range(L)] for s in range(S)])
        v = (vals.min(), vals.sum())
        if best is None or v[0] > best[0] or (v[0] == best[0] and v[1] > best[1] + 1e-12):
            best, best_cfg = v, cfg
    return best, best_cfg


def _check_plan_valid(plan, L, rollback, cmax, force):
    assert len(plan.cfg) == L and plan.cfg[0] == -1
    assert plan.anchors == [l for l in range(L) if plan.cfg[l] == -1]
    assert len(plan.anchors) - 1 <= cmax
    if force:
        assert all(plan.cfg[r] == -1 for r in rollback)
    for l in range(1, L):
        a = plan.cfg[l]
        if a != -1:
            assert 0 <= a < l
            prev = l - 1 if plan.cfg[l - 1] == -1 else plan.cfg[l - 1]
            assert prev == a


@pytest.mark.parametrize("seed", range(40))
def test_hylra_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(1, 8))
    S = int(rng.choice([1, 1, 2, 3]))
    # quantised values create ties; the DP must still hit the optimum value
    o = np.round(rng.random((S, L, L)) * 8) / 8 if seed % 2 else rng.random((S, L, L))
    n_rb = int(rng.integers(0, min(L, 3) + 1))
    rollback = sorted(rng.choice(L, size=n_rb, replace=False).tolist())
    force = bool(seed % 3)
    need = sum(1 for r in rollback if r > 0)
    cmax = int(rng.integers(need if force else 0, L + 1))
    O = o[0] if S == 1 and seed % 4 == 0 else o
    plan = hylra_dp(O, rollback, sparsity=0.5, rho=0.3, c_max=cmax, force_rollback_anchors=force)
    best, _ = _brute_hylra(o, rollback, cmax, force)
    assert plan.value[0] == best[0]
    assert plan.value[1] == pytest.approx(best[1], abs=1e-9)
    _check_plan_valid(plan, L, rollback, cmax, force)
    # the returned cfg really achieves the reported value
    zeroed = o.copy()
    for r in rollback:
        zeroed[:, r, :] = 0
        zeroed[:, :, r] = 0
    zeroed[:, np.arange(L), np.arange(L)] = 1
    got = evaluate_cfg(zeroed, plan.cfg)
    assert got[0] == plan.value[0] and got[1] == pytest.approx(plan.value[1], abs=1e-9)


def test_hylra_dp_default_c_max_matches_brute_force():
    rng = np.random.default_rng(11)
    L = 7
    o = rng.random((2, L, L))
    rollback = [2, 5]
    plan = hylra_dp(o, rollback, sparsity=0.6, rho=0.3)
    assert plan.c_max == math.ceil(7 * 0.6 * 0.3) + 2 == 4
    best, _ = _brute_hylra(o, rollback, 4, True)
    assert plan.value[0] == best[0] and plan.value[1] == pytest.approx(best[1])


def _hand_O():
    o = np.eye(4)
    o[0, 1], o[0, 2], o[0, 3] = 0.6, 0.1, 0.6
    o[1, 2], o[1, 3] = 0.55, 0.95
    o[2, 3] = 0.6
    return o


def test_hylra_dp_hand_min_beats_sum():
    # one new anchor allowed: at 1 → (0.55, 3.5); at 2 → (0.6, 3.2); at 3 → (0.1, ...)
    plan = hylra_dp(_hand_O(), [], sparsity=0.5, rho=0.3, c_max=1)
    assert plan.cfg == [-1, 0, -1, 2]
    assert plan.anchors == [0, 2]
    assert plan.value == (0.6, pytest.approx(3.2))
    assert plan.roles == ["select", "reuse", "select", "reuse"]
    # no new anchor: everything reuses layer 0
    p0 = hylra_dp(_hand_O(), [], sparsity=0.5, rho=0.3, c_max=0)
    assert p0.cfg == [-1, 0, 0, 0] and p0.value == (0.1, pytest.approx(2.3))
    # unlimited: every layer its own anchor (each adds O[j,j] = 1)
    pall = hylra_dp(_hand_O(), [], sparsity=0.5, rho=0.3, c_max=10)
    assert pall.cfg == [-1, -1, -1, -1] and pall.value == (1.0, 4.0)


def test_hylra_dp_multi_set_uses_worst_set():
    a = _hand_O()
    b = _hand_O()
    b[2, 3] = 0.2  # in set b, anchor 2 serves layer 3 badly
    plan = hylra_dp(np.stack([a, b]), [], sparsity=0.5, rho=0.3, c_max=1)
    # anchor at 1: min(0.55, 0.95) over both sets = 0.55, sum 2*(1+1+0.55+0.95) = 7.0
    assert plan.cfg == [-1, -1, 1, 1]
    assert plan.value == (0.55, pytest.approx(7.0))
    assert plan.value[0] == min(np.stack([a, b])[:, 1, [2, 3]].min(), 1.0)


def test_hylra_dp_rollback_automatic_anchors():
    rng = np.random.default_rng(5)
    L = 10
    o = 0.3 + 0.7 * rng.random((L, L))
    rollback = [0, 4, 7]
    # spec DP (no forcing): with room to spare, rollback layers and their successors are anchors
    plan = hylra_dp(o, rollback, sparsity=0.7, rho=0.3, force_rollback_anchors=False)
    assert plan.c_max == math.ceil(10 * 0.7 * 0.3) + 3 == 6
    for r in rollback:
        assert plan.cfg[r] == -1 and plan.cfg[r + 1] == -1
    assert plan.value[0] > 0
    assert [plan.roles[r] for r in rollback] == ["full"] * 3
    assert plan.roles[1] == "select"
    forced = hylra_dp(o, rollback, sparsity=0.7, rho=0.3)
    assert forced.cfg == plan.cfg


def test_hylra_dp_paper_c_max_and_errors():
    assert hylra_c_max(61, 0.91, 0.3, 6) == 17 + 6
    with pytest.raises(BadInput):
        hylra_dp(np.eye(4), [1, 2, 3], sparsity=0.5, rho=0.3, c_max=2)  # cannot anchor all
    p = hylra_dp(np.eye(4), [1, 2, 3], sparsity=0.5, rho=0.3, c_max=2, force_rollback_anchors=False)
    assert len(p.anchors) - 1 <= 2
    with pytest.raises(BadInput):
        hylra_dp(np.ones((3, 4)), [], 0.5)
    with pytest.raises(BadInput):
        hylra_dp(np.eye(3), [], 0.5, c_max=-1)
    single = hylra_dp(np.eye(1), [], 0.5)
    assert single.cfg == [-1] and single.value == (1.0, 1.0)
    d = hylra_dp(_hand_O(), [], 0.5, c_max=1).to_dict()
    assert d["cfg"] == [-1, 0, -1, 2] and d["roles"][2] == "select"


def test_evaluate_cfg_rejects_non_contiguous_reuse():
    with pytest.raises(BadInput):
        evaluate_cfg(_hand_O(), [-1, -1, 0, 0])  # layer 2 reuses 0 but layer 1 is its own anchor


# --------------------------------------------------------------------------- water-filling

def _bisect_water(w, total, lo, hi):
    """Reference: κ = clip(λw, lo, hi), λ by bisection (w > 0)."""
    a, b = 0.0, hi / w.min() * 2
    for _ in range(300):
        m = 0.5 * (a + b)
        if np.clip(m * w, lo, hi).sum() < total:
            a = m
        else:
            b = m
    return np.clip(0.5 * (a + b) * w, lo, hi)


@pytest.mark.parametrize("seed", range(30))
def test_water_fill_matches_bisection_and_kkt(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 40))
    scores = rng.lognormal(0, 1.5, size=n)
    lo = float(rng.choice([0.0, 0.02, 0.1]))
    hi = float(rng.choice([1.0, 0.8]))
    total = lo * n + rng.random() * (hi - lo) * n
    k = water_fill(scores, total, lo, hi)
    ref = _bisect_water(scores, total, lo, hi)
    assert np.allclose(k, ref, atol=1e-8)
    assert k.sum() == pytest.approx(total, rel=1e-12, abs=1e-12)
    assert np.all(k >= lo - 1e-15) and np.all(k <= hi + 1e-15)
    order = np.argsort(scores)
    assert np.all(np.diff(k[order]) >= -1e-12)  # monotone in score
    free = (k > lo + 1e-12) & (k < hi - 1e-12)
    if free.any():
        lam = (k[free] / scores[free])
        assert np.allclose(lam, lam[0], rtol=1e-9)  # unclipped heads proportional to w
        lam = lam[0]
        assert np.all(lam * scores[k <= lo + 1e-12] <= lo + 1e-9)
        assert np.all(lam * scores[k >= hi - 1e-12] >= hi - 1e-9)


def test_water_fill_hand_cases():
    k = water_fill([1, 2, 3, 4, 100], 2.0, 0.1, 1.0)
    assert np.allclose(k, [0.1, 0.2, 0.3, 0.4, 1.0])
    # lower clip: w = [1, 1, 98], B = 1: raw 0.01, 0.01, 0.98 → 0.1, 0.1, 0.8
    assert np.allclose(water_fill([1, 1, 98], 1.0, 0.1, 1.0), [0.1, 0.1, 0.8])
    # gamma = 2: w = [1, 4], B = 0.5 → [0.1, 0.4]
    assert np.allclose(water_fill([1, 2], 0.5, 0.0, 1.0, gamma=2.0), [0.1, 0.4])
    # all equal → uniform; shape preserved
    u = water_fill(np.full((3, 4), 7.0), 0.3 * 12, 0.02)
    assert u.shape == (3, 4) and np.allclose(u, 0.3)
    # uniform budget at the bounds
    assert np.allclose(water_fill([1, 5, 9], 3 * 0.02, 0.02), 0.02)
    assert np.allclose(water_fill([1, 5, 9], 3.0, 0.02), 1.0)


def test_water_fill_zero_and_negative_scores():
    k = water_fill([0.0, -1.0, 1.0, 3.0], 1.2, 0.1, 1.0)
    assert np.allclose(k[:2], 0.1)
    assert np.allclose(k[2:], [0.25, 0.75])
    # positive heads saturate → the rest goes uniformly to zero-weight heads
    k = water_fill([0.0, 0.0, 1.0], 2.4, 0.1, 1.0)
    assert np.allclose(k, [0.7, 0.7, 1.0])
    assert np.allclose(water_fill([0.0, 0.0, -2.0], 0.9, 0.1), 0.3)  # all zero → uniform
    with pytest.raises(BadInput, match="infeasible"):
        water_fill([1.0, 2.0], 0.1, 0.1)  # total < n·k_min
    with pytest.raises(BadInput, match="infeasible"):
        water_fill([1.0, 2.0], 2.5, 0.1)  # total > n·k_max
    with pytest.raises(BadInput):
        water_fill([1.0, float("inf")], 1.0, 0.1)
    with pytest.raises(BadInput):
        water_fill([1.0, 2.0], 1.0, 0.6, 0.5)


# --------------------------------------------------------------------------- DELTA

def test_delta_groups_paper_default():
    g = delta_groups(28, [0, 1, 2, 14, 22])
    assert [x["layer"] for x in g] == list(range(28))
    roles = {x["layer"]: x["role"] for x in g}
    src = {x["layer"]: x["source"] for x in g}
    assert roles[0] == roles[1] == "full"
    assert [l for l in range(28) if roles[l] == "planner"] == [2, 14, 22]
    for l in range(28):
        if l in (0, 1, 2, 14, 22):
            assert src[l] is None
        else:
            assert roles[l] == "sparse"
            assert src[l] == (2 if l < 14 else 14 if l < 22 else 22)


def test_delta_groups_edge_cases():
    g = delta_groups(4, [0, 3])
    assert [x["role"] for x in g] == ["planner", "sparse", "sparse", "planner"]
    assert g[1]["source"] == 0
    with pytest.raises(BadInput):
        delta_groups(4, [1])  # layer 0 sparse with no planner before it
    with pytest.raises(BadInput):
        delta_groups(4, [0, 9])


def _valid_extra(L, n0, P):
    start = n0 + 2
    for combo in itertools.combinations(range(start, L), P - 1):
        if all(b - a >= 2 for a, b in zip(combo, combo[1:])):
            yield list(combo)


@pytest.mark.parametrize("seed", range(12))
def test_choose_delta_layers_brute_force(seed):
    rng = np.random.default_rng(200 + seed)
    L = int(rng.integers(5, 11))
    n0 = int(rng.integers(0, 3))
    P = int(rng.integers(1, 4))
    if P - 1 > (max(0, L - n0 - 2) + 1) // 2:
        with pytest.raises(BadInput):
            choose_delta_layers(rng.random(L), P, n0)
        return
    # 1-D sensitivity: maximise the sum of the extra planners' scores
    sc = np.round(rng.random(L) * 4) / 4
    F = choose_delta_layers(sc, P, n0)
    best = max(sum(sc[c]) for c in _valid_extra(L, n0, P))
    assert sum(sc[l] for l in F[n0 + 1:]) == pytest.approx(best)
    groups = delta_groups(L, F)
    assert sum(x["role"] == "planner" for x in groups) == P
    assert [x["role"] for x in groups[:n0]] == ["full"] * n0 and groups[n0]["role"] == "planner"
    # 2-D overlap (two calibration sets): maximise (min, sum) coverage lexicographically
    o = rng.random((2, L, L))
    F2 = choose_delta_layers(o, P, n0)
    assert sum(x["role"] == "planner" for x in delta_groups(L, F2)) == P

    def cover(F):
        m, s = math.inf, 0.0
        last = None
        Fs = set(F)
        for l in range(L):
            if l in Fs:
                if l + 1 not in Fs:
                    last = l
            else:
                m = min(m, o[:, last, l].min())
                s += o[:, last, l].sum()
        return m, s

    cands = [list(range(n0 + 1)) + c for c in _valid_extra(L, n0, P)]
    bm = max(cover(F)[0] for F in cands)
    bs = max(cover(F)[1] for F in cands if cover(F)[0] == bm)
    got = delta_coverage(o, F2)
    assert got[0] == bm and got[1] == pytest.approx(bs)


def test_choose_delta_layers_hand():
    # 28 layers, scores peak at 14 and 22 → the paper's layout
    sc = np.zeros(28)
    sc[14], sc[22] = 1.0, 0.9
    assert choose_delta_layers(sc, 3, 2) == [0, 1, 2, 14, 22]
    # adjacent peaks cannot both be planners
    sc2 = np.zeros(10)
    sc2[5], sc2[6], sc2[8] = 1.0, 1.0, 0.5
    assert choose_delta_layers(sc2, 3, 0) == [0, 5, 8]
    # overlap drops right before layer 6 → second planner at 6
    o = np.ones((8, 8))
    o[:6, 6:] = 0.2
    assert choose_delta_layers(o, 2, 1) == [0, 1, 6]
    with pytest.raises(BadInput):
        choose_delta_layers(np.zeros(6), 4, 2)


# --------------------------------------------------------------------------- cost model

def test_cost_model_hand():
    assert select_overhead(64) == pytest.approx(1 / 4096)
    assert select_overhead(64, "decode") == pytest.approx(1 / 64)
    assert layer_cost("full", 0.1) == 1.0
    assert layer_cost("select", 0.1, 0.01) == pytest.approx(0.11)
    assert layer_cost("reuse", 0.1, 0.01) == pytest.approx(0.1)
    assert layer_cost("planner", 0.1, 0.01) == pytest.approx(1.01)
    assert layer_cost("sparse", 0.1) == pytest.approx(0.1)
    c = policy_cost(["full", "select", "reuse", "reuse"], 0.2, 0.05)
    assert c == pytest.approx((1 + 0.25 + 0.2 + 0.2) / 4)
    c2 = policy_cost(["full", "reuse"], [0.5, 0.3])
    assert c2 == pytest.approx((1 + 0.3) / 2)
    with pytest.raises(BadInput):
        layer_cost("dense", 0.1)
    with pytest.raises(BadInput):
        policy_cost(["full"], [0.1, 0.2])


def test_hylra_for_budget_picks_largest_feasible_rollback():
    rng = np.random.default_rng(9)
    L = 12
    o = rng.random((L, L))
    hr = rng.random(L)
    keep, sc, budget = 0.1, 0.02, 0.45
    res = hylra_for_budget(o, hr, budget, keep, rho=0.3, select_cost=sc)
    assert res.cost <= budget
    r = len(res.plan.rollback)
    assert res.plan.rollback == rollback_layers(hr, res.sparsity)
    assert res.sparsity == pytest.approx(1 - r / L)
    assert res.cost == pytest.approx(policy_cost(res.plan.roles, keep, sc))
    # every larger rollback count is over budget
    order = list(np.argsort(-hr, kind="stable"))
    for r2 in range(r + 1, L + 1):
        p = hylra_dp(o, sorted(order[:r2]), 1 - r2 / L, 0.3)
        assert policy_cost(p.roles, keep, sc) > budget
    assert res.to_dict()["plan"]["rollback"] == res.plan.rollback
    with pytest.raises(BadInput):
        hylra_for_budget(o, hr, 0.05, keep)  # below keep: nothing fits
    full = hylra_for_budget(o, hr, 1.0, keep, select_cost=0.0)
    assert len(full.plan.rollback) == L and full.cost == pytest.approx(1.0)
