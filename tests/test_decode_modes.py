"""Decode modes (one query against a KV cache): dense and TokenSelect — equal to dense at
degenerate parameters, fast = reference, the selection is token_topk's, reuse semantics, policy field."""
from __future__ import annotations

import json

import pytest
import torch

from surgeon.errors import BadInput
from surgeon.generation.decode import (
    TokenSelectDecode,
    TokenSelectParams,
    attend_kept_gather,
    attend_kept_reference,
    dense_over_cache,
    token_select_keep,
    token_select_keep_fast,
)

SCALE = 0.125


def _qkv(b=2, hq=6, hkv=2, nk=300, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
    return q, k, v


def _padding(b, nk, left=37):
    kp = torch.ones(b, nk, dtype=torch.bool)
    kp[1, :left] = False
    return kp


def _dense_ref(q, k, v, kp):
    from surgeon.attention.base import AttnContext, attention_from_keep

    return attention_from_keep(q, k, v, AttnContext(causal=True, scale=SCALE, kv_heads=k.shape[1], key_padding=kp))


@pytest.mark.parametrize("padded", [False, True])
def test_dense_over_cache_equals_reference(padded):
    q, k, v = _qkv()
    kp = _padding(2, 300) if padded else None
    torch.testing.assert_close(dense_over_cache(q, k, v, kp, SCALE), _dense_ref(q, k, v, kp), rtol=0, atol=1e-12)


@pytest.mark.parametrize("padded", [False, True])
def test_token_select_degenerate_is_dense(padded):
    q, k, v = _qkv()
    kp = _padding(2, 300) if padded else None
    p = TokenSelectParams(n_init=4, n_local=8, top_k=288)  # 4 + 288 + 8 ≥ 300 - 1: every token kept
    keep = token_select_keep(q, k, kp, p, SCALE)
    assert torch.equal(keep, kp if padded else torch.ones(2, 300, dtype=torch.bool))
    dense = _dense_ref(q, k, v, kp)
    torch.testing.assert_close(attend_kept_reference(q, k, v, kp, keep, SCALE), dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(attend_kept_gather(q, k, v, kp, keep, SCALE), dense, rtol=0, atol=1e-12)
    p = TokenSelectParams(n_init=0, n_local=0, top_k=0, keep=1.0)
    assert torch.equal(token_select_keep(q, k, kp, p, SCALE), keep)


@pytest.mark.parametrize("padded", [False, True])
def test_token_select_is_token_topk_at_one_query_and_fast_equals_reference(padded):
    from surgeon.attention.base import AttnContext
    from surgeon.attention.token_topk import TokenTopK, TokenTopKParams

    q, k, v = _qkv(seed=1)
    kp = _padding(2, 300) if padded else None
    p = TokenSelectParams(n_init=4, n_local=16, top_k=20)
    keep = token_select_keep(q, k, kp, p, SCALE)
    # init + voted + local + the query's own key (padding never kept)
    assert keep[0].sum() == 4 + 20 + 16 + 1
    assert keep[0, :4].all() and keep[0, -17:].all()
    if padded:
        assert not keep[1, :37].any()
    ref = attend_kept_reference(q, k, v, kp, keep, SCALE)
    ctx = AttnContext(causal=True, scale=SCALE, kv_heads=2, key_padding=kp)
    tt = TokenTopK().reference(q, k, v, ctx, TokenTopKParams(n_init=4, n_local=16, top_k=20, chunk=1))
    torch.testing.assert_close(ref, tt, rtol=0, atol=1e-12)
    torch.testing.assert_close(attend_kept_gather(q, k, v, kp, keep, SCALE), ref, rtol=0, atol=1e-12)
    assert float((ref - _dense_ref(q, k, v, kp)).abs().max()) > 1e-3  # really sparse


def test_token_select_votes_for_the_critical_tokens():
    """A token whose key aligns with the query in every head wins the soft vote."""
    q, k, v = _qkv(b=1, seed=2)
    k = k * 0.01
    k[0, :, 150] = q[0, ::3, 0] * 5  # KV head g serves query heads 3g..3g+2
    keep = token_select_keep(q, k, None, TokenSelectParams(n_init=2, n_local=2, top_k=1), SCALE)
    assert keep[0].nonzero().flatten().tolist() == [0, 1, 150, 297, 298, 299]


class _Plan:
    def __init__(self):
        from types import SimpleNamespace

        self.site = SimpleNamespace(name="s", scale=SCALE)
        self.state = SimpleNamespace(decode_state={})


def test_token_select_reuse_keeps_old_selection_plus_new_tokens():
    q, k, v = _qkv(b=1, nk=201, seed=3)
    p = TokenSelectParams(n_init=4, n_local=8, top_k=10, reuse_threshold=-1.0)  # always reuse
    mode, plan = TokenSelectDecode(params=p), _Plan()
    mode.run(plan, q, k[:, :, :200], v[:, :, :200], None)
    first = plan.state.decode_state["s"]["keep"].clone()
    q2 = torch.randn_like(q)
    out = mode.run(plan, q2, k, v, None)
    st = plan.state.decode_state["s"]
    assert st["selected"] == 1 and st["reused"] == 1
    want = torch.cat([first, torch.ones(1, 1, dtype=torch.bool)], dim=-1)
    torch.testing.assert_close(out, attend_kept_reference(q2, k, v, None, want, SCALE), rtol=0, atol=1e-12)
    # θ > 1: never reuse — a fresh selection at every step
    mode, plan = TokenSelectDecode(params=TokenSelectParams(n_init=4, n_local=8, top_k=10, reuse_threshold=1.5)), _Plan()
    mode.run(plan, q, k[:, :, :200], v[:, :, :200], None)
    out = mode.run(plan, q2, k, v, None)
    assert plan.state.decode_state["s"]["selected"] == 2 and "reused" not in plan.state.decode_state["s"]
    fresh = token_select_keep(q2, k, None, mode.params, SCALE)
    torch.testing.assert_close(out, attend_kept_reference(q2, k, v, None, fresh, SCALE), rtol=0, atol=1e-12)
    # the same query twice: cosine 1 ≥ 0.9 reuses at the default threshold
    mode, plan = TokenSelectDecode(params=TokenSelectParams(n_init=4, n_local=8, top_k=10)), _Plan()
    mode.run(plan, q, k[:, :, :200], v[:, :, :200], None)
    mode.run(plan, q, k, v, None)
    assert plan.state.decode_state["s"]["reused"] == 1


def test_decode_spec_in_recipe_and_policy_json(tmp_path):
    from surgeon.passes.policy import Policy, SiteChoice, policy_from_recipe

    names = [f"model.layers.{i}.self_attn" for i in range(4)]
    rec = {"model.layers.*": {"variant": "dense"},
           "model.layers.[23].self_attn": {"variant": "dense",
                                           "decode": {"mode": "token_select", "params": {"top_k": 64}}}}
    pol = policy_from_recipe(rec, "fp", names)
    assert pol.sites[names[0]].decode is None
    assert pol.sites[names[2]].decode.mode == "token_select" and pol.sites[names[2]].decode.params == {"top_k": 64}
    pol.save(tmp_path / "p.json")
    raw = json.loads((tmp_path / "p.json").read_text())
    assert "decode" not in raw["sites"][names[0]]  # policies without decode modes keep their old bytes
    assert raw["sites"][names[3]]["decode"] == {"mode": "token_select", "params": {"top_k": 64}}
    assert Policy.load(tmp_path / "p.json").sites == pol.sites
    assert SiteChoice(variant="dense").model_dump() == {"variant": "dense", "params": {}, "block_mask_from": None,
                                                        "modulators": [], "reason": ""}
    with pytest.raises(BadInput, match="unknown decode mode 'quest'"):
        policy_from_recipe({"model.layers.0.self_attn": {"variant": "dense", "decode": "quest"}}, "fp", names)
    with pytest.raises(BadInput, match="unknown token_select parameter"):
        policy_from_recipe({"model.layers.0.self_attn": {"variant": "dense",
                                                         "decode": {"mode": "token_select", "topk": 3}}}, "fp", names)
    with pytest.raises(BadInput, match="out of range"):
        policy_from_recipe({"model.layers.0.self_attn": {"variant": "dense",
                                                         "decode": {"mode": "token_select", "keep": 1.5}}}, "fp", names)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("params", [dict(n_init=4, n_local=16, top_k=20), dict(n_init=0, n_local=1, top_k=7),
                                    dict(n_init=8, n_local=8, keep=0.1), dict(n_init=300, n_local=0, top_k=5)])
def test_fast_selection_equals_reference_selection(padded, params):
    q, k, _ = _qkv(seed=5)
    kp = _padding(2, 300) if padded else None
    p = TokenSelectParams(**params)
    assert torch.equal(token_select_keep_fast(q, k, kp, p), token_select_keep(q, k, kp, p, SCALE))


@pytest.mark.parametrize("theta", [-1.0, 0.5, 1.5])
@pytest.mark.parametrize("padded", [False, True])
def test_fast_steps_equal_reference_steps(theta, padded):
    """Several decode steps over a growing cache: the gather path (which appends new tokens to its
    gathered K/V on reused steps) equals the reference at every step, and selects/reuses alike."""
    q, k, v = _qkv(nk=240, seed=6)
    g = torch.Generator().manual_seed(9)
    kp = _padding(2, 240) if padded else None
    p = TokenSelectParams(n_init=4, n_local=8, top_k=12, reuse_threshold=theta)
    mode = TokenSelectDecode(params=p)
    fast, ref = {}, {}
    for step, nk in enumerate(range(200, 240, 4)):
        qs = q + 0.3 * step * torch.randn(q.shape, generator=g, dtype=q.dtype)
        kps = kp[:, :nk] if kp is not None else None
        a = mode.step(fast, qs, k[:, :, :nk], v[:, :, :nk], kps, SCALE, fast=True)
        b = mode.step(ref, qs, k[:, :, :nk], v[:, :, :nk], kps, SCALE, fast=False)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert fast["selected"] == ref["selected"] and fast.get("reused") == ref.get("reused")
    assert fast["kept"] == ref["kept"]
    if theta < 0:
        assert fast["selected"] == 1 and fast["reused"] == 9
    if theta > 1:
        assert fast["selected"] == 10


@pytest.mark.parametrize("params", [dict(n_init=4, n_local=16, top_k=20), dict(n_init=0, n_local=0, top_k=7),
                                    dict(n_init=8, n_local=8, keep=0.1), dict(n_init=4, n_local=8, top_k=1000)])
def test_fast_positions_equal_reference_selection(params):
    from surgeon.generation.decode import token_select_idx_fast

    q, k, _ = _qkv(seed=7)
    p = TokenSelectParams(**params)
    want = token_select_keep(q, k, None, p, SCALE)
    idx = token_select_idx_fast(q, k, p)
    assert torch.equal(torch.zeros_like(want).scatter_(-1, idx, True), want)
    assert bool((idx[:, 1:] > idx[:, :-1]).all())  # position order, no duplicates


def test_token_reuse_attends_to_the_anchor_selection():
    from types import SimpleNamespace

    from surgeon.attention.base import use_impl
    from surgeon.generation.decode import TokenReuseDecode

    q, k, v = _qkv(seed=8)
    q2, k2, v2 = _qkv(seed=9)
    state = SimpleNamespace(decode_state={})
    anchor = SimpleNamespace(site=SimpleNamespace(name="a", scale=SCALE), state=state,
                             decode=TokenSelectDecode(params=TokenSelectParams(n_init=4, n_local=8, top_k=10)))
    cons = SimpleNamespace(site=SimpleNamespace(name="c", scale=SCALE), state=state,
                           decode=TokenReuseDecode.from_params({"anchor": "a"}, "c"))
    for kp in (None, _padding(2, 300)):
        state.decode_state.clear()
        anchor.decode.run(anchor, q, k, v, kp)
        keep = state.decode_state["a"]["keep"]
        want = attend_kept_reference(q2, k2, v2, kp, keep, SCALE)
        torch.testing.assert_close(cons.decode.run(cons, q2, k2, v2, kp), want, rtol=0, atol=1e-12)
        with use_impl("reference"):
            torch.testing.assert_close(cons.decode.run(cons, q2, k2, v2, kp), want, rtol=0, atol=1e-12)
    with pytest.raises(BadInput, match="did not run this step"):
        cons.decode.run(cons, q2, k2[:, :, :-1], v2[:, :, :-1], None)


def test_token_reuse_validation():
    from types import SimpleNamespace

    from surgeon.generation.decode import DenseDecode, TokenReuseDecode, validate_decode_plans

    with pytest.raises(BadInput, match="needs an anchor"):
        TokenReuseDecode.from_params({}, "c")
    sel = SimpleNamespace(decode=TokenSelectDecode())
    reuse = SimpleNamespace(decode=TokenReuseDecode(anchor="a"))
    validate_decode_plans({"a": sel, "c": reuse})
    with pytest.raises(BadInput, match="runs after it"):
        validate_decode_plans({"c": reuse, "a": sel})
    with pytest.raises(BadInput, match="does not select tokens for all heads"):
        validate_decode_plans({"a": SimpleNamespace(decode=DenseDecode()), "c": reuse})
    with pytest.raises(BadInput, match="not a site"):
        validate_decode_plans({"b": sel, "c": reuse})


def test_recipe_decode_only_entry_keeps_variants():
    from surgeon.passes.policy import policy_from_recipe

    names = [f"model.layers.{i}.self_attn" for i in range(4)]
    rec = {"model.layers.*": {"variant": "block_topk", "keep": 0.2},
           "model.layers.[13].self_attn": {"decode": {"mode": "token_select", "params": {"top_k": 8}}}}
    pol = policy_from_recipe(rec, "fp", names)
    for i, n in enumerate(names):
        assert pol.sites[n].variant == "block_topk" and pol.sites[n].params == {"keep": 0.2}
        assert (pol.sites[n].decode is not None) == (i in (1, 3))
    with pytest.raises(BadInput, match="matches no site"):
        policy_from_recipe({"nope.*": {"decode": "token_select"}}, "fp", names)
