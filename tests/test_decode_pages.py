"""Page decode modes: Quest's page_select and DELTA's delta_plan (+ token_reuse as its sparse layers).

Bounds are upper bounds, the selection is Quest's ranking (one query head per KV head), degenerate
parameters are dense, the incremental fast path equals the reference step by step, padding is
never attended, DELTA's page set follows its rules, and bad parameters are one-line errors."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from surgeon.errors import BadInput
from surgeon.generation.decode import TokenReuseDecode, dense_over_cache, mode_from_spec, validate_decode_plans
from surgeon.generation.decode_pages import (
    DeltaPlanDecode,
    DeltaPlanParams,
    PageLayout,
    PageSelectDecode,
    PageSelectParams,
    delta_keep,
    exact_probs,
    page_bounds,
    page_select_keep,
    quest_bounds,
)

SCALE = 0.125


def _qkv(b=2, hq=6, hkv=2, nk=300, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, 1, d, generator=g, dtype=torch.float64),
            torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64),
            torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64))


def _padding(b, nk, left=37):
    kp = torch.ones(b, nk, dtype=torch.bool)
    kp[1, :left] = False
    return kp


def test_quest_bounds_are_upper_bounds_of_every_logit_in_the_page():
    q, k, _ = _qkv(b=1, hq=6, hkv=2, nk=160)
    ps = 16
    kmin, kmax = page_bounds(k, None, 0, 10, ps)
    u = quest_bounds(q, kmin, kmax, SCALE)  # [1, 2, 3, 10]
    z = torch.matmul(q[:, :, -1, :].reshape(1, 2, 3, 16), k.transpose(-1, -2)) * SCALE  # [1, 2, 3, 160]
    zmax = z.reshape(1, 2, 3, 10, ps).amax(dim=-1)
    assert bool((u >= zmax - 1e-12).all())
    # a page of one repeated key: the bound is exact
    k1 = k.clone()
    k1[:, :, :ps] = k1[:, :, :1]
    lo, hi = page_bounds(k1, None, 0, 1, ps)
    z1 = torch.matmul(q[:, :, -1, :].reshape(1, 2, 3, 16), k1[:, :, :1].transpose(-1, -2))[..., 0] * SCALE
    torch.testing.assert_close(quest_bounds(q, lo, hi, SCALE)[..., 0], z1, rtol=0, atol=1e-12)


def test_page_bounds_leave_padding_out():
    _, k, _ = _qkv(b=2, nk=64)
    kp = _padding(2, 64, left=20)
    lo, hi = page_bounds(k, kp, 0, 4, 16)
    assert bool(torch.isinf(lo[1, :, 0]).all()) and bool((lo[1, :, 0] > 0).all())  # page 0 of row 1: padding only
    torch.testing.assert_close(lo[1, :, 1], k[1, :, 20:32].amin(dim=1))  # page 1: its real keys only
    torch.testing.assert_close(hi[1, :, 1], k[1, :, 20:32].amax(dim=1))
    torch.testing.assert_close(lo[0], k[0].reshape(2, 4, 16, 16).amin(dim=2))


def test_page_select_ranks_pages_by_the_quest_bound_without_gqa():
    q, k, _ = _qkv(b=1, hq=2, hkv=2, nk=161)
    p = PageSelectParams(page_size=16, top_pages=3, local_pages=0)
    keep = page_select_keep(q, k, None, p, SCALE)
    kmin, kmax = page_bounds(k, None, 0, 10, 16)
    top = quest_bounds(q, kmin, kmax, SCALE)[:, :, 0].topk(3, dim=-1).indices.sort(dim=-1).values
    for h in range(2):
        want = torch.zeros(161, dtype=torch.bool)
        for j in top[0, h].tolist():
            want[j * 16:(j + 1) * 16] = True
        want[160:] = True  # the last (partial) page: the new token's
        assert torch.equal(keep[0, h], want)


def test_page_select_finds_the_page_of_a_planted_key():
    q, k, v = _qkv(b=1, hq=3, hkv=1, nk=400, d=16)
    k[0, 0, 217] = q[0, :, 0].mean(dim=0) * 8  # one key all the heads attend to
    keep = page_select_keep(q, k, None, PageSelectParams(page_size=16, top_pages=2, local_pages=1), SCALE)
    assert bool(keep[0, 0, 208:224].all()) and int(keep.sum()) == 2 * 16 + 16 + 16  # two voted pages, the local page, the tail page


@pytest.mark.parametrize("padded", [False, True])
def test_page_select_degenerate_is_dense(padded):
    q, k, v = _qkv()
    kp = _padding(2, 300) if padded else None
    p = PageSelectParams(page_size=16, top_pages=18)  # 18 complete pages, the local one among them
    assert PageLayout.of(300, p).keeps_everything
    dense = dense_over_cache(q, k, v, kp, SCALE)
    for fast in (False, True):
        st: dict = {}
        torch.testing.assert_close(PageSelectDecode(p).step(st, q, k, v, kp, SCALE, fast), dense, rtol=0, atol=1e-12)
        assert st["dense"] == 1 and st["kept"] == (600 if kp is None else int(kp.sum()))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("params", [PageSelectParams(page_size=16, top_pages=4),
                                    PageSelectParams(page_size=8, keep=0.2, init_pages=1, local_pages=2)])
def test_page_select_fast_steps_equal_reference_steps(padded, params):
    """The fast path keeps page bounds across steps and extends them as pages fill: over a cache
    growing one token per step (pages completing on the way) it equals the reference step."""
    q0, k0, v0 = _qkv(b=2, nk=260, seed=3)
    kp0 = _padding(2, 260, left=50) if padded else None
    mode = PageSelectDecode(params)
    st_fast: dict = {}
    st_ref: dict = {}
    g = torch.Generator().manual_seed(9)
    for step in range(20):
        nk = 240 + step
        k, v = k0[:, :, :nk], v0[:, :, :nk]
        kp = kp0[:, :nk] if padded else None
        q = torch.randn(q0.shape, generator=g, dtype=torch.float64)
        ref = mode.step(st_ref, q, k, v, kp, SCALE, fast=False)
        out = mode.step(st_fast, q, k, v, kp, SCALE, fast=True)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        assert float((ref - dense_over_cache(q, k, v, kp, SCALE)).abs().max()) > 1e-6  # a real selection
    assert st_fast["selected"] == st_ref["selected"] == 20
    assert st_fast["pages"] == (259 - 1) // params.page_size
    assert abs(st_fast["kept"] - st_ref["kept"]) < 1e-9 and st_fast["kept"] < 0.5 * st_fast["visible"]


def test_page_select_is_causal_and_never_attends_padding():
    """Changing a padded key or a key of an unselected page does not change the output."""
    q, k, v = _qkv(b=2, nk=300)
    kp = _padding(2, 300, left=40)
    p = PageSelectParams(page_size=16, top_pages=3)
    mode = PageSelectDecode(p)
    out = mode.step({}, q, k, v, kp, SCALE, fast=True)
    keep = page_select_keep(q, k, kp, p, SCALE)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, :40] = 100.0
    v2[1, :, :40] = 100.0  # padding of row 1 (page bounds then see it... but it is left out)
    torch.testing.assert_close(mode.step({}, q, k2, v2, kp, SCALE, fast=True), out, rtol=0, atol=1e-12)
    off = (~keep[0, 0]).nonzero().flatten()[0]
    v3 = v.clone()
    v3[0, 0, off] = 50.0  # a value the selection left out of head group 0
    torch.testing.assert_close(mode.step({}, q, k, v3, kp, SCALE, fast=True), out, rtol=0, atol=1e-12)


def test_delta_plan_output_is_dense_and_its_page_set_follows_delta():
    q, k, v = _qkv(b=2, nk=300)
    kp = _padding(2, 300, left=40)
    p = DeltaPlanParams(page_size=16, top_pages=6, recent_pages=2)
    for fast in (False, True):
        st: dict = {}
        out = DeltaPlanDecode(p).step(st, q, k, v, kp, SCALE, fast)
        torch.testing.assert_close(out, dense_over_cache(q, k, v, kp, SCALE), rtol=0, atol=1e-12)
    keep = st["keep"]
    assert st["n"] == 300 and keep.shape == (2, 300)
    prob = exact_probs(q, k, kp, SCALE)
    score = torch.nn.functional.pad(prob.amax(dim=1), (0, 304 - 300)).reshape(2, 19, 16).sum(-1)
    for row in range(2):
        pages = sorted({int(t) // 16 for t in keep[row].nonzero().flatten()})
        assert {17, 18} <= set(pages)  # the recent pages are forced in
        others = [j for j in range(17) if j not in pages]
        chosen = [j for j in pages if j < 17]
        assert len(pages) <= 6 and min(score[row, chosen]) >= max(score[row, others])
    assert not bool(keep[1, :40].any())  # padding never kept
    # fewer pages than top_pages · compression_ratio: everything is kept
    small = delta_keep(prob, None, DeltaPlanParams(page_size=16, top_pages=6, compression_ratio=4.0))
    assert bool(small.all())


def test_token_reuse_anchored_at_delta_plan_attends_its_pages():
    from surgeon.attention.base import AttnContext, attention_from_keep, use_impl

    q, k, v = _qkv(b=2, nk=300)
    kp = _padding(2, 300, left=40)
    state = SimpleNamespace(decode_state={})
    site = lambda n: SimpleNamespace(name=n, scale=SCALE)  # noqa: E731
    plan_a = SimpleNamespace(site=site("a"), state=state, decode=DeltaPlanDecode(DeltaPlanParams(top_pages=5)))
    plan_b = SimpleNamespace(site=site("b"), state=state, decode=TokenReuseDecode(anchor="a"))
    validate_decode_plans({"a": plan_a, "b": plan_b})
    for impl in ("reference", "gather"):
        with use_impl(impl):
            plan_a.decode.run(plan_a, q, k, v, kp)
            out = plan_b.decode.run(plan_b, q, k, v, kp)
        keep = state.decode_state["a"]["keep"]
        ctx = AttnContext(causal=True, scale=SCALE, kv_heads=2, key_padding=kp)
        torch.testing.assert_close(out, attention_from_keep(q, k, v, ctx, keep[:, None, None, :]), rtol=0, atol=1e-12)
    assert int(keep[0].sum()) == 5 * 16 - (16 - 300 % 16)  # the five most recent pages, the last one partial
    assert bool(keep[0, -(5 * 16 - 4):].all())


def test_page_modes_validate_their_params_and_anchors():
    with pytest.raises(BadInput, match="unknown page_select parameter"):
        mode_from_spec({"mode": "page_select", "params": {"pages": 3}}, "s")
    with pytest.raises(BadInput, match="page_size"):
        mode_from_spec({"mode": "page_select", "params": {"page_size": 0}}, "s")
    with pytest.raises(BadInput, match="not an integer"):
        mode_from_spec({"mode": "delta_plan", "params": {"top_pages": 2.5}}, "s")
    with pytest.raises(BadInput, match="takes no parameters"):
        mode_from_spec({"mode": "dense", "params": {"x": 1}}, "s")
    assert mode_from_spec({"mode": "page_select", "params": {"top_pages": 8}}, "s").describe() == {
        "mode": "page_select", "params": {**PageSelectParams(top_pages=8).to_dict()}}
    # Quest keeps a page set per KV head: no shared position set for token_reuse
    with pytest.raises(BadInput, match="does not select tokens for all heads"):
        validate_decode_plans({"a": SimpleNamespace(decode=PageSelectDecode()),
                               "b": SimpleNamespace(decode=TokenReuseDecode(anchor="a"))})
