"""Adaptive sparse variants (issue 14 item 3): block_topp, head_hybrid, token_topp, vertical_slash.

The shared matrix (tests/test_variant_matrix.py, test_onnx_lowering.py) covers degenerate = dense,
causality, fast = reference and ONNX = op for every registered variant; here: brute-force checks of
each selection rule as written in the variant's docstring, the properties that make them adaptive,
parameter validation and the recorded densities.
"""
from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from surgeon.attention import AttnContext, get_variant, recording, use_impl
from surgeon.attention.base import encode_config
from surgeon.attention.block_topk import BlockTopK, BlockTopKParams
from surgeon.attention.block_topp import BlockTopP, BlockTopPParams, estimate_block_mass
from surgeon.attention.dense import Dense
from surgeon.attention.head_hybrid import HeadHybrid, HeadHybridParams
from surgeon.attention.ops import op_for
from surgeon.attention.registry import VARIANTS
from surgeon.errors import BadInput


def _qkv(b=2, hq=6, hkv=2, nq=80, nk=None, d=8, seed=0, dtype=torch.float64):
    nk = nq if nk is None else nk
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    return q, k, v


def _pad(b, n, left=(0, 9)):
    m = torch.ones(b, n, dtype=torch.bool)
    for i, L in enumerate(left[:b]):
        m[i, :L] = False
    return m


def _ctx(causal, kv=2, padding=None, d=8, attn_mask=None):
    return AttnContext(causal=causal, scale=d ** -0.5, kv_heads=kv, key_padding=padding, attn_mask=attn_mask)


# ----------------------------------------------------------------------------- block_topp

def _brute_mass(q, k, ctx, bs, stride):
    """The estimator by loops: sampled rows, softmax over visible real keys, block sums, mean."""
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    off = nk - nq
    kp = ctx.key_padding if ctx.key_padding is not None else torch.ones(b, nk, dtype=torch.bool)
    mass = torch.zeros(b, hq, nqb, nkb, dtype=torch.float64)
    live = torch.zeros(b, nqb, dtype=torch.bool)
    for bi in range(b):
        for qb in range(nqb):
            if ctx.causal:
                rows = [qb * bs - t * stride for t in range(math.ceil(bs / stride)) if qb * bs - t * stride >= 0]
            else:
                rows = [qb * bs + t * stride for t in range(math.ceil(bs / stride))
                        if qb * bs + t * stride < min(qb * bs + bs, nq)]
            if ctx.causal or nq == nk:
                rows = [r for r in rows if bool(kp[bi, off + r])]
            used = 0
            acc = torch.zeros(hq, nkb, dtype=torch.float64)
            for r in rows:
                vis = [j for j in range(nk) if bool(kp[bi, j]) and (not ctx.causal or j <= off + r)]
                if not vis:
                    continue
                used += 1
                for h in range(hq):
                    z = (k[bi, h // (hq // hkv), vis].double() @ q[bi, h, r].double()) * ctx.scale
                    pr = torch.softmax(z, 0)
                    for j, pj in zip(vis, pr):
                        acc[h, j // bs] += float(pj)
            if used:
                mass[bi, :, qb] = acc / used
                live[bi, qb] = True
    return mass, live


def _brute_topp(q, k, ctx, p: BlockTopPParams):
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    bs = p.block_size
    nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    off = nk - nq
    kp = ctx.key_padding if ctx.key_padding is not None else torch.ones(b, nk, dtype=torch.bool)
    mass, live = _brute_mass(q, k, ctx, bs, p.stride)
    ph = p.head_p or (p.p,) * hq
    out = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            for qb in range(nqb):
                first, last = off + qb * bs, off + min((qb + 1) * bs, nq) - 1
                diag = min(max(last // bs, 0), nkb - 1)
                allowed = [kb for kb in range(nkb) if (not ctx.causal or kb * bs <= last)]
                forced = [kb for kb in allowed if kb < p.sink_blocks or diag - p.local_blocks < kb <= diag
                          or (ctx.causal and min(kb * bs + bs, nk) - 1 > first)]
                cands = [kb for kb in allowed if kb not in forced and bool(kp[bi, kb * bs:(kb + 1) * bs].any())]
                m = mass[bi, h, qb]
                order = sorted(cands, key=lambda kb: (-float(m[kb]), kb))
                if ph[h] >= 1.0 or not live[bi, qb] or last < p.dense_below:
                    chosen = order
                else:
                    covered = sum(float(m[kb]) for kb in forced)
                    total = sum(float(m[kb]) for kb in allowed)
                    chosen = []
                    for kb in order:
                        if covered >= ph[h] * total:
                            break
                        chosen.append(kb)
                        covered += float(m[kb])
                    lo = max(p.min_blocks, math.ceil(len(allowed) * p.min_fraction - 1e-9))
                    hi = max(math.ceil(len(allowed) * p.max_fraction - 1e-9), len(forced))
                    n = min(max(len(forced) + len(chosen), lo), hi) - len(forced)
                    chosen = order[:max(n, 0)]
                out[bi, h, qb, forced + chosen] = True
    return out


@pytest.mark.parametrize("causal,nq,nk,bs,stride", [(True, 40, 40, 8, 3), (False, 40, 40, 8, 3), (True, 37, 37, 8, 8),
                                                     (False, 37, 37, 8, 8), (True, 20, 45, 8, 2)])
def test_block_topp_estimator_matches_brute_force(causal, nq, nk, bs, stride):
    q, k, _ = _qkv(b=2, nq=nq, nk=nk)
    ctx = _ctx(causal, padding=_pad(2, nk))
    mass, live = estimate_block_mass(q, k, ctx, bs, stride)
    want_m, want_l = _brute_mass(q, k, ctx, bs, stride)
    torch.testing.assert_close(mass, want_m, rtol=1e-9, atol=1e-12)
    assert torch.equal(live[:, 0], want_l)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("params", [
    dict(p=0.7, block_size=8, stride=3),
    dict(p=0.5, head_p=(0.2, 0.4, 0.6, 0.8, 0.9, 1.0), block_size=8, stride=2, sink_blocks=0, local_blocks=2),
    dict(p=0.3, block_size=8, stride=4, min_blocks=4, max_fraction=0.6, dense_below=20),
    dict(p=0.9, block_size=8, stride=8, min_fraction=0.5),
])
def test_block_topp_selection_matches_brute_force(causal, params):
    q, k, _ = _qkv(b=2, nq=56)
    ctx = _ctx(causal, padding=_pad(2, 56))
    p = BlockTopPParams(**params)
    assert torch.equal(BlockTopP().select(q, k, ctx, p), _brute_topp(q, k, ctx, p))


def _spike_inputs(n=64, d=8):
    """One query direction; key block 2 holds one key aligned with it among 7 opposed keys (its
    mean points away), every other key is orthogonal noise: a vertical stripe mean pooling hides."""
    g = torch.Generator().manual_seed(3)
    u = torch.zeros(d, dtype=torch.float64)
    u[0] = 1.0
    q = (u * 6.0).expand(1, 1, n, d).clone() + 0.05 * torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    k = 0.3 * torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    k[..., 0] = 0.0
    k[0, 0, 16:24, 0] = -1.0
    k[0, 0, 19, 0] = 4.0  # the spike
    v = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    return q, k, v


def test_block_topp_is_not_fooled_by_mean_pooling():
    q, k, v = _spike_inputs()
    ctx = _ctx(True, kv=1)
    blk_topk = BlockTopK().select(q, k, ctx, BlockTopKParams(keep=0.3, block_size=8, sink_blocks=0, local_blocks=1))
    blk_topp = BlockTopP().select(q, k, ctx, BlockTopPParams(p=0.8, block_size=8, stride=4, sink_blocks=0,
                                                             local_blocks=1))
    later = slice(4, 8)  # query blocks after the spike's block (not forced there)
    assert not bool(blk_topk[0, 0, later, 2].any()), "mean pooling should miss the stripe (test premise)"
    assert bool(blk_topp[0, 0, later, 2].all())
    # and the kept set is small: the spike carries the mass, most other blocks are dropped
    assert float(blk_topp[0, 0, later].sum(dim=-1).double().mean()) <= 3.0
    dense = Dense().reference(q, k, v, ctx, Dense.Params())
    out, _ = BlockTopP().reference(q, k, v, ctx, BlockTopPParams(p=0.8, block_size=8, stride=4, sink_blocks=0))
    err = float((out[:, :, 32:] - dense[:, :, 32:]).norm() / dense[:, :, 32:].norm())
    assert err < 0.05, err


def test_block_topp_budget_follows_p_and_heads():
    q, k, v = _qkv(b=1, nq=96, dtype=torch.float32)
    ctx = _ctx(True)
    var = BlockTopP()
    dens = [var.achieved_density(q, k, v, ctx, BlockTopPParams(p=x, block_size=8, stride=2))
            for x in (0.3, 0.6, 0.9, 1.0)]
    assert dens == sorted(dens) and dens[0] < dens[-1] == 1.0
    # a larger p never drops a block a smaller p keeps (same ranking, longer prefix)
    lo = var.select(q, k, ctx, BlockTopPParams(p=0.4, block_size=8, stride=2))
    hi = var.select(q, k, ctx, BlockTopPParams(p=0.8, block_size=8, stride=2))
    assert bool((lo <= hi).all()) and int(hi.sum()) > int(lo.sum())
    # per-head p: the head with p=1 is dense over allowed blocks, the others are sparser
    p = BlockTopPParams(p=0.5, head_p=(0.3, 0.3, 0.3, 0.3, 0.3, 1.0), block_size=8, stride=2)
    sel = var.select(q, k, ctx, p)
    assert int(sel[0, 5].sum()) == sum(i + 1 for i in range(12)) > int(sel[0, 0].sum())


def test_block_topp_dense_below_and_budget_bounds():
    q, k, v = _qkv(b=1, nq=96)
    ctx = _ctx(True)
    var = BlockTopP()
    sel = var.select(q, k, ctx, BlockTopPParams(p=0.2, block_size=8, stride=4, dense_below=48))
    # query blocks ending before position 48 keep every allowed block; later ones do not
    for i in range(12):
        if 8 * i + 7 < 48:
            assert int(sel[0, :, i].sum(dim=-1).min()) == i + 1
    assert int(sel[0, :, 11].sum(dim=-1).max()) < 12
    sel = var.select(q, k, ctx, BlockTopPParams(p=0.05, block_size=8, stride=4, min_blocks=5))
    assert int(sel[0, :, 4:].sum(dim=-1).min()) == 5
    sel = var.select(q, k, ctx, BlockTopPParams(p=0.99, block_size=8, stride=4, max_fraction=0.25))
    assert int(sel[0, :, 11].sum(dim=-1).max()) == 3  # ⌈0.25 · 12⌉


def test_block_topp_density_recorded_and_params_validated():
    q, k, v = _qkv(b=1, nq=96, dtype=torch.float32)
    ctx = _ctx(True)
    var = BlockTopP()
    p = BlockTopPParams(p=0.6, block_size=16, stride=4)
    want = var.achieved_density(q, k, v, ctx, p)
    allow = torch.ones(96, 96, dtype=torch.bool).tril()
    keep = var.keep_mask(q, k, v, ctx, p) & allow
    assert want == pytest.approx(float(keep.sum()) / (6 * float(allow.sum())), rel=1e-9)
    for mode in ("reference", "gather"):
        with use_impl(mode), recording() as rec:
            var.run(q, k, v, ctx, p)
        assert len(rec.records) == 1 and rec.records[0]["achieved"] == pytest.approx(want, rel=1e-9)
    for bad, name in ((dict(p=0.0), "p"), (dict(p=1.2), "p"), (dict(stride=0), "stride"),
                      (dict(max_fraction=0.0), "max_fraction"), (dict(min_fraction=-0.1), "min_fraction"),
                      (dict(head_p=()), "head_p"), (dict(head_p=(0.5, 1.5)), "head_p[1]")):
        with pytest.raises(BadInput) as e:
            BlockTopPParams(**bad)
        assert str(e.value).startswith(name), str(e.value)
    with pytest.raises(BadInput, match="query heads"):
        var.select(q, k, ctx, BlockTopPParams(head_p=(0.5, 0.5)))
    assert BlockTopPParams.from_dict(p.to_dict()) == p


def test_block_topp_kernel_density_counts_padding_and_overheads():
    q, k, v = _qkv(b=2, nq=128, dtype=torch.float32)
    ctx = _ctx(True)
    var = BlockTopP()
    p = BlockTopPParams(p=0.5, head_p=(0.2, 0.4, 0.5, 0.6, 0.8, 0.9), block_size=16, stride=4)
    ach, ker = var.achieved_density(q, k, v, ctx, p), var.kernel_density(q, k, v, ctx, p)
    assert 0 < ach < ker <= 1.5  # per-head imbalance is paid for by padding
    # uniform counts and no causal boundary: the kernel computes exactly the kept pairs
    full = BlockTopPParams(p=1.0, block_size=16, stride=4)
    assert var.kernel_density(q, k, v, _ctx(False), full) == pytest.approx(1.0)
    assert var.selection_overhead(p) == pytest.approx(4 / 16)
    hh = HeadHybridParams(kinds=("dense", "sparse", "streaming"), block_size=16, stride=4)
    assert get_variant("head_hybrid").selection_overhead(hh) == pytest.approx(4 / 16 / 3)
    assert get_variant("token_topp").selection_overhead(get_variant("token_topp").Params(chunk=32)) == 1 / 32
    assert get_variant("dense").selection_overhead(Dense.Params()) == 0.0


def _ort_run(name, p, causal, feeds, scale=0.35, kvh=2):
    from surgeon.exporters import onnx_lowering as L

    cfg = encode_config(name, p, {"kv_heads": kvh, "site": "t", "layer": 0})
    proto = L.single_op_model(name, cfg, causal, scale, feeds)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: feeds[i.name].numpy() for i in sess.get_inputs()})
    with use_impl("reference"):
        want = op_for(name)(feeds["q"], feeds["k"], feeds["v"], feeds.get("key_padding"), feeds.get("attn_mask"),
                            causal, scale, cfg)
    want = [w.numpy() for w in want] if isinstance(want, (tuple, list)) else [want.numpy()]
    return got, want


@pytest.mark.parametrize("causal", [True, False])
def test_block_topp_onnx_with_bool_attn_mask(causal):
    """An explicit attn_mask takes the token-mask body; outputs and block masks equal the op."""
    q, k, v = _qkv(b=2, nq=40, d=8, seed=4, dtype=torch.float32)
    kp = _pad(2, 40, (0, 5))
    am = torch.rand(2, 1, 40, 40, generator=torch.Generator().manual_seed(1)) > 0.2
    feeds = {"q": q, "k": k, "v": v, "key_padding": kp, "attn_mask": am}
    got, want = _ort_run("block_topp", BlockTopPParams(p=0.6, block_size=4, stride=2), causal, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=2e-5)
    np.testing.assert_array_equal(got[1], want[1])


# ----------------------------------------------------------------------------- head_hybrid

from surgeon.attention.window_sink import WindowSink, WindowSinkParams  # noqa: E402


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sparse", ["block_topp", "block_topk"])
def test_head_hybrid_each_group_equals_its_own_variant(causal, sparse):
    """Three KV groups (dense, streaming, sparse): each group's heads equal the variant of that
    kind run on the whole site, for the reference and the split fast path."""
    q, k, v = _qkv(b=2, hq=6, hkv=3, nq=72, dtype=torch.float32, seed=5)
    ctx = _ctx(causal, kv=3, padding=_pad(2, 72, (0, 6)))
    p = HeadHybridParams(kinds=("dense", "streaming", "sparse"), sink_tokens=3, window=10, sparse=sparse, p=0.6,
                         keep=0.3, block_size=8, stride=2)
    want = torch.empty(2, 6, 72, 8)
    want[:, 0:2] = Dense().reference(q, k, v, ctx, Dense.Params())[:, 0:2]
    want[:, 2:4] = WindowSink().reference(q, k, v, ctx, WindowSinkParams(sink_tokens=3, window=10))[:, 2:4]
    name, sp = p.sparse_params()
    want[:, 4:6] = get_variant(name).reference(q, k, v, ctx, sp)[0][:, 4:6]
    valid = ctx.key_padding[:, None, :, None].expand_as(want) if causal else torch.ones_like(want, dtype=torch.bool)
    var = HeadHybrid()
    for mode in ("reference", "split"):
        with use_impl(mode):
            got = var.run(q, k, v, ctx, p)
        torch.testing.assert_close(got[valid], want[valid], rtol=2e-4, atol=2e-4, msg=mode)


def test_head_hybrid_all_dense_kinds_and_density():
    q, k, v = _qkv(b=1, hq=6, hkv=2, nq=64, dtype=torch.float32)
    ctx = _ctx(True)
    var = HeadHybrid()
    dense = Dense().reference(q, k, v, ctx, Dense.Params())
    for kinds in ((), ("dense",), ("dense", "dense")):
        p = HeadHybridParams(kinds=kinds)
        for mode in ("reference", "split"):
            with use_impl(mode):
                torch.testing.assert_close(var.run(q, k, v, ctx, p), dense, rtol=1e-5, atol=1e-5)
        assert var.achieved_density(q, k, v, ctx, p) == 1.0
    p = HeadHybridParams(kinds=("streaming", "sparse"), sink_tokens=2, window=8, p=0.5, block_size=8, stride=2)
    d_stream = WindowSink().achieved_density(q, k, v, ctx, WindowSinkParams(sink_tokens=2, window=8))
    _, sp = p.sparse_params()
    sel = BlockTopP().select(q, k, ctx, sp)[:, 3:]
    allow = torch.ones(64, 64, dtype=torch.bool).tril()
    d_sparse = float((upsample(sel, 8) & allow).sum()) / (3 * float(allow.sum()))
    assert var.achieved_density(q, k, v, ctx, p) == pytest.approx((d_stream + d_sparse) / 2, rel=1e-9)
    with use_impl("split"), recording() as rec:
        var.run(q, k, v, ctx, p)
    assert rec.records[0]["achieved"] == pytest.approx((d_stream + d_sparse) / 2, rel=1e-9)


def upsample(sel, bs):
    from surgeon.kernels.geometry import upsample_block_mask

    return upsample_block_mask(sel, sel.shape[2] * bs, sel.shape[3] * bs, bs, bs)


def test_head_hybrid_rejects_bad_kinds():
    with pytest.raises(BadInput, match=r"^kinds\[1\]='retrieval'"):
        HeadHybridParams(kinds=("dense", "retrieval"))
    with pytest.raises(BadInput, match="^kinds='dense' is not a list"):
        HeadHybridParams(kinds="dense")
    with pytest.raises(BadInput, match="^sparse="):
        HeadHybridParams(sparse="pyramid")
    q, k, v = _qkv(b=1, hq=6, hkv=2, nq=32)
    with pytest.raises(BadInput, match="3 entries but the site has 2 KV heads"):
        HeadHybrid().reference(q, k, v, _ctx(True), HeadHybridParams(kinds=("dense", "dense", "sparse")))
    p = HeadHybridParams(kinds=("dense", "streaming"))
    assert HeadHybridParams.from_dict(p.to_dict()) == p


# ----------------------------------------------------------------------------- token_topp

from surgeon.attention.token_topk import selection_keep  # noqa: E402
from surgeon.attention.token_topp import TokenTopP, TokenTopPParams, select_tokens_topp  # noqa: E402


def _token_topp_brute(q, k, ctx, p):
    """Per-chunk selection from the written rule (loops), bool [B, Nq, Nk]."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    off = nk - nq
    real = ctx.key_padding if ctx.key_padding is not None else torch.ones(b, nk, dtype=torch.bool)
    keep = torch.zeros(b, nq, nk, dtype=torch.bool)
    for bi in range(b):
        for r0 in range(0, nq, p.chunk):
            r1 = min(nq, r0 + p.chunk)
            s, e = off + r0, off + r1 - 1
            if ctx.causal:
                rows = range(max(0, r0 - p.chunk + 1), r0 + 1)
                lim, end = s, e + 1
            else:
                rows = range(r0, r1)
                lim = end = nk
            rows = [i for i in rows if real[bi, off + i]]
            qbar = q[bi, :, rows].mean(dim=1) if rows else torch.zeros(hq, d, dtype=q.dtype)
            cands = [j for j in range(p.n_init, lim - p.n_local) if real[bi, j]]
            sel = set(range(min(p.n_init, lim))) | set(range(max(min(p.n_init, lim), lim - p.n_local), end))
            if cands:
                c = torch.tensor(cands)
                vote = torch.zeros(len(cands), dtype=torch.float64)
                for h in range(hq):
                    z = k[bi, h // g, c] @ qbar[h]
                    vote += torch.softmax(z * ctx.scale if p.scaled else z, dim=0).double()
                order = sorted(range(len(cands)), key=lambda t: (-float(vote[t]), cands[t]))
                total, acc, n = float(vote.sum()), 0.0, 0
                for t in order:
                    if p.p < 1.0 and acc >= p.p * total:
                        break
                    acc += float(vote[t])
                    n += 1
                n = max(n, p.min_tokens)
                n = min(n, p.max_tokens) if p.max_tokens else n
                sel |= {cands[t] for t in order[:n]}
            for j in sel:
                keep[bi, r0:r1, j] = True
    return keep


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("params", [dict(p=0.5), dict(p=0.8, scaled=False), dict(p=0.3, min_tokens=6, max_tokens=9),
                                    dict(p=1.0)])
def test_token_topp_selection_matches_brute_force(causal, params):
    q, k, _ = _qkv(2, 6, 2, 90, d=8)
    ctx = _ctx(causal, padding=_pad(2, 90, (0, 11)))
    p = TokenTopPParams(n_init=3, n_local=10, chunk=16, **params)
    got = selection_keep(select_tokens_topp(q, k, ctx, p), 90, 90, p.chunk)[:, 0]
    assert torch.equal(got, _token_topp_brute(q, k, ctx, p))


def test_token_topp_budget_follows_mass_and_decode_shape():
    q, k, v = _qkv(1, 6, 2, 128, d=8, dtype=torch.float32)
    ctx = _ctx(True)
    var = TokenTopP()
    dens = [var.achieved_density(q, k, v, ctx, TokenTopPParams(n_init=2, n_local=4, chunk=16, p=x))
            for x in (0.2, 0.5, 0.8, 1.0)]
    assert dens == sorted(dens) and dens[0] < dens[-1] == pytest.approx(1.0)
    # a peaked vote needs fewer tokens for the same p: sharpen queries 8x
    sharp = var.achieved_density(q * 8, k, v, ctx, TokenTopPParams(n_init=2, n_local=4, chunk=16, p=0.5))
    assert sharp < dens[1]
    # Nq < Nk and a single decode row: fast path equals the reference
    q2, k2, v2 = _qkv(2, 6, 2, 37, nk=103, d=8, dtype=torch.float32)
    ctx2 = _ctx(True, padding=_pad(2, 103, (0, 6)))
    p = TokenTopPParams(n_init=4, n_local=9, p=0.6, chunk=16)
    for qq in (q2, q2[:, :, -1:]):
        with use_impl("reference"):
            want = var.run(qq, k2, v2, ctx2, p)
        with use_impl("gather"):
            got = var.run(qq, k2, v2, ctx2, p)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    with use_impl("gather"), recording() as rec:
        var.run(q, k, v, ctx, TokenTopPParams(n_init=2, n_local=4, chunk=16, p=0.5))
    assert rec.records[0]["achieved"] == pytest.approx(dens[1], rel=1e-9)


def test_token_topp_params_validated():
    for bad, name in ((dict(p=0.0), "p="), (dict(min_tokens=-1), "min_tokens="), (dict(scaled="yes"), "scaled="),
                      (dict(min_tokens=5, max_tokens=3), "min_tokens=5"), (dict(chunk=0), "chunk=")):
        with pytest.raises(BadInput) as e:
            TokenTopPParams(**bad)
        assert str(e.value).startswith(name), str(e.value)


# ----------------------------------------------------------------------------- vertical_slash

from surgeon.attention.vertical_slash import (  # noqa: E402
    VerticalSlash,
    VerticalSlashParams,
    pattern_keep,
    vs_pattern,
)


def _vs_brute(q, k, ctx, p):
    """Token keep [B,Hq,Nq,Nk] by loops from the written rule."""
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    off = nk - nq
    bs = p.block_size
    kp = ctx.key_padding if ctx.key_padding is not None else torch.ones(b, nk, dtype=torch.bool)
    keep = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            for i in range(math.ceil(nq / bs)):
                r0, r1 = i * bs, min(nq, (i + 1) * bs)
                end = r0 if ctx.causal else r1 - 1
                rows = [end - t for t in range(p.last_q) if end - t >= 0]
                if ctx.causal or nq == nk:
                    rows = [r for r in rows if bool(kp[bi, off + r])]
                vs = torch.zeros(nk, dtype=torch.float64)
                ss = {}
                for r in rows:
                    vis = [j for j in range(nk) if bool(kp[bi, j]) and (not ctx.causal or j <= off + r)]
                    if not vis:
                        continue
                    z = (k[bi, h // (hq // hkv), vis] @ q[bi, h, r]) * ctx.scale
                    for j, pj in zip(vis, torch.softmax(z, 0)):
                        vs[j] += float(pj)
                        ss[off + r - j] = ss.get(off + r - j, 0.0) + float(pj)
                first, last = off + r0, off + r1 - 1
                v_allow = [j for j in range(nk) if not ctx.causal or j <= first]
                v_forced = [j for j in v_allow if j < p.sink_tokens]
                v_cand = sorted((j for j in v_allow if j >= p.sink_tokens and bool(kp[bi, j])),
                                key=lambda j: (-float(vs[j]), j))
                verts = set(v_forced) | set(v_cand[:p.n_vertical])
                deltas = range(0, last + 1) if ctx.causal else range(1 - nq, nk)
                s_forced = [dl for dl in deltas if (dl < p.local if ctx.causal else abs(dl) < p.local)]
                s_cand = sorted((dl for dl in deltas if dl not in s_forced), key=lambda dl: (-ss.get(dl, 0.0), dl))
                slashes = set(s_forced) | set(s_cand[:p.n_slash])
                for r in range(r0, r1):
                    for j in range(nk):
                        keep[bi, h, r, j] = j in verts or (off + r - j) in slashes
    return keep


@pytest.mark.parametrize("causal,nq,nk", [(True, 40, 40), (False, 40, 40), (True, 21, 45), (False, 33, 33)])
def test_vertical_slash_pattern_matches_brute_force(causal, nq, nk):
    q, k, _ = _qkv(b=2, nq=nq, nk=nk, seed=2)
    ctx = _ctx(causal, padding=_pad(2, nk, (0, 5)))
    p = VerticalSlashParams(n_vertical=3, n_slash=4, last_q=5, block_size=8, sink_tokens=2, local=3)
    got = pattern_keep(vs_pattern(q, k, ctx, p), nq, nk, p.block_size)
    assert torch.equal(got, _vs_brute(q, k, ctx, p))


def test_vertical_slash_finds_stripes_and_diagonals():
    """Head 0: keys copy the query 7 positions later (a slash at offset 7); head 1: key 13 matches
    every query (a vertical). Both are selected for the later blocks; fast path = reference."""
    n, d = 96, 64
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    k = 0.2 * torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    k[0, 0, : n - 7] += 4.0 * q[0, 0, 7:]
    q[0, 1, :, 0] += 8.0
    k[0, 1, 13, 0] = 8.0
    v = torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    ctx = _ctx(True, kv=2, d=d)
    p = VerticalSlashParams(n_vertical=1, n_slash=1, last_q=8, block_size=16, sink_tokens=0, local=1)
    pat = vs_pattern(q, k, ctx, p)
    assert bool(pat.slash[0, 0, 2:, 7 + n - 1].all())  # offset 7 (index δ + Nq − 1)
    assert bool(pat.vertical[0, 1, 2:, 13].all())
    with use_impl("gather"):
        fast = VerticalSlash().run(q, k, v, ctx, p)
    ref = VerticalSlash().reference(q, k, v, ctx, p)
    torch.testing.assert_close(fast, ref)
    dense = Dense().reference(q, k, v, ctx, Dense.Params())
    err = float((ref[:, :, 32:] - dense[:, :, 32:]).norm() / dense[:, :, 32:].norm())
    assert err < 0.1, err


def test_vertical_slash_fast_path_odd_shapes_and_density():
    var = VerticalSlash()
    q, k, v = _qkv(b=2, hq=6, hkv=2, nq=37, nk=103, dtype=torch.float32, seed=3)
    ctx = _ctx(True, padding=_pad(2, 103, (0, 6)))
    p = VerticalSlashParams(n_vertical=5, n_slash=6, last_q=4, block_size=16, sink_tokens=2, local=3)
    for qq in (q, q[:, :, -1:]):
        with use_impl("reference"):
            want = var.run(qq, k, v, ctx, p)
        with use_impl("gather"):
            got = var.run(qq, k, v, ctx, p)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    want_d = var.achieved_density(q, k, v, ctx, p)
    from surgeon.attention.vertical_slash import pattern_density

    pat = vs_pattern(q, k, ctx, p)
    assert pattern_density(pat, 37, 103, 16, True, ctx.key_padding, rows=5) == pytest.approx(want_d, rel=1e-12)
    allow = torch.ones(37, 103, dtype=torch.bool).tril(103 - 37) & ctx.key_padding[:, None, None, :]
    keep = var.keep_mask(q, k, v, ctx, p) & allow
    assert want_d == pytest.approx(float(keep.sum()) / float(allow.expand_as(keep).sum()), rel=1e-9)
    with use_impl("gather"), recording() as rec:
        var.run(q, k, v, ctx, p)
    assert rec.records[0]["achieved"] == pytest.approx(want_d, rel=1e-9) and 0 < want_d < 1
    for bad, name in ((dict(last_q=0), "last_q="), (dict(n_slash=-1), "n_slash="), (dict(block_size=0), "block_size=")):
        with pytest.raises(BadInput) as e:
            VerticalSlashParams(**bad)
        assert str(e.value).startswith(name)


# ----------------------------------------------------------------------------- end to end

ADAPTIVE_RECIPE = {
    "model.layers.0.self_attn": {"variant": "block_topp", "p": 0.8, "block_size": 16, "stride": 4},
    "model.layers.1.self_attn": {"variant": "reuse", "block_size": 16, "block_mask_from": "model.layers.0.self_attn"},
    "model.layers.2.self_attn": {"variant": "head_hybrid", "kinds": ["dense", "streaming", "sparse"],
                                 "sink_tokens": 4, "window": 16, "p": 0.8, "block_size": 16, "stride": 4},
    "model.layers.3.self_attn": {"variant": "token_topp", "n_init": 4, "n_local": 8, "p": 0.7, "chunk": 16},
    "model.layers.4.self_attn": {"variant": "vertical_slash", "n_vertical": 8, "n_slash": 8, "last_q": 8,
                                 "block_size": 16, "sink_tokens": 2, "local": 8},
}


def test_adaptive_variants_rewrite_export_and_verify(tmp_path_factory):
    """A SmolLM2-shaped Llama (9/3 heads) with the four adaptive variants (and block_topp's mask
    reused by the next layer) is captured, rewritten, exported to ONNX and verified in
    onnxruntime at two lengths against the rewritten PyTorch model."""
    from surgeon.exporters.pipeline import export_rewritten
    from surgeon.passes.policy import policy_from_recipe
    from test_export import _rewritten, _tiny_llama

    lm, cap = _tiny_llama(5)
    pol = policy_from_recipe(ADAPTIVE_RECIPE, lm.fingerprint(), [s.name for s in cap.sites])
    rw = _rewritten(tmp_path_factory, "tiny-adaptive", lm, cap, pol)
    man = export_rewritten(rw, out=rw.parent / "onnx", lengths=(40, 100))
    assert man.verified and man.surgeon_ops == {"block_topp": 1, "reuse": 1, "head_hybrid": 1, "token_topp": 1,
                                                 "vertical_slash": 1}
    for r in man.verification["results"]:
        assert r["ok"] and r["max_abs_err"] < 1e-4, r


def test_partial_topk_selector_equals_full_sort_selector():
    from surgeon.attention.vertical_slash import select_top_k
    from surgeon.kernels.geometry import select_top

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        scores = torch.randint(0, 4, (2, 3, 5, 17), generator=g).float()  # many ties
        allowed = torch.rand(5, 17, generator=g) > 0.2
        forced = torch.rand(5, 17, generator=g) > 0.8
        cand = torch.rand(2, 1, 1, 17, generator=g) > 0.1
        k = torch.randint(0, 20, (2, 3, 5), generator=g)
        assert torch.equal(select_top_k(scores, allowed, forced, cand, k), select_top(scores, allowed, forced, cand, k))


@pytest.mark.parametrize("path", ["prefix", "union", "rows"])
@pytest.mark.parametrize("causal", [True, False])
def test_vertical_slash_kernel_paths_equal_masked_attention(monkeypatch, path, causal):
    """The kernel's three strategies (visible prefix / union of ranges / per-row gather) each give
    the reference."""
    import surgeon.attention.vertical_slash as VS
    from surgeon.attention.base import attention_from_keep

    monkeypatch.setattr(VS, "_choose_path", lambda *costs: path)
    q, k, v = _qkv(b=2, hq=6, hkv=2, nq=45, nk=60 if causal else 45, dtype=torch.float64, seed=8)
    ctx = _ctx(causal, padding=_pad(2, k.shape[2], (0, 7)))
    p = VerticalSlashParams(n_vertical=4, n_slash=5, last_q=4, block_size=16, sink_tokens=2, local=3)
    pat = vs_pattern(q, k, ctx, p)
    want = attention_from_keep(q, k, v, ctx, pattern_keep(pat, q.shape[2], k.shape[2], p.block_size))
    for rows in (1, 5, 16):
        got = VS.vertical_slash_attention(q, k, v, pat, block_size=16, causal=causal, scale=ctx.scale,
                                          key_padding=ctx.key_padding, rows=rows)
        valid = _valid(want, ctx)
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-10, atol=1e-10)


def _valid(out, ctx):
    if ctx.causal and ctx.key_padding is not None:
        nq = out.shape[2]
        return ctx.key_padding[:, -nq:][:, None, :, None].expand_as(out)
    return torch.ones_like(out, dtype=torch.bool)


@pytest.mark.parametrize("name,params", [
    ("block_topp", {"p": 0.7, "block_size": 4, "stride": 2}),
    ("head_hybrid", {"kinds": ["streaming", "sparse"], "sink_tokens": 2, "window": 6, "p": 0.7, "block_size": 4,
                     "stride": 2}),
    ("token_topp", {"n_init": 2, "n_local": 4, "p": 0.7, "chunk": 8}),
    ("vertical_slash", {"n_vertical": 3, "n_slash": 3, "last_q": 4, "block_size": 8, "sink_tokens": 1, "local": 2}),
])
def test_adaptive_lowerings_type_check_and_run_in_float16(name, params):
    """float16 bodies at opset 18 pass the full checker, run, and track the float32 op on the same
    (float16-rounded) inputs (these inputs have no selection near-ties)."""
    import onnx

    from surgeon.exporters import onnx_lowering as L

    var = get_variant(name)
    cfg = encode_config(name, var.params_from(params), {"kv_heads": 2, "site": "s", "layer": 0})
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 32, 8, generator=g).half(), torch.randn(2, 2, 32, 8, generator=g).half(),
               torch.randn(2, 2, 32, 8, generator=g).half())
    kp = _pad(2, 32, (0, 4))
    feeds = {"q": q, "k": k, "v": v, "key_padding": kp}
    proto = L.single_op_model(name, cfg, True, 0.35, feeds, opset=18)
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: feeds[i.name].numpy() for i in sess.get_inputs()})[0]
    assert got.dtype == np.float16 and np.isfinite(got.astype(np.float32)).all()
    with use_impl("reference"):
        want = op_for(name)(q.float(), k.float(), v.float(), kp, None, True, 0.35, cfg)
    want = (want[0] if isinstance(want, tuple) else want).numpy()
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=5e-3, atol=5e-3)
