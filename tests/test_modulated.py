"""Modulated variants (methods.md §7–§11) and their selectors.

Every variant is checked against a formula written here independently (explicit per-row loops
and softmax), its fused path against its definition, zero strength against dense, and its
parameter validation; the selectors run on synthetic data with planted answers.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

import surgeon.attention.modulation as modulation
from surgeon.errors import BadInput
from surgeon.profiles.selectors import (
    find_sink_dims,
    find_sink_tokens,
    headhunter_greedy,
    load_objective,
    paint_head_alpha,
    paint_span_mass,
    select_top,
    sink_phi,
    sink_positions,
    var_head_fraction,
    var_head_rows,
)
from surgeon.attention import AttnContext, recording, use_impl
from surgeon.attention.dense import Dense
from surgeon.attention.head_boost import HeadBoost, HeadBoostParams
from surgeon.attention.identity_blend import IdentityBlend, IdentityBlendParams
from surgeon.attention.local_boost import LocalBoost, LocalBoostParams
from surgeon.attention.registry import get_variant
from surgeon.attention.sink_redistribute import SinkRedistribute, SinkRedistributeParams
from surgeon.attention.temperature import Temperature, TemperatureParams

B, HQ, HKV, N, D = 2, 4, 2, 16, 8
SCALE = D ** -0.5


def _inputs(n=N, hq=HQ, hkv=HKV, b=B, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, n, D, generator=g, dtype=dtype),
            torch.randn(b, hkv, n, D, generator=g, dtype=dtype),
            torch.randn(b, hkv, n, D, generator=g, dtype=dtype))


def _pad(n=N, b=B, left=3):
    pad = torch.ones(b, n, dtype=torch.bool)
    pad[1, :left] = False
    return pad


def _ctx(causal, pad=None, **kw):
    return AttnContext(causal=causal, scale=SCALE, kv_heads=HKV, key_padding=pad, **kw)


# --------------------------------------------------------------------------- independent formulas

def naive(q, k, v, causal, pad, logit_row=None, prob_row=None):
    """Attention row by row in plain Python lists: logit_row(b, h, t, z) edits the logits of query
    position t (a list over keys, masked keys absent: None), prob_row(b, h, t, a) the probabilities."""
    b_, hq, nq, _ = q.shape
    nk = k.shape[2]
    g = hq // k.shape[1]
    out = torch.zeros(b_, hq, nq, v.shape[-1], dtype=torch.float64)
    for b in range(b_):
        for h in range(hq):
            for r in range(nq):
                t = nk - nq + r
                allowed = [(not causal or j <= t) and (pad is None or bool(pad[b, j])) for j in range(nk)]
                z = [float(q[b, h, r] @ k[b, h // g, j]) * SCALE for j in range(nk)]
                if logit_row is not None:
                    z = logit_row(b, h, t, z)
                live = [z[j] for j in range(nk) if allowed[j]]
                if live:
                    mx = max(live)
                    e = [math.exp(z[j] - mx) if allowed[j] else 0.0 for j in range(nk)]
                    s = sum(e)
                    a = [x / s for x in e]
                else:
                    a = [0.0] * nk
                if prob_row is not None:
                    a = prob_row(b, h, t, a)
                for j in range(nk):
                    out[b, h, r] += a[j] * v[b, h // g, j].to(torch.float64)
    return out


def _real_pos(pad, b, t):
    """1-based count of real tokens up to and including t (≥ 1)."""
    return max(1, int(pad[b, : t + 1].sum())) if pad is not None else t + 1


def temperature_formula(sigma):
    def fn(pad):
        return dict(logit_row=lambda b, h, t, z: [x * (1 + sigma * math.log(_real_pos(pad, b, t))) for x in z])
    return fn


def head_boost_formula(alpha_of_head, spans, scales, last_row_nk=None):
    def fn(pad):
        def edit(b, h, t, z):
            if last_row_nk is not None and t != last_row_nk - 1:
                return z
            z = list(z)
            for (s, e), c in zip(spans, scales):
                for j in range(s, e):
                    z[j] = z[j] + alpha_of_head.get(h, 0.0) * c * abs(z[j])
            return z
        return dict(logit_row=edit)
    return fn


def identity_formula(u, heads):
    def fn(pad):
        def edit(b, h, t, a):
            if h not in heads or (pad is not None and not pad[b, t]):
                return a
            return [(1 - u) * x + (u if j == t else 0.0) for j, x in enumerate(a)]
        return dict(prob_row=edit)
    return fn


def local_formula(gamma, w, lam, heads, first_key=0):
    def fn(pad):
        def edit(b, h, t, a):
            if h not in heads:
                return a
            a = [x * (1 + gamma * lam ** (t - 1 - j)) if (t - w <= j <= t - 1 and j >= first_key) else x
                 for j, x in enumerate(a)]
            s = sum(a)
            return [x / s for x in a] if s > 0 else a
        return dict(prob_row=edit)
    return fn


def var_formula(p, rho, summ, sinks, target, heads, after=True):
    def fn(pad):
        def edit(b, h, t, a):
            if h not in heads or (after and t < target[1]):
                return a
            tgt = set(range(*target))
            vis = tgt & set(sinks)
            rest = tgt - vis
            m = sum(a[j] for j in tgt)
            m_rest = sum(a[j] for j in rest)
            if m <= 0 or m < summ or sum(a[j] for j in vis) / m > rho or m_rest <= 0:
                return a
            omega = (1 - p) * sum(a[j] for j in sinks)
            new = list(a)
            for j in sinks:
                new[j] = p * a[j]
            for j in rest:
                new[j] = a[j] + omega * a[j] / m_rest
            return new
        return dict(prob_row=edit)
    return fn


CASES = {
    "temperature": (Temperature(), TemperatureParams(sigma=0.3), temperature_formula(0.3)),
    "temperature_beta": (Temperature(), TemperatureParams(beta=-0.5), temperature_formula(math.exp(-math.exp(-0.5)))),
    "head_boost": (HeadBoost(), HeadBoostParams(alpha=0.7, heads=(1, 3), head_alpha=(0.5, 1.2), spans=((1, 4), (9, 11)),
                                                span_scale=(1.0, 0.4)),
                   head_boost_formula({1: 0.5, 3: 1.2}, [(1, 4), (9, 11)], [1.0, 0.4])),
    "head_boost_all": (HeadBoost(), HeadBoostParams(alpha=0.9, spans=((0, 2), (5, 8))),
                       head_boost_formula({h: 0.9 for h in range(HQ)}, [(0, 2), (5, 8)], [1.0, 1.0])),
    "head_boost_last_row": (HeadBoost(), HeadBoostParams(alpha=1.5, heads=(2,), spans=((2, 6),), last_row_only=True),
                            head_boost_formula({2: 1.5}, [(2, 6)], [1.0], last_row_nk=N)),
    "identity_blend": (IdentityBlend(), IdentityBlendParams(u=0.35, heads=(0, 3)), identity_formula(0.35, {0, 3})),
    "identity_blend_pag": (IdentityBlend(), IdentityBlendParams(u=1.0), identity_formula(1.0, set(range(HQ)))),
    "local_boost": (LocalBoost(), LocalBoostParams(gamma=2.0, window=3, decay=0.5, heads=(1, 2)),
                    local_formula(2.0, 3, 0.5, {1, 2})),
    "local_boost_first_key": (LocalBoost(), LocalBoostParams(gamma=0.8, window=4, first_key=9),
                              local_formula(0.8, 4, 1.0, set(range(HQ)), first_key=9)),
    "sink_redistribute": (SinkRedistribute(),
                          SinkRedistributeParams(p=0.3, rho=0.5, summ=0.2, sinks=(0, 5), target=(3, 9),
                                                 heads=(0, 2, 3)),
                          var_formula(0.3, 0.5, 0.2, [0, 5], (3, 9), {0, 2, 3})),
    "sink_redistribute_all_rows": (SinkRedistribute(),
                                   SinkRedistributeParams(p=0.0, rho=0.9, summ=0.05, sinks=(1, 12), target=(2, 8),
                                                          after_target_only=False),
                                   var_formula(0.0, 0.9, 0.05, [1, 12], (2, 8), set(range(HQ)), after=False)),
    # more sinks + 4 masses than head-dim columns: the fused path needs two indicator SDPA calls
    "sink_redistribute_many_sinks": (SinkRedistribute(),
                                     SinkRedistributeParams(p=0.4, rho=0.6, summ=0.1, sinks=(0, 1, 2, 5, 7, 11),
                                                            target=(4, 10), after_target_only=False),
                                     var_formula(0.4, 0.6, 0.1, [0, 1, 2, 5, 7, 11], (4, 10), set(range(HQ)),
                                                 after=False)),
    # sinks inside the target: the rho and summ tests reject some rows and accept others
    "sink_redistribute_vis_sinks": (SinkRedistribute(),
                                    SinkRedistributeParams(p=0.5, rho=0.3, summ=0.45, sinks=(0, 1, 13), target=(0, 6),
                                                           after_target_only=False),
                                    var_formula(0.5, 0.3, 0.45, [0, 1, 13], (0, 6), set(range(HQ)), after=False)),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("causal", [True, False])
def test_variant_equals_hand_written_formula(name, causal, monkeypatch):
    var, p, formula = CASES[name]
    q, k, v = _inputs()
    pad = _pad()
    want = naive(q, k, v, causal, pad, **formula(pad))
    valid = pad[:, None, :, None].expand_as(want) if causal else torch.ones_like(want, dtype=torch.bool)
    monkeypatch.setattr(modulation, "CHUNK_ELEMS", 3 * B * HQ * N)  # several query chunks in the fused path
    for mode in ["reference", "fused"]:
        with use_impl(mode):
            got = var.run(q, k, v, _ctx(causal, pad), p)
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-10, atol=1e-10, msg=f"{name} {mode}")
    assert not torch.allclose(want, Dense().reference(q, k, v, _ctx(causal, pad), Dense.Params()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_rows_equal_prefill_rows(name):
    """Hooks and fused paths take the queries to be the last Nq of Nk positions."""
    var, p, _ = CASES[name]
    q, k, v = _inputs()
    pad = _pad()
    ctx = _ctx(True, pad)
    with use_impl("reference"):
        full = var.run(q, k, v, ctx, p)
    for nq in (1, 3):
        for mode in ["reference", "fused"]:
            with use_impl(mode):
                part = var.run(q[:, :, -nq:], k, v, ctx, p)
            torch.testing.assert_close(part, full[:, :, -nq:], rtol=1e-10, atol=1e-10, msg=f"{name} nq={nq} {mode}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_equals_definition_with_gqa_masks_float32(name, monkeypatch):
    var, p, _ = CASES[name]
    q, k, v = _inputs(hq=4, hkv=1, dtype=torch.float32, seed=3)
    bias = torch.randn(1, HQ, N, N, generator=torch.Generator().manual_seed(1))
    keep = torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(2)) > 0.2
    monkeypatch.setattr(modulation, "CHUNK_ELEMS", 2 * B * HQ * N)
    for mask in (bias, keep):
        ctx = AttnContext(causal=True, scale=SCALE, kv_heads=1, key_padding=_pad(), attn_mask=mask)
        with use_impl("reference"):
            ref = var.run(q, k, v, ctx, p)
        with use_impl("fused"):
            got = var.run(q, k, v, ctx, p)
        valid = _pad()[:, None, :, None].expand_as(ref)
        torch.testing.assert_close(got[valid], ref[valid], rtol=1e-4, atol=1e-5, msg=f"{name} {mask.dtype}")


@pytest.mark.parametrize("name", ["identity_blend", "local_boost", "local_boost_first_key", "temperature"])
def test_fused_hooks_equal_definition_hooks(name):
    var, p, _ = CASES[name]
    q, k, v = _inputs()
    ctx = _ctx(True, _pad())
    a = modulation.run_hooks(q, k, v, ctx, var.hooks(q, k, v, ctx, p))
    b = modulation.run_hooks(q, k, v, ctx, var.fused_hooks(q, k, v, ctx, p))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_hooks_compose_through_context():
    """The lead's composition route: a modulator's hooks in AttnContext of another variant."""
    q, k, v = _inputs()
    pad = _pad()
    ctx = _ctx(True, pad)
    for name in ["temperature", "head_boost", "identity_blend", "local_boost", "sink_redistribute"]:
        var, p, _ = CASES[name]
        for hooks in (var.hooks(q, k, v, ctx, p), var.fused_hooks(q, k, v, ctx, p)):
            composed = dataclasses.replace(ctx, **hooks)
            got = Dense().reference(q, k, v, composed, Dense.Params())
            torch.testing.assert_close(got, var.reference(q, k, v, ctx, p), rtol=1e-10, atol=1e-10, msg=name)
            assert not var.fast_available(var.FAST, q, composed, p)


def test_zero_strength_equals_dense():
    q, k, v = _inputs()
    pad = _pad()
    zero = [
        (Temperature(), TemperatureParams(sigma=0.0)),
        (HeadBoost(), HeadBoostParams(alpha=0.0, heads=(1,), spans=((0, 5),))),
        (HeadBoost(), HeadBoostParams(heads=(0, 2), head_alpha=(0.0, 0.0), spans=((0, 5),))),
        (HeadBoost(), HeadBoostParams(alpha=2.0, spans=((0, 5),), span_scale=(0.0,))),
        (SinkRedistribute(), SinkRedistributeParams(p=1.0, sinks=(0,), target=(2, 6))),
        (IdentityBlend(), IdentityBlendParams(u=0.0, heads=(1,))),
        (LocalBoost(), LocalBoostParams(gamma=0.0, window=7)),
    ]
    for causal in (True, False):
        ctx = _ctx(causal, pad)
        dense = Dense().reference(q, k, v, ctx, Dense.Params())
        for var, p in zero:
            for mode in ["reference", "fused"]:
                with use_impl(mode):
                    out = var.run(q, k, v, ctx, p)
                torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12, msg=f"{var.name} {p} {mode}")


def test_density_and_family():
    ctx = _ctx(True, site="model.layers.3.self_attn")
    for name in ["temperature", "head_boost", "identity_blend", "local_boost", "sink_redistribute"]:
        var = get_variant(name)
        assert var.family == "modulated" and var.info()["fast_paths"] == ["fused"]
        p = var.example_params(N * 4, HQ)
        qq, kk, vv = _inputs(n=N * 4)
        assert var.requested_density(p) == 1.0 and var.achieved_density(qq, kk, vv, ctx, p) == 1.0
        with recording() as rec, use_impl("fused"):
            var.run(qq, kk, vv, ctx, p)
        assert rec.records == [{"site": "model.layers.3.self_attn", "variant": name, "requested": 1.0, "achieved": 1.0}]


def test_var_rows_after_target_only_and_row_sums():
    """VAR's selected rows keep summing to 1, and rows before the target end are untouched."""
    q, k, v = _inputs(n=24)
    p = SinkRedistributeParams(p=0.2, rho=0.6, summ=0.1, sinks=(0, 4), target=(2, 10))
    var = SinkRedistribute()
    ctx = _ctx(True)
    probs = {}
    hooks = var.hooks(q, k, v, ctx, p)

    def spy(a):
        probs["before"] = a
        out = hooks["prob_fn"](a)
        probs["after"] = out
        return out

    modulation.run_hooks(q, k, v, ctx, {"prob_fn": spy})
    before, after = probs["before"], probs["after"]
    torch.testing.assert_close(after.sum(-1), before.sum(-1))
    assert torch.equal(after[:, :, :10], before[:, :, :10])
    changed = (after - before).abs().amax(-1) > 0
    assert changed[:, :, 10:].any()
    # selected rows: sink mass scaled by p exactly
    sel = changed[..., None] & torch.zeros(24, dtype=torch.bool).index_fill(0, torch.tensor([0, 4]), True)
    torch.testing.assert_close(after[sel], 0.2 * before[sel])


# --------------------------------------------------------------------------- validation

BAD_PARAMS = [
    (lambda: TemperatureParams(sigma=1.5), "sigma"),
    (lambda: TemperatureParams(sigma=-0.1), "sigma"),
    (lambda: TemperatureParams(sigma=0.1, beta=1.0), "beta"),
    (lambda: TemperatureParams(beta=float("nan")), "beta"),
    (lambda: HeadBoostParams(alpha=6.0), "alpha"),
    (lambda: HeadBoostParams(alpha=True), "alpha"),
    (lambda: HeadBoostParams(heads=(-1,)), "heads"),
    (lambda: HeadBoostParams(heads=(1, 1)), "heads"),
    (lambda: HeadBoostParams(heads=(0, 1), head_alpha=(0.5,)), "head_alpha"),
    (lambda: HeadBoostParams(head_alpha=(11.0,)), "head_alpha"),
    (lambda: HeadBoostParams(spans=((5, 5),)), "spans"),
    (lambda: HeadBoostParams(spans=((0, 4), (3, 6))), "spans"),
    (lambda: HeadBoostParams(spans=((0, 4),), span_scale=(1.0, 1.0)), "span_scale"),
    (lambda: HeadBoostParams(spans=((0, 4),), last_row_only="yes"), "last_row_only"),
    (lambda: SinkRedistributeParams(p=1.2), "p="),
    (lambda: SinkRedistributeParams(rho=-0.1), "rho"),
    (lambda: SinkRedistributeParams(summ=2.0), "summ"),
    (lambda: SinkRedistributeParams(target=(5, 2)), "target"),
    (lambda: SinkRedistributeParams(sinks=(0.5,)), "sinks"),
    (lambda: IdentityBlendParams(u=1.5), "u="),
    (lambda: IdentityBlendParams(heads=(2.0,)), "heads"),
    (lambda: LocalBoostParams(gamma=11.0), "gamma"),
    (lambda: LocalBoostParams(window=0), "window"),
    (lambda: LocalBoostParams(decay=1.5), "decay"),
    (lambda: LocalBoostParams(first_key=-1), "first_key"),
]


@pytest.mark.parametrize("make,needle", BAD_PARAMS, ids=[f"{i}-{n}" for i, (_, n) in enumerate(BAD_PARAMS)])
def test_bad_params_raise_naming_the_parameter(make, needle):
    with pytest.raises(BadInput, match=needle):
        make()


RUNTIME_BAD = [
    (HeadBoost(), HeadBoostParams(heads=(1, 6), spans=((0, 4),)), r"head 6.*\[0, 3\]"),
    (HeadBoost(), HeadBoostParams(spans=((10, 40),)), r"spans.*\[10, 40\].*16-token"),
    (HeadBoost(), HeadBoostParams(head_alpha=(0.5, 0.5)), "head_alpha has 2 entries"),
    (HeadBoost(), HeadBoostParams(alpha=0.5), "no key spans"),
    (IdentityBlend(), IdentityBlendParams(heads=(4,)), r"head 4.*\[0, 3\]"),
    (LocalBoost(), LocalBoostParams(heads=(0, 9)), r"head 9.*\[0, 3\]"),
    (LocalBoost(), LocalBoostParams(first_key=16), "first_key"),
    (SinkRedistribute(), SinkRedistributeParams(sinks=(0, 16), target=(2, 5)), "sinks token 16"),
    (SinkRedistribute(), SinkRedistributeParams(sinks=(0,), target=(2, 17)), "target"),
    (SinkRedistribute(), SinkRedistributeParams(sinks=(0,)), "target span"),
    (SinkRedistribute(), SinkRedistributeParams(target=(2, 5)), "sink tokens"),
    (SinkRedistribute(), SinkRedistributeParams(heads=(7,), sinks=(0,), target=(2, 5)), r"head 7.*\[0, 3\]"),
]


@pytest.mark.parametrize("var,p,needle", RUNTIME_BAD, ids=[f"{v.name}-{i}" for i, (v, _, _) in enumerate(RUNTIME_BAD)])
def test_params_that_do_not_fit_the_site_raise(var, p, needle):
    q, k, v = _inputs()
    ctx = _ctx(True, site="model.layers.0.self_attn")
    for mode in ["reference", "fused"]:
        with use_impl(mode), pytest.raises(BadInput, match=needle):
            var.run(q, k, v, ctx, p)
    with pytest.raises(BadInput, match=needle):
        var.hooks(q, k, v, ctx, p)


def test_identity_blend_needs_self_attention():
    q, k, v = _inputs()
    with pytest.raises(BadInput, match="self-attention"):
        IdentityBlend().run(q[:, :, :5], k, v, _ctx(False), IdentityBlendParams())


def test_params_round_trip_through_json():
    from surgeon.attention.base import decode_config, encode_config

    for name in ["temperature", "head_boost", "identity_blend", "local_boost", "sink_redistribute"]:
        var = get_variant(name)
        p = var.example_params(96, 6)
        d = decode_config(encode_config(name, p, {}))["params"]
        assert var.params_from(d) == p


# --------------------------------------------------------------------------- selectors

def _planted_hidden():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 32, 1024, generator=g)  # φ ≤ sqrt(C): VAR's τ = 20 needs a model-sized C
    h[:, 0, 17] = 500.0
    h[:, 0, 40] = -800.0
    h[:, 9, 17] = 300.0   # a second (non-BOS) sink token in a sink dimension
    h[:, 20, 5] = 400.0   # massive, but not in a sink dimension
    return h


def test_find_sink_dims_and_tokens_on_planted_data():
    h = _planted_hidden()
    dims = find_sink_dims(h, ratio=100)
    assert dims == (40, 17)
    phi = sink_phi(h, dims)
    assert phi.shape == (3, 32) and float(phi[:, 1:9].max()) < 10
    # φ of token 9: 300 / rms(token 9) computed by hand
    rms = math.sqrt(float(h[0, 9].double().pow(2).mean()) + 1e-6)
    assert abs(float(phi[0, 9]) - 300.0 / rms) < 1e-6
    sinks = find_sink_tokens(h, dims, tau=20)
    assert sinks.dtype == torch.bool
    assert torch.nonzero(sinks[0]).flatten().tolist() == [0, 9]
    assert sink_positions(sinks) == (0, 9)
    assert find_sink_dims(torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))) == ()
    with pytest.raises(BadInput, match="hidden"):
        find_sink_dims(h[0])
    with pytest.raises(BadInput, match="outside the hidden size"):
        sink_phi(h, [1024])


def test_var_head_rows_rule():
    probs = torch.zeros(1, 3, 2, 8, dtype=torch.float64)
    # target = [2, 6), sinks = {0, 3}; row values chosen to hit each branch of the rule
    probs[0, 0, 0] = torch.tensor([0.5, 0, 0.1, 0.05, 0.2, 0.15, 0, 0])  # m=.5, r=.1 → selected
    probs[0, 1, 0] = torch.tensor([0.5, 0, 0.05, 0.3, 0.1, 0.05, 0, 0])  # m=.5, r=.6 → rejected (rho)
    probs[0, 2, 0] = torch.tensor([0.9, 0, 0.05, 0, 0.05, 0, 0, 0])     # m=.1 → rejected (summ)
    probs[0, :, 1] = torch.tensor([0, 0, 0, 0, 0, 0, 0.5, 0.5])         # m=0 → rejected
    rows = var_head_rows(probs, sinks=(0, 3), target=(2, 6), rho=0.5, summ=0.2)
    assert rows[0].tolist() == [[True, False], [False, False], [False, False]]
    assert var_head_fraction(probs, (0, 3), (2, 6)).tolist() == [0.5, 0.0, 0.0]
    assert select_top(torch.tensor([0.1, 0.7, 0.3]), 2) == (1, 2)
    assert select_top(torch.tensor([0.1, 0.7, 0.3]), 2, min_value=0.5) == (1,)
    with pytest.raises(BadInput, match="outside"):
        var_head_rows(probs, sinks=(9,), target=(2, 6))


def test_paint_head_alpha_and_span_mass():
    mass = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    got = paint_head_alpha(mass, 0.7)
    # layer 0: mean .25 → α·[.4, .8, 1.2, 1.6]; layer 1: no evidence → α; layer 2: 4α clipped to 2α
    want = torch.tensor([[0.28, 0.56, 0.84, 1.12], [0.7] * 4, [0.0, 0.0, 0.0, 1.4]], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    with pytest.raises(BadInput, match="alpha"):
        paint_head_alpha(mass, 6.0)
    probs = torch.zeros(1, 2, 3, 6, dtype=torch.float64)
    probs[0, 0, -1] = torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.1])
    probs[0, 1, -1] = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    probs[0, :, :2, 0] = 1.0
    m = paint_span_mass(probs, [(1, 3), (5, 6)])
    torch.testing.assert_close(m, torch.tensor([0.6, 0.3], dtype=torch.float64))
    m_all = paint_span_mass(probs, [(1, 3), (5, 6)], last_row_only=False)
    torch.testing.assert_close(m_all, torch.tensor([0.2, 0.1], dtype=torch.float64))
    # the per-head strengths feed head_boost directly
    HeadBoostParams(alpha=0.7, heads=(0, 1, 2, 3), head_alpha=tuple(got[0].tolist()), spans=((0, 4),))


def test_headhunter_greedy_finds_the_known_optimum():
    heads = [(layer, h) for layer in range(3) for h in range(4)]
    w = {hd: math.sin(7 * hd[0] + 3 * hd[1]) for hd in heads}
    calls = []

    def score(sel):
        calls.append(sel)
        return sum(w[h] for h in sel)

    res = headhunter_greedy(heads, score, rounds=3, k=2)
    best = max(itertools.combinations(heads, 6), key=lambda c: sum(w[h] for h in c))
    assert set(res.selected) == set(best) and len(res.selected) == 6
    assert len(calls) == 12 + 10 + 8
    assert res.rounds[0][0]["head"] == max(heads, key=w.get)
    # an interaction objective: a pair only pays off together; greedy picks the best single first
    pair = {(0, 1), (2, 3)}

    def synergy(sel):
        s = set(sel)
        return 1.0 * ((0, 0) in s) + 3.0 * (pair <= s) + 0.5 * ((0, 1) in s)

    res2 = headhunter_greedy([list(h) for h in heads], synergy, rounds=2, k=1)
    assert res2.selected == ((0, 0), (0, 1))
    # the pool runs dry: stops early
    assert headhunter_greedy([1, 2, 3], lambda s: -sum(s), rounds=5, k=2).selected == (1, 2, 3)
    with pytest.raises(BadInput, match="finite"):
        headhunter_greedy([1, 2], lambda s: float("nan"))
    with pytest.raises(BadInput, match="k="):
        headhunter_greedy([1, 2], lambda s: 0.0, k=0)


def test_load_objective():
    assert load_objective("math:sqrt")(9.0) == 3.0
    assert load_objective("os.path:join")("a", "b") == "a/b"
    for spec, needle in [("math", "module:function"), ("math:pi", "not a callable"), ("math:nope", "no attribute"),
                         ("surgeon_no_such_module_xyz:f", "cannot import")]:
        with pytest.raises(BadInput, match=needle):
            load_objective(spec)


@pytest.mark.parametrize("name", ["local_boost", "head_boost_all", "head_boost"])
def test_fused_bias_masks_stay_within_the_chunk_budget(name, monkeypatch):
    """The biased fused paths never build a float mask larger than CHUNK_ELEMS (no N×N for all heads)."""
    var, p, _ = CASES[name]
    q, k, v = _inputs(n=64, dtype=torch.float32)
    budget = 2048
    monkeypatch.setattr(modulation, "CHUNK_ELEMS", budget)
    sizes = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q_, k_, v_, attn_mask=None, **kw):
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            sizes.append(attn_mask.expand(q_.shape[0], q_.shape[1], q_.shape[2], k_.shape[2]).numel())
        return real(q_, k_, v_, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with use_impl("fused"):
        var.run(q, k, v, _ctx(True, _pad(n=64)), p)
    assert len(sizes) > 1 and max(sizes) <= budget
